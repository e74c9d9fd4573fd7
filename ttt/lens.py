"""The logit lens of a causal LM: the next-token distribution that every layer's residual stream
predicts through the final norm and the unembedding, before and after test-time training
(`nn.logit_lens_top_k`). Pure torch; the scoring convention (BOS-prefixed text) is `ttt.lm`'s.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ttt.lm import encode_with_bos, model_max_length, unwrap

FINAL_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "ln_final", "final_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied before the unembedding (GPT-2: transformer.ln_f, Llama: model.norm)."""
    found = [(name, m) for name, m in unwrap(model).named_modules() if name.split(".")[-1] in FINAL_NORM_NAMES]
    if not found:
        raise ValueError(f"logit_lens: cannot find the final norm of {type(unwrap(model)).__name__} "
                         f"(looked for {FINAL_NORM_NAMES})")
    return min(found, key=lambda item: item[0].count("."))[1]  # the top-level one, not a block's


@torch.no_grad()
def logit_lens(model: nn.Module, tokenizer: Any, text: str, top_k: int = 5, position: int = -1,
               max_length: int | None = None) -> list[dict[str, Any]]:
    """Next-token distribution read off every layer's residual stream at one position.

    Layer 0 is the embedding output, layer i the output of block i; layers below the last go
    through the final norm and the unembedding, the last layer is the model's own logits
    (transformers already returns it after the final norm). The text is BOS-prefixed as in
    scoring and cut to its last `max_length` tokens; `position` indexes that sequence
    (-1: the prediction after the whole text). Works on PEFT-wrapped models (LoRA included).
    """
    ids = encode_with_bos(tokenizer, text)[-(max_length or model_max_length(model)):]
    pos = position if position >= 0 else len(ids) + position
    if not 0 <= pos < len(ids):
        raise ValueError(f"logit_lens: position {position} outside a sequence of {len(ids)} tokens")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_hidden_states=True)
    finally:
        model.train(was_training)
    hidden = out.hidden_states
    norm, head = final_norm(model), unwrap(model).get_output_embeddings()
    target = ids[pos + 1] if pos + 1 < len(ids) else None
    records = []
    for layer in range(len(hidden)):
        logits = out.logits[0, pos] if layer == len(hidden) - 1 else head(norm(hidden[layer][0, pos]))
        probs = logits.float().softmax(-1)
        top = probs.topk(min(top_k, probs.numel()))
        records.append({
            "layer": layer,
            "position": pos,
            "input_token": tokenizer.decode([ids[pos]]),
            "top_ids": top.indices.tolist(),
            "top_tokens": [tokenizer.decode([i]) for i in top.indices.tolist()],
            "top_probs": top.values.tolist(),
            "entropy": float(-(probs * probs.clamp_min(1e-30).log()).sum()),
            "target_prob": float(probs[target]) if target is not None else None,
        })
    return records


def lens_rows(records: Sequence[dict[str, Any]], **tags: Any) -> list[dict[str, Any]]:
    """Flatten logit-lens records to one row per (layer, rank), DataFrame-ready.

    `tags` (e.g. stage="before", sample_id=...) are copied into every row so before/after
    lenses concatenate into one table.
    """
    rows = []
    for rec in records:
        for rank, (tid, tok, prob) in enumerate(zip(rec["top_ids"], rec["top_tokens"], rec["top_probs"])):
            rows.append({**tags, "layer": rec["layer"], "position": rec["position"], "rank": rank,
                         "token_id": tid, "token": tok, "prob": prob, "entropy": rec["entropy"],
                         "target_prob": rec["target_prob"]})
    return rows
