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
        if not params:
            raise UpdateFilterError(
                f"update_filter=norm_only: model {type(model).__name__} has no normalisation layers with affine "
                "parameters (BatchNorm, LayerNorm, GroupNorm) to adapt; set ttt.update_filter=all or use another model"
            )
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


# The top of the network SAR and DeYO leave alone (mr-eggplant/SAR and Jhyun17/DeYO `collect_params`,
# kept by mariodoebler/test-time-adaptation): `layer4` of a ResNet, blocks 9-11 of a ViT-B and its
# final `norm`; substring matches on module names, as the references match them.
REFERENCE_TOP_EXCLUSIONS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


def reference_norm_params(model: nn.Module, method: str) -> list[nn.Parameter]:
    """SAR's / DeYO's parameter set: the affine parameters of the normalisation layers (BatchNorm,
    LayerNorm, GroupNorm) outside REFERENCE_TOP_EXCLUSIONS and the module named `norm`, marked
    trainable (and only them). Names are the model's own (a class-subset wrapper is looked through)."""
    base = getattr(model, "model", model) if type(model).__name__ == "SubsetLogits" else model
    model.requires_grad_(False)
    params = []
    for name, m in base.named_modules():
        if any(x in name for x in REFERENCE_TOP_EXCLUSIONS) or name == "norm":
            continue
        if isinstance(m, NORM_TYPES):
            params += [p for n, p in m.named_parameters(recurse=False) if n in ("weight", "bias")]
    if not params:
        raise UpdateFilterError(
            f"{method}: update_filter=norm_only: model {type(base).__name__} has no normalisation layers with affine "
            "parameters outside the top layers its reference leaves alone; set ttt.update_filter=all")
    for p in params:
        p.requires_grad_(True)
    return params


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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


def param_names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """The state_dict names of `params`, in their order (to find their source values by name)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


class StepCheckpoint:
    """What one optimiser step can change: the trainable parameters, every buffer (BatchNorm
    running statistics move in train-mode forwards, before any backward) and the optimiser
    state (Adam's moments and step count). `rollback` puts all three back bit for bit."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer):
        self.params = params
        self.saved_params = [p.detach().clone() for p in params]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.optimizer = optimizer
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())

    def update_norm(self) -> float:
        """L2 norm of the change of the trainable parameters since the checkpoint."""
        return distance(self.params, self.saved_params)

    def rollback(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, self.saved_params):
                p.copy_(saved)
            for b, saved in self.buffers:
                b.copy_(saved)
        self.optimizer.load_state_dict(self.optimizer_state)


def distance(params: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """L2 distance between two parameter lists taken as one flat vector (inf if non-finite)."""
    if not params:
        return 0.0
    with torch.no_grad():
        # one device sync for the whole list, not one per tensor
        squares = torch.stack([(p.detach().float() - r.float()).pow(2).sum() for p, r in zip(params, refs)])
        return float(squares.sum().sqrt())


def grad_norm(params: list[nn.Parameter]) -> float:
    """L2 norm of all gradients together (before clipping); nan/inf when any gradient is."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], alpha: float) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student, in place (the mean teacher of CoTTA).

    Written as a lerp, teacher + (1 - alpha) * (student - teacher): where student and teacher
    are equal (parameters no step has moved) the teacher stays bit-identical, which
    alpha * t + (1 - alpha) * t does not guarantee in floating point.
    """
    with torch.no_grad():
        for t, s in zip(teacher, student):
            t.lerp_(s.detach(), 1.0 - alpha)


def stochastic_restore_(params: list[torch.Tensor], sources: list[torch.Tensor], prob: float,
                        generator: torch.Generator) -> int:
    """Reset each element of `params` to its source value with probability `prob` (CoTTA).

    The mask is drawn on the CPU from `generator` so a seed gives the same restores on every
    device. Returns how many elements were restored.
    """
    restored = 0
    with torch.no_grad():
        for p, src in zip(params, sources):
            mask = (torch.rand(p.shape, generator=generator) < prob).to(p.device)
            p.copy_(torch.where(mask, src.to(p.device, p.dtype), p))
            restored += int(mask.sum())
    return restored
