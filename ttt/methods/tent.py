"""Tent (Wang et al. 2021): minimise prediction entropy on the normalisation affine parameters,
with BatchNorm normalising by test-batch statistics."""
from __future__ import annotations

import torch

from ttt.losses import softmax_entropy
from ttt.methods.base import GradientMethod
from ttt.params import use_batch_norm_stats


class Tent(GradientMethod):
    name = "tent"

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits = self.model(inputs)
        loss = softmax_entropy(logits).mean()
        return loss, logits, {"entropy": float(loss.detach())}
