"""alpha-BN (Schneider et al., NeurIPS 2020, "Improving robustness against common corruptions by
covariate shift adaptation"; the "BN-alpha" / "BN-1" baseline of mariodoebler/test-time-adaptation).

Reference: mariodoebler/test-time-adaptation `classification/methods/bn.py` (AlphaBatchNorm, after
bethgelab/robustness `robusta/batchnorm/bn.py`) and `methods/norm.py` (BNAlpha), default
BN.ALPHA = 0.1 (`cfgs/cifar10_c/norm_alpha.yaml`, batch size 1 there).
No parameter changes: every BatchNorm normalises with the mix
    mean = (1 - alpha) x source running mean + alpha x test-batch mean   (the same for the variance)
and its own affine parameters. alpha = 0 is the source model (`source`), alpha = 1 normalises by the
test batch alone (`norm`). A model without BatchNorm (with running statistics) is refused at
start-up in one line: there is nothing to mix.
Deviation on purpose: the reference estimates the test variance with a momentum-1 BatchNorm, i.e.
the unbiased batch variance; here it is the biased one that BatchNorm normalises with in training
mode, so alpha = 1 equals `norm` exactly (the two differ by n / (n - 1), n = batch x pixels).
`AlphaBN` is also MEMO's normalisation (ttt/methods/memo.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ttt.methods.base import Method


class AlphaBN(nn.Module):
    """A BatchNorm that normalises with (1 - alpha) x its source statistics + alpha x the batch's.
    Keeps the BatchNorm's parameter and buffer names, so a state_dict of the model maps onto it."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, alpha: float):
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False) to mix with")
        self.alpha, self.eps = float(alpha), bn.eps
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.weight = nn.Parameter(bn.weight.detach().clone(), requires_grad=bn.weight.requires_grad) \
            if bn.weight is not None else None
        self.bias = nn.Parameter(bn.bias.detach().clone(), requires_grad=bn.bias.requires_grad) \
            if bn.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0.0:  # exactly the source model's BatchNorm in eval mode
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        batch_var, batch_mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], unbiased=False)
        mean = (1.0 - self.alpha) * self.running_mean + self.alpha * batch_mean
        var = (1.0 - self.alpha) * self.running_var + self.alpha * batch_var
        shape = [1, -1] + [1] * (x.dim() - 2)  # by hand: the batch part carries gradient (MEMO)
        x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            x = x * self.weight.view(shape)
        return x + self.bias.view(shape) if self.bias is not None else x


def convert_to_alpha_bn(model: nn.Module, alpha: float) -> int:
    """Replace every BatchNorm of `model` in place by an AlphaBN; returns how many."""
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AlphaBN(getattr(parent, child), alpha))
    return len(targets)


class BNAlpha(Method):
    name = "bn_alpha"

    def configure(self) -> None:
        super().configure()
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            raise ValueError(f"bn_alpha mixes BatchNorm statistics, and model {type(self.model).__name__} has no "
                             "BatchNorm layer")
        convert_to_alpha_bn(self.model, self.cfg.bn_alpha.alpha)
