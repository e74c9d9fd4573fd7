"""Pure torch/PEFT helpers for test-time training of causal LMs (retrieval TTT, `nn`).

Why a module of its own: the LM side of `nn` needs LoRA adapters that can be attached once,
snapshotted, swapped (adapter cache) and reset exactly; the Hardt & Sun fine-tune loop (one
Adam step per retrieved neighbour, nearest first); a scoring convention shared by the model
adapter and the loss (BOS-prepended, strided windows, so every byte of a text is scored
exactly once); the logit lens for before/after analysis is `ttt/lens.py`. No Ray, no `pipeline` here.

Scoring convention: a text is encoded without the tokenizer's own special tokens and one
BOS (the tokenizer's bos token, else its eos token) is prepended, so the first real token is
predicted too and `bits_per_byte = nll / (ln 2 * utf8_bytes)` covers the whole text. Texts
longer than the model's context are scored in windows that overlap by half: each token is
scored once, with at least half a context of history.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttt.params import distance, grad_norm

IGNORE = -100  # label value that the loss skips (context-only and padding positions)


# -- metric -----------------------------------------------------------------------------
def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Summed negative log-likelihood (nats) -> bits per UTF-8 byte (the TTT-NN paper's metric)."""
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return float(nll_nats) / (math.log(2) * n_bytes)


# -- tokenisation and windows -------------------------------------------------------------
def bos_id(tokenizer: Any) -> int:
    """The token prepended to every scored text: bos if the tokenizer has one, else eos."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a bos nor an eos token to prepend")
    return int(tid)


def encode_with_bos(tokenizer: Any, text: str) -> list[int]:
    # add_special_tokens=False: some tokenizers add BOS themselves, some never; prepending
    # ours keeps one convention for every model.
    return [bos_id(tokenizer)] + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_windows(ids: Sequence[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Split BOS-prefixed `ids` into (input_ids, labels) windows of <= max_length tokens.

    `labels` is aligned with `input_ids` (the HF convention; the loss shifts by one) and holds
    IGNORE where a token is context only, so across windows every token after the BOS is a
    target exactly once.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = list(ids)
    n = len(ids)
    if n <= max_length:
        return [(ids, [IGNORE] + ids[1:])]
    stride = max_length // 2
    windows = [(ids[:max_length], [IGNORE] + ids[1:max_length])]
    end = max_length
    while end < n:
        new_end = min(n, end + stride)
        start = new_end - max_length
        window = ids[start:new_end]
        scored_from = end - start
        windows.append((window, [IGNORE] * scored_from + window[scored_from:]))
        end = new_end
    return windows


def pad_windows(windows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad windows into (input_ids, attention_mask, labels) tensors.

    Right padding keeps real tokens at positions 0..len-1 and, with causal attention, real
    tokens never see the padding, so the logits of real positions equal an unpadded forward.
    """
    width = max(len(w) for w, _ in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for i, (w, lab) in enumerate(windows):
        input_ids[i, :len(w)] = torch.tensor(w)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(w)] = 1
    return input_ids, mask, labels


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood (nats) of `labels` under `logits`, 0 where ignored.

    Shape (windows, width - 1): position t holds -log p(labels[t+1] | tokens <= t).
    """
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="none")
    return nll.view(targets.shape)


def model_max_length(model: nn.Module, cap: int = 1024) -> int:
    """The context a model was built for (n_positions / max_position_embeddings), capped."""
    config = unwrap(model).config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


# -- LoRA -----------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself when not wrapped)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def num_blocks(model: nn.Module) -> int:
    config = unwrap(model).config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell how many blocks {type(unwrap(model)).__name__} has (no num_hidden_layers / n_layer)")


def resolve_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Block indices, negative ones counted from the end ([-2, -1]: the last two blocks)."""
    n = num_blocks(model)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"attach_lora: layers {bad} outside the {n} blocks of {type(unwrap(model)).__name__}")
    return sorted({i % n for i in layers})


def attach_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                target_modules: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> nn.Module:
    """Wrap `model` in a PEFT LoRA model; only the LoRA weights stay trainable.

    `target_modules=None` takes PEFT's default for the architecture (GPT-2: c_attn; Llama:
    q_proj, v_proj). GPT-2's Conv1D layers store weights transposed, so `fan_in_fan_out` is set
    whenever a targeted module is a Conv1D (PEFT would otherwise warn and flip it itself).
    `layers` limits LoRA to those blocks (PEFT's layers_to_transform; negative = from the end):
    with only the last blocks trainable, backward stops there, which is what makes per-query
    fine-tuning of a 135M model affordable on a CPU.
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS
    from transformers.pytorch_utils import Conv1D

    if hasattr(model, "peft_config"):
        raise ValueError(f"attach_lora: {type(model).__name__} already carries a PEFT adapter")
    targets = list(target_modules) if target_modules else DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""))
    if not targets:
        raise ValueError(f"attach_lora: no default LoRA target_modules for {type(model).__name__}; pass target_modules")
    matched = [m for name, m in model.named_modules() if name.split(".")[-1] in targets]
    if not matched:
        raise ValueError(f"attach_lora: none of target_modules {targets} exists in {type(model).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        fan_in_fan_out=any(isinstance(m, Conv1D) for m in matched), bias="none",
                        layers_to_transform=resolve_layers(model, layers) if layers else None)
    with warnings.catch_warnings():
        # PEFT 0.21 calls a transformers 5 API that warns about its own deprecation.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def _lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    # Names are taken relative to the unwrapped model so a state moves between a PeftModel
    # and the base model it wraps (or another replica) under the same keys.
    params = {n: p for n, p in unwrap(model).named_parameters() if "lora_" in n}
    if not params:
        raise ValueError(f"{type(model).__name__} has no LoRA parameters (call attach_lora first)")
    return params


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the LoRA weights only (what the adapter cache stores and ships)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in _lora_params(model).items()}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `lora_state` into the model's LoRA weights in place (same keys, same shapes)."""
    params = _lora_params(model)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"LoRA state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def reset_lora(model: nn.Module, base_state: dict[str, torch.Tensor]) -> None:
    """Back to the LoRA initialisation captured right after `attach_lora` (bitwise)."""
    load_lora_state(model, base_state)


# -- fine-tuning ------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    losses: list[float]  # each measured before its step
    steps: int  # optimiser steps kept
    # steps_done | nonfinite_loss | nonfinite_grad | loss_ratio | nonfinite_update | update_norm_cap
    # | cumulative_update_cap
    stop_reason: str
    grad_norm: float | None  # of the last step taken, before clipping
    update_norm: float | None = None  # L2 change of the trainable parameters by the last step kept


@dataclass(frozen=True)
class UpdateGuards:
    """The classifier path's loss-ratio and update-norm guards, on the LM fine-tune loop.

    `loss_ratio_stop`: stop before a step whose loss exceeds the first step's loss x ratio (the
    loss of a neighbour far worse than the nearest one's: a sign the update has gone astray).
    `max_update_norm`: a step that moves the trainable parameters by more (L2) is rolled back.
    `max_cumulative_update_norm`: a step after which the parameters sit further than this from
    `reference` (the base LoRA state: B = 0, the unadapted model) is rolled back.
    A breach names itself in `stop_reason`; the steps kept before it stay.
    """

    loss_ratio_stop: float | None = None
    max_update_norm: float | None = None
    max_cumulative_update_norm: float | None = None

    @property
    def checks_updates(self) -> bool:
        return self.max_update_norm is not None or self.max_cumulative_update_norm is not None


def _breach_after_update(params: Sequence[nn.Parameter], before: Sequence[torch.Tensor],
                         reference: Sequence[torch.Tensor] | None, guards: UpdateGuards) -> tuple[str | None, float]:
    step_norm = distance(list(params), list(before))
    if not math.isfinite(step_norm):
        return "nonfinite_update", step_norm
    if guards.max_update_norm is not None and step_norm > guards.max_update_norm:
        return "update_norm_cap", step_norm
    if guards.max_cumulative_update_norm is not None and reference is not None and \
            distance(list(params), list(reference)) > guards.max_cumulative_update_norm:
        return "cumulative_update_cap", step_norm
    return None, step_norm


def _step_on(batch: list[str], loss_fn: Callable[[list[str]], torch.Tensor], params: list[nn.Parameter],
             optimizer: torch.optim.Optimizer, result: FinetuneResult, *, grad_clip: float | None,
             guards: UpdateGuards, reference: Sequence[torch.Tensor] | None) -> str | None:
    """One guarded step on `batch`; the reason to stop before (or instead of) it, or None when it was taken."""
    loss = loss_fn(batch)
    value = float(loss.detach())
    result.losses.append(value)
    if not math.isfinite(value):
        return "nonfinite_loss"
    if guards.loss_ratio_stop is not None and len(result.losses) > 1 and \
            value > abs(result.losses[0]) * guards.loss_ratio_stop:
        return "loss_ratio"
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = grad_norm(params)
    if not math.isfinite(norm):
        return "nonfinite_grad"
    result.grad_norm = norm
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    # the step's checkpoint (LoRA-sized: cheap) only when a guard may roll it back
    saved = ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())) \
        if guards.checks_updates else None
    optimizer.step()
    if saved is not None:
        breach, step_norm = _breach_after_update(params, saved[0], reference, guards)
        if breach is not None:
            with torch.no_grad():
                for p, old in zip(params, saved[0]):
                    p.copy_(old)
            optimizer.load_state_dict(saved[1])
            return breach
        result.update_norm = step_norm
    return None


def finetune_on_texts(model: nn.Module, loss_fn: Callable[[list[str]], torch.Tensor], texts: Sequence[str], *,
                      lr: float = 1e-3, epochs: int = 1, grad_clip: float | None = 1.0,
                      one_step_per_neighbour: bool = True,
                      params: Sequence[nn.Parameter] | None = None,
                      optimizer: torch.optim.Optimizer | None = None,
                      guards: UpdateGuards | None = None,
                      reference: Sequence[torch.Tensor] | None = None) -> FinetuneResult:
    """Fine-tune the trainable parameters on `texts`; a fresh Adam(lr) unless `optimizer` is given.

    `one_step_per_neighbour=True` is Hardt & Sun's TTT-NN: one gradient step per text, in the
    order given (pass neighbours nearest first, as the paper does), `epochs` passes. With
    False, each epoch is one step on all texts together. A non-finite loss or gradient stops
    the loop before that step's update (the caller decides whether to restore). `guards` (see
    UpdateGuards) stop the loop too; an update-norm breach rolls that step back (parameters and
    optimiser state, bit for bit) and keeps the earlier steps. `reference` holds the values the
    cumulative cap measures from, in `params` order. The model is in train mode while it
    trains and back in its old mode after.
    """
    if not texts:
        return FinetuneResult([], 0, "steps_done", None)
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"finetune_on_texts: {type(model).__name__} has no trainable parameters")
    guards = guards or UpdateGuards()
    if guards.max_cumulative_update_norm is not None and reference is None:
        raise ValueError("finetune_on_texts: max_cumulative_update_norm needs `reference` (the values it measures from)")
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(params, lr=lr)
    batches = [[t] for t in texts] if one_step_per_neighbour else [list(texts)]
    was_training = model.training
    model.train()
    result = FinetuneResult([], 0, "steps_done", None)
    try:
        for _ in range(epochs):
            for batch in batches:
                stop = _step_on(batch, loss_fn, params, optimizer, result, grad_clip=grad_clip, guards=guards,
                                reference=reference)
                if stop is not None:
                    result.stop_reason = stop
                    return result
                result.steps += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return result
