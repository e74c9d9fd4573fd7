"""The causal-LM model adapter: manifest rows with `text` -> scored windows -> nll / bits-per-byte rows.

Why it exists: the `nn` method on language models needs a model it can wrap in LoRA, a
fine-tuning loss (`lm_loss`) that scores exactly like evaluation, and prediction rows in the
TTT-NN paper's metric. Any Hugging Face causal LM saved in a local directory works; nothing
is fetched from a hub. No Ray here: a worker actor wraps one. Scoring convention (BOS
prepended, strided windows, every byte scored once): see `ttt/lm.py`.

Memory is bounded whatever a row's length: `forward` (what a method's prediction is) gives each
window's per-token NLL, running the model on a few windows at a time so that no more than
`LOGITS_BUDGET_BYTES` of logits exist at once (a 10 MB text is ~2,500 windows; all their logits
together would be hundreds of GB). Rows above `max_text_bytes` become error rows before any work:
scoring time grows with the text. A text column holding invalid UTF-8 reaches here as the row's
`_error` (`pipeline/job/inputs.py` checks it per row) and becomes an error row too.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttt import lens, lm
from workers.adapters import Batch, class_predictions

LOGITS_BUDGET_BYTES = 256 * 2**20  # logits alive at once in `forward` (float32)


@dataclass
class LMInputs:
    """What a method gets for a batch of texts: the texts themselves (for retrieval) and their
    right-padded token windows; window w scores record `owner[w]`. `choices[i]` holds record
    i's answer options in multiple-choice rows (None otherwise): never part of the query."""

    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    owner: list[int]
    n_bytes: list[int]
    choices: list[list[str] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


class CausalLMAdapter:
    """A Hugging Face causal LM + tokenizer loaded from a local directory.

    `lora` (keyword arguments of `ttt.lm.attach_lora`) wraps the model in a PEFT LoRA adapter
    at load time, so `get_model()` returns the PEFT model and only LoRA weights train.
    `embedder` (a kb_index Embedder) embeds query texts for retrieval; None loads the sentence
    model of the default text KB on the first `embed` call. `max_text_bytes` (None: no limit;
    the job passes `model.max_text_bytes`): a longer row's text is an error row.
    """

    kind = "causal_lm"

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", max_length: int | None = None,
                 lora: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32,
                 embedder: Any = None, embedder_threads: int | None = None,
                 max_text_bytes: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"causal LM directory not found: {path}")
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        model = model.to(self.device).eval()
        self.model: nn.Module = lm.attach_lora(model, **lora) if lora else model
        self.max_length = max_length or lm.model_max_length(self.model)
        pad = self.tokenizer.pad_token_id
        # padding is masked out of every loss, so any id will do; prefer the tokenizer's own
        self.pad_id = int(pad if pad is not None else lm.bos_id(self.tokenizer))
        # the query embedder of `embed` (only nn needs it): the sentence model, loaded on first use
        self._embedder = embedder
        self._embedder_threads = embedder_threads
        self.max_text_bytes = max_text_bytes
        vocab = int(getattr(lm.unwrap(self.model).config, "vocab_size", 0) or 50_000)
        self.windows_per_forward = max(1, LOGITS_BUDGET_BYTES // (self.max_length * vocab * 4))

    def get_model(self) -> nn.Module:
        return self.model

    def has_hook(self, name: str) -> bool:
        return callable(getattr(self, name, None))

    # -- rows -> tensors ---------------------------------------------------------------------
    def windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        return lm.token_windows(lm.encode_with_bos(self.tokenizer, text), self.max_length)

    def _tensors(self, windows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device) for t in lm.pad_windows(windows, self.pad_id))  # type: ignore[return-value]

    def build_loader(self, records: list[dict[str, Any]], *, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(records), batch_size):
            good, texts, windows, owner, n_bytes, choices, errors = [], [], [], [], [], [], []
            for rec in records[start:start + batch_size]:
                try:
                    text = _text_of(rec, self.max_text_bytes)
                    rec_choices = _choices_of(rec)
                    rec_windows = self.windows(text)
                except Exception as exc:  # a bad row becomes an error row, never a crash
                    errors.append((rec, f"{type(exc).__name__}: {exc}"))
                    continue
                owner += [len(good)] * len(rec_windows)
                windows += rec_windows
                texts.append(text)
                n_bytes.append(len(text.encode("utf-8")))
                choices.append(rec_choices)
                good.append(rec)
            if not windows:
                yield Batch(good, None, errors)
                continue
            input_ids, mask, labels = self._tensors(windows)
            yield Batch(good, LMInputs(texts, input_ids, mask, labels, owner, n_bytes, choices), errors)

    # -- tensors -> rows ---------------------------------------------------------------------
    def forward(self, inputs: LMInputs) -> torch.Tensor:
        """Per-token NLL (nats) of every window, [windows, width - 1], 0 where not scored
        (`ttt.lm.token_nll`): all a row needs, computed `windows_per_forward` windows at a time
        so a long text never holds all its logits at once. Losses that need gradients use `lm_loss`."""
        per = self.windows_per_forward
        return torch.cat([lm.token_nll(self.model(input_ids=inputs.input_ids[lo:lo + per],
                                                  attention_mask=inputs.attention_mask[lo:lo + per]).logits,
                                       inputs.labels[lo:lo + per])
                          for lo in range(0, inputs.input_ids.shape[0], per)])

    def predict(self, batch: Batch, token_nll: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """One row per good record: nll (nats, summed over its tokens), n_tokens, n_bytes,
        bits_per_byte; multiple-choice rows add prediction (argmax choice), confidence and
        entropy of the softmax over the choices' log-likelihoods, and those log-likelihoods
        (`choice_logliks`, nats, summed over each choice's tokens).

        `token_nll` (what `forward` gives) may come from a forward the method already ran on
        `batch.inputs`; otherwise the model runs here. Choices are scored with the model as it is now (adapted, when
        called right after the method's step).
        """
        if not batch.records:
            return []
        inputs: LMInputs = batch.inputs
        with torch.no_grad():
            nll = (self.forward(inputs) if token_nll is None else token_nll).detach().float()
        counts = (inputs.labels[:, 1:] != lm.IGNORE).sum(1)
        per_nll = [0.0] * len(batch.records)
        per_tokens = [0] * len(batch.records)
        for w, rec_idx in enumerate(inputs.owner):
            per_nll[rec_idx] += float(nll[w].double().sum())
            per_tokens[rec_idx] += int(counts[w])
        rows = [{"nll": n, "n_tokens": t, "n_bytes": b, "bits_per_byte": lm.bits_per_byte(n, b)}
                for n, t, b in zip(per_nll, per_tokens, inputs.n_bytes)]
        for row, text, options in zip(rows, inputs.texts, inputs.choices):
            if options:
                logliks = self.score_choices(text, options)
                row.update(class_predictions(torch.tensor([logliks]))[0], choice_logliks=logliks)
        return rows

    def embed(self, inputs: LMInputs) -> torch.Tensor:
        """Sentence embeddings of the batch's texts (the KB's embedder), [records, dim]."""
        if self._embedder is None:
            from kb_index import SentenceEmbedder

            self._embedder = SentenceEmbedder(device=str(self.device), threads=self._embedder_threads)
        return torch.from_numpy(self._embedder.embed(inputs.texts))

    # -- hooks -------------------------------------------------------------------------------
    def lm_loss(self, texts: list[str]) -> torch.Tensor:
        """Mean next-token cross-entropy over every scored token of `texts` (with gradients).

        Tokens are weighted equally, so lm_loss([t]) * n_tokens equals predict's nll for t.
        """
        windows = [w for text in texts for w in self.windows(text)]
        if not windows:
            raise ValueError("lm_loss needs at least one text")
        input_ids, mask, labels = self._tensors(windows)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        nll = lm.token_nll(logits, labels)
        return nll.sum() / (labels[:, 1:] != lm.IGNORE).sum()

    def logit_lens(self, text: str, top_k: int = 5, position: int = -1) -> list[dict[str, Any]]:
        return lens.logit_lens(self.model, self.tokenizer, text, top_k=top_k, position=position,
                             max_length=self.max_length)

    @torch.no_grad()
    def score_choices(self, context: str, choices: list[str]) -> list[float]:
        """Log-likelihood (nats) of each choice's tokens after the BOS-prefixed context.

        Context and choice are tokenised separately and concatenated, so every choice is
        scored against the same context tokens; the context is cut from the left to fit.
        """
        return [loglik for loglik, _ in self.score_continuations(context, choices)]

    @torch.no_grad()
    def score_continuations(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """(log-likelihood in nats, whether greedy decoding would produce it) per continuation,
        scored as `score_choices` scores (what lm-evaluation-harness's loglikelihood asks)."""
        ctx = lm.encode_with_bos(self.tokenizer, context)
        windows = []
        for cont_text in continuations:
            cont = list(self.tokenizer(cont_text, add_special_tokens=False)["input_ids"])
            if not cont or len(cont) >= self.max_length:
                raise ValueError(f"choice {cont_text[:30]!r} has {len(cont)} tokens; need 1..{self.max_length - 1}")
            keep = ctx[-(self.max_length - len(cont)):]
            windows.append((keep + cont, [lm.IGNORE] * len(keep) + cont))
        input_ids, mask, labels = self._tensors(windows)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        nll = lm.token_nll(logits, labels)
        scored = labels[:, 1:] != lm.IGNORE
        greedy = ((logits[:, :-1].argmax(-1) == labels[:, 1:]) | ~scored).all(1)
        return [(-float(row.double().sum()), bool(g)) for row, g in zip(nll, greedy)]

    @torch.no_grad()
    def generate(self, context: str, *, until: list[str] | None = None, max_new_tokens: int = 64) -> str:
        """Greedy continuation of the BOS-prefixed context, cut at the first `until` string."""
        max_new_tokens = max(1, min(max_new_tokens, self.max_length - 1))  # room for one context token at least
        ids = lm.encode_with_bos(self.tokenizer, context)[-(self.max_length - max_new_tokens):]
        input_ids = torch.tensor([ids], device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id)
        finally:
            self.model.train(was_training)
        text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        cuts = [text.index(stop) for stop in (until or []) if stop and stop in text]
        return text[:min(cuts)] if cuts else text


def _choices_of(record: dict[str, Any]) -> list[str] | None:
    choices = record.get("choices")
    if choices is None or (isinstance(choices, float) and math.isnan(choices)):
        return None
    choices = list(choices)
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("row 'choices' must be a list of at least two non-empty strings")
    return choices


def _text_of(record: dict[str, Any], max_bytes: int | None = None) -> str:
    if record.get("_error") is not None:  # found while the block was read (invalid UTF-8)
        raise ValueError(record["_error"])
    text = record.get("text")
    if text is None or (isinstance(text, float) and math.isnan(text)):
        raise ValueError("row has no 'text'")
    if not isinstance(text, str):
        raise ValueError(f"row 'text' is {type(text).__name__}, not a string")
    if not text:
        raise ValueError("row 'text' is empty: no bytes to score")
    if max_bytes is not None and len(text) > max_bytes // 4 and len(text.encode("utf-8")) > max_bytes:
        raise ValueError(f"row 'text' is {len(text.encode('utf-8')):,} bytes, above model.max_text_bytes="
                         f"{max_bytes:,}: split it into rows, or raise the limit (scoring time grows with length)")
    return text
