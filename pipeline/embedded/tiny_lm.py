"""The embedded tiny LM: a byte-level BPE and a small GPT-2 trained once on the text corpus's
train split (pipeline/embedded/text.py), saved with `save_pretrained` under
`cache_dir/tiny_gpt2-<settings key>` (one folder per set of training settings, so changing them never
meets a model trained with others) with a `DONE` marker written last. torch and transformers are
imported inside the functions: building the corpus or reading a manifest needs neither.

Why these defaults (DEMO): the first `make demo-lm` builds this model before anything else, so it
must take well under a minute on 2 cores; BENCHMARKS.md ("The LM demo in minutes") measures it
against the 4-layer model the earlier LM benchmarks used (BENCH_SETTINGS, ~7 CPU-minutes), which
`train_tiny_lm(cache_dir, **BENCH_SETTINGS)` still builds. Training prints a line every few seconds;
it is short enough to restart rather than resume.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.embedded.text import DONE, TextBuildError, build_text_corpus

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast


def train_tokenizer(texts: list[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: no unknown tokens, exact round trip) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text, so byte counts stay exact
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                   pad_token=special, model_max_length=1_000_000)


def _token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Each text as BOS + tokens (the scoring convention of ttt.lm), all concatenated."""
    bos = tokenizer.bos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.fromiter((t for seq in ids for t in [bos, *seq]), dtype=np.int64)


def _eval_loss(model, stream: np.ndarray, context: int, max_windows: int | None = None) -> float:
    """Mean token cross-entropy over consecutive context-long windows of `stream`."""
    import torch

    n = (len(stream) - 1) // context
    n = n if max_windows is None else min(n, max_windows)
    x = torch.from_numpy(stream[:n * context].reshape(n, context))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 16):
            xb = x[i:i + 16]
            total += model(input_ids=xb, attention_mask=torch.ones_like(xb), labels=xb).loss.item() * len(xb)
            count += len(xb)
    model.train()
    return total / count


def _check_cached(out: Path, settings: dict[str, Any]) -> None:
    """A cached model must have been trained with these settings, to the end."""
    info = json.loads((out / "train.json").read_text())
    differ = {k: (info.get(k), v) for k, v in settings.items() if info.get(k) != v}
    if differ:
        raise TextBuildError(f"{out} was trained with other settings {differ} (built, asked): use another cache_dir")
    if info.get("steps_done", settings["steps"]) < settings["steps"]:  # cached by the old time cap: undertrained
        raise TextBuildError(f"{out} stopped at step {info['steps_done']} of {settings['steps']} "
                             f"({info.get('stop_reason')}): delete it to retrain")


def train_step(model: Any, optimizer: torch.optim.Optimizer, stream: np.ndarray, context: int, batch_size: int,
               rng: np.random.Generator) -> torch.Tensor:
    """One step of the build: `batch_size` random windows of `context` tokens, next-token loss,
    gradients clipped to norm 1; returns the loss (bench/tiny_lm_build.py times this very step)."""
    import torch

    starts = rng.integers(0, len(stream) - context, size=batch_size)
    x = torch.from_numpy(np.stack([stream[s:s + context] for s in starts]))
    loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def _train(model, optimizer, schedule, train_stream: np.ndarray, val_stream: np.ndarray, *, seed: int, steps: int,
           context: int, batch_size: int, max_seconds: float | None, log_every: int,
           progress_s: float = 5.0) -> tuple[list[dict[str, Any]], int, float]:
    """The training loop: random context-long windows of the train stream; (log, steps done, seconds).
    A progress line every `progress_s` seconds; a look at part of the validation set every `log_every` steps."""
    rng = np.random.default_rng(seed)
    model.train()
    log: list[dict[str, Any]] = []
    t_train = last_line = time.perf_counter()
    for step in range(1, steps + 1):
        loss = train_step(model, optimizer, train_stream, context, batch_size, rng)
        schedule.step()
        elapsed = time.perf_counter() - t_train
        if time.perf_counter() - last_line >= progress_s and step < steps:
            last_line = time.perf_counter()
            print(f"[train-lm] step {step}/{steps} loss {loss.item():.3f} ({elapsed:.0f}s, "
                  f"~{elapsed / step * (steps - step):.0f}s to go)", flush=True)
        if step % log_every == 0 and step < steps:
            # a quick look on part of the validation set; the full one is measured at the end
            val = _eval_loss(model, val_stream, context, max_windows=32)
            log.append({"step": step, "train_loss": round(loss.item(), 4), "val_loss_part": round(val, 4),
                        "elapsed_s": round(elapsed, 1)})
            print(f"[train-lm] step {step}/{steps} loss {loss.item():.3f} val~ {val:.3f} ({elapsed:.0f}s)", flush=True)
        if max_seconds is not None and elapsed > max_seconds:
            raise TextBuildError(f"training the tiny LM stopped by max_seconds={max_seconds} at step {step} of "
                                 f"{steps}: nothing cached (the seed would not fix the model); raise max_seconds")
    t_train = time.perf_counter() - t_train
    return log, step, t_train


# the first demo's model (the defaults of train_tiny_lm) and the 4-layer one of the issue-5/14 benchmarks
DEMO_SETTINGS: dict[str, Any] = {"vocab_size": 2048, "n_layer": 2, "n_embd": 160, "n_head": 4, "context": 128,
                                 "batch_size": 16, "steps": 300, "lr": 4e-3, "warmup": 30}
BENCH_SETTINGS: dict[str, Any] = {"vocab_size": 4096, "n_layer": 4, "n_embd": 192, "n_head": 4, "context": 256,
                                  "batch_size": 8, "steps": 600, "lr": 2e-3, "warmup": 50}


def model_dir(cache_dir: str | Path, settings: dict[str, Any]) -> Path:
    """`<cache_dir>/tiny_gpt2-<key>`: the key is a hash of the training settings (train.json lists them)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"tiny_gpt2-{key}"


def train_tiny_lm(cache_dir: str | Path = ".cache/text", *, seed: int = 0,
                  vocab_size: int = DEMO_SETTINGS["vocab_size"], n_layer: int = DEMO_SETTINGS["n_layer"],
                  n_embd: int = DEMO_SETTINGS["n_embd"], n_head: int = DEMO_SETTINGS["n_head"],
                  context: int = DEMO_SETTINGS["context"], batch_size: int = DEMO_SETTINGS["batch_size"],
                  steps: int = DEMO_SETTINGS["steps"], lr: float = DEMO_SETTINGS["lr"],
                  warmup: int = DEMO_SETTINGS["warmup"], max_seconds: float | None = None, threads: int = 2,
                  log_every: int = 100, progress_s: float = 5.0) -> Path:
    """Train the tokenizer and a tiny GPT-2 on the corpus's train split; return the model directory.

    Fixed `steps` keep the run deterministic on a given machine: the seed fixes the model. An
    optional `max_seconds` cap that fires raises instead of caching a shorter-trained model (a
    time cap made the cached model depend on the machine's load: 26 of 600 steps on a busy box).
    Skipped when already built.
    """
    import torch

    settings = {"seed": seed, "vocab_size": vocab_size, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                "context": context, "batch_size": batch_size, "steps": steps, "lr": lr, "warmup": warmup}
    out = model_dir(cache_dir, settings)
    if (out / DONE).exists():
        _check_cached(out, settings)
        return out
    paths = build_text_corpus(cache_dir, seed=seed)
    print(f"[train-lm] building the tiny LM once into {out}: a {vocab_size}-token byte-level BPE, then a "
          f"{n_layer}-layer, {n_embd}-wide GPT-2 trained {steps} steps", flush=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_texts = pq.read_table(paths["train"], columns=["text"]).column("text").to_pylist()
    kb = pq.read_table(paths["kb"], columns=["text", "in_lm_train"]).to_pydict()
    val_texts = [t for t, used in zip(kb["text"], kb["in_lm_train"]) if not used]
    tokenizer = train_tokenizer(train_texts, vocab_size)
    t_tok = time.perf_counter() - t0
    train_stream = _token_stream(tokenizer, train_texts)
    val_stream = _token_stream(tokenizer, val_texts)
    model = _gpt2(tokenizer, context=context, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train-lm] tokenizer {len(tokenizer)} tokens in {t_tok:.1f}s; train {len(train_stream)} tokens "
          f"({sum(len(t.encode()) for t in train_texts) / len(train_stream):.2f} bytes/token), "
          f"val {len(val_stream)}; model {n_params / 1e6:.2f}M params", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, warmup, steps)
    log, step, t_train = _train(model, optimizer, schedule, train_stream, val_stream, seed=seed, steps=steps,
                                context=context, batch_size=batch_size, max_seconds=max_seconds, log_every=log_every,
                                progress_s=progress_s)
    stop_reason = "steps"
    val_loss = _eval_loss(model, val_stream, context)
    print(f"[train-lm] {step} steps in {t_train:.0f}s ({stop_reason}); val loss {val_loss:.3f}", flush=True)
    _save(out, model, tokenizer, {
        **settings, "params": n_params, "steps_done": step, "stop_reason": stop_reason,
        "train_tokens": int(len(train_stream)), "val_tokens": int(len(val_stream)),
        "val_loss": round(val_loss, 4), "tokenizer_s": round(t_tok, 1),
        "train_s": round(t_train, 1), "threads": threads,
        "torch": torch.__version__, "log": log,
    })
    return out


def _gpt2(tokenizer, *, context: int, n_embd: int, n_layer: int, n_head: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    bos = tokenizer.bos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=bos, eos_token_id=bos, pad_token_id=bos,
                        # no dropout: a few minutes of training underfits, and TTT then runs the
                        # same in train and eval mode
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _warmup_cosine(optimizer, warmup: int, steps: int):
    """Linear warm-up, then cosine from 1.0 down to 0.1 of the peak lr at `steps`."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))


def _save(out: Path, model, tokenizer, record: dict) -> None:
    """Model, tokenizer and train.json, then the DONE marker last: a build cut short is rebuilt."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train.json").write_text(json.dumps(record, indent=2))
    (out / DONE).write_text("ok\n")
    print(f"[train-lm] saved to {out}", flush=True)


def ensure_text_default(cache_dir: str | Path = ".cache/text", seed: int = 0) -> dict[str, Path]:
    """Corpus and tiny GPT-2, each built once: {train, kb, queries, model} paths."""
    paths = build_text_corpus(cache_dir, seed=seed)
    return {**paths, "model": train_tiny_lm(cache_dir, seed=seed)}


