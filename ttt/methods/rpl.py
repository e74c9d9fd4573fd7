"""RPL (Rusak et al., TMLR 2022, "If your data distribution shifts, use self-learning"): robust
pseudo-labelling with the generalised cross-entropy.

Reference: mariodoebler/test-time-adaptation `classification/methods/rpl.py` (after oripress/CCC
`models/rpl.py`) and `utils/losses.py` GeneralizedCrossEntropy; defaults RPL.Q = 0.8 and
`cfgs/cifar10_c/rpl.yaml`: Adam lr 1e-3, beta 0.9, 1 step, batch 200.
Tent's setup: BatchNorm on test-batch statistics, the normalisation layers' affine parameters
trainable (`update_filter: norm_only`). Per step, on the forward's logits z:
    y = argmax z (hard pseudo-labels, no gradient), loss = mean over the batch of (1 - p_y^q) / q,
which is the cross-entropy as q -> 0 and the (noise-robust) MAE at q = 1. The prediction is that
forward's output (`same_forward`). No deviation.
Analysis fields: n_loss_samples (the batch); the GCE loss is `losses`.
"""
from __future__ import annotations

import torch

from ttt.methods.base import GradientMethod
from ttt.params import use_batch_norm_stats


def generalized_cross_entropy(logits: torch.Tensor, q: float, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample (1 - p_target^q) / q, targets = the argmax when not given."""
    probs = logits.softmax(1)
    if targets is None:
        targets = probs.argmax(1)
    return (1.0 - probs.gather(1, targets.unsqueeze(1)).squeeze(1) ** q) / q


class RPL(GradientMethod):
    name = "rpl"
    analysis_columns = GradientMethod.analysis_columns + ("n_loss_samples",)

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits = self.model(inputs)
        labels = logits.detach().argmax(1)
        loss = generalized_cross_entropy(logits, self.cfg.rpl.q, labels).mean()
        self.batch_stats = {"n_loss_samples": len(logits)}
        return loss, logits, {"gce": float(loss.detach())}
