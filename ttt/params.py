"""Which parameters a method may update (update filters), and snapshot / restore of state."""
from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

UpdateFilter = Literal["all", "norm_only", "adapter_only"]
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class UpdateFilterError(ValueError):
    pass


def select_params(model: nn.Module, update_filter: UpdateFilter) -> list[nn.Parameter]:
    """Mark the filtered parameters trainable (and only them) and return them in a stable order."""
    model.requires_grad_(False)
    if update_filter == "all":
        params = list(model.parameters())
    elif update_filter == "norm_only":
        params = [p for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)]
    elif update_filter == "adapter_only":
        params = [p for n, p in model.named_parameters() if "lora_" in n or ".adapter" in n]
        if not params:
            raise UpdateFilterError(
                f"update_filter=adapter_only: model {type(model).__name__} has no adapter (LoRA) parameters"
            )
    else:
        raise UpdateFilterError(f"unknown update_filter {update_filter!r}")
    for p in params:
        p.requires_grad_(True)
    return params


def use_batch_norm_stats(model: nn.Module) -> None:
    """BatchNorm normalises with the test batch's statistics (Tent's BN baseline and its setup)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of parameters and buffers (restorable with `restore`)."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        own = model.state_dict(keep_vars=True)
        for k, v in state.items():
            own[k].copy_(v)


def frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone
