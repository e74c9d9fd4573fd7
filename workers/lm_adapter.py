"""The causal-LM model adapter: manifest rows with `text` -> scored windows -> nll / bits-per-byte rows.

Why it exists: the `nn` method on language models needs a model it can wrap in LoRA, a
fine-tuning loss (`lm_loss`) that scores exactly like evaluation, and prediction rows in the
TTT-NN paper's metric. Any Hugging Face causal LM saved in a local directory works; nothing
is fetched from a hub. No Ray here: a worker actor wraps one. Scoring convention (BOS
prepended, strided windows, every byte scored once): see `ttt/lm.py`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttt import lm
from workers.adapters import Batch


@dataclass
class LMBatch(Batch):
    """A Batch whose `inputs` are right-padded token windows; `owner[w]` is the record window w scores."""

    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    owner: list[int] = field(default_factory=list)
    n_bytes: list[int] = field(default_factory=list)


class CausalLMAdapter:
    """A Hugging Face causal LM + tokenizer loaded from a local directory.

    `lora` (keyword arguments of `ttt.lm.attach_lora`) wraps the model in a PEFT LoRA adapter
    at load time, so `get_model()` returns the PEFT model and only LoRA weights train.
    """

    kind = "causal_lm"

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", max_length: int | None = None,
                 lora: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32):
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

    def get_model(self) -> nn.Module:
        return self.model

    def has_hook(self, name: str) -> bool:
        return callable(getattr(self, name, None))

    # -- rows -> tensors ---------------------------------------------------------------------
    def windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        return lm.token_windows(lm.encode_with_bos(self.tokenizer, text), self.max_length)

    def _tensors(self, windows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device) for t in lm.pad_windows(windows, self.pad_id))  # type: ignore[return-value]

    def build_loader(self, records: list[dict[str, Any]], *, batch_size: int) -> Iterator[LMBatch]:
        for start in range(0, len(records), batch_size):
            good, windows, owner, n_bytes, errors = [], [], [], [], []
            for rec in records[start:start + batch_size]:
                try:
                    text = _text_of(rec)
                    rec_windows = self.windows(text)
                except Exception as exc:  # a bad row becomes an error row, never a crash
                    errors.append((rec, f"{type(exc).__name__}: {exc}"))
                    continue
                owner += [len(good)] * len(rec_windows)
                windows += rec_windows
                n_bytes.append(len(text.encode("utf-8")))
                good.append(rec)
            if not windows:
                yield LMBatch(good, None, errors)
                continue
            input_ids, mask, labels = self._tensors(windows)
            yield LMBatch(good, input_ids, errors, attention_mask=mask, labels=labels, owner=owner, n_bytes=n_bytes)

    # -- tensors -> rows ---------------------------------------------------------------------
    def predict(self, batch: LMBatch, logits: Any = None) -> list[dict[str, Any]]:
        """One row per good record: nll (nats, summed over its tokens), n_tokens, n_bytes, bits_per_byte.

        `logits` (a tensor or a model output with `.logits`) may come from a forward the method
        already ran on `batch.inputs`; otherwise the model runs here without gradients.
        """
        if not batch.records:
            return []
        if logits is None:
            with torch.no_grad():
                logits = self.model(input_ids=batch.inputs, attention_mask=batch.attention_mask).logits
        logits = getattr(logits, "logits", logits)
        with torch.no_grad():
            nll = lm.token_nll(logits.detach(), batch.labels)
        counts = (batch.labels[:, 1:] != lm.IGNORE).sum(1)
        per_nll = [0.0] * len(batch.records)
        per_tokens = [0] * len(batch.records)
        for w, rec_idx in enumerate(batch.owner):
            per_nll[rec_idx] += float(nll[w].double().sum())
            per_tokens[rec_idx] += int(counts[w])
        return [
            {"nll": n, "n_tokens": t, "n_bytes": b, "bits_per_byte": lm.bits_per_byte(n, b)}
            for n, t, b in zip(per_nll, per_tokens, batch.n_bytes)
        ]

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
        return lm.logit_lens(self.model, self.tokenizer, text, top_k=top_k, position=position,
                             max_length=self.max_length)

    @torch.no_grad()
    def score_choices(self, context: str, choices: list[str]) -> list[float]:
        """Log-likelihood (nats) of each choice's tokens after the BOS-prefixed context.

        Context and choice are tokenised separately and concatenated, so every choice is
        scored against the same context tokens; the context is cut from the left to fit.
        """
        ctx = lm.encode_with_bos(self.tokenizer, context)
        windows = []
        for choice in choices:
            cont = list(self.tokenizer(choice, add_special_tokens=False)["input_ids"])
            if not cont or len(cont) >= self.max_length:
                raise ValueError(f"choice {choice[:30]!r} has {len(cont)} tokens; need 1..{self.max_length - 1}")
            keep = ctx[-(self.max_length - len(cont)):]
            windows.append((keep + cont, [lm.IGNORE] * len(keep) + cont))
        input_ids, mask, labels = self._tensors(windows)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        return [-float(row.double().sum()) for row in lm.token_nll(logits, labels)]


def _text_of(record: dict[str, Any]) -> str:
    text = record.get("text")
    if text is None or (isinstance(text, float) and math.isnan(text)):
        raise ValueError("row has no 'text'")
    if not isinstance(text, str):
        raise ValueError(f"row 'text' is {type(text).__name__}, not a string")
    if not text:
        raise ValueError("row 'text' is empty: no bytes to score")
    return text
