"""Losses and class-distribution statistics shared by the gradient methods."""
from __future__ import annotations

import math

import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of softmax(logits), as in Tent."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def class_distribution(logits: torch.Tensor) -> dict[str, float]:
    """Batch-level collapse indicators: normalised entropy of the mean prediction,
    its largest class probability, and how many classes the batch predicts."""
    with torch.no_grad():
        mean_prob = logits.float().softmax(1).mean(0)
        n_classes = logits.shape[1]
        ent = -(mean_prob * mean_prob.clamp_min(1e-12).log()).sum().item()
        return {
            "class_entropy": ent / math.log(n_classes) if n_classes > 1 else 0.0,
            "max_class_prob": mean_prob.max().item(),
            "unique_classes": int(logits.argmax(1).unique().numel()),
        }


def diversity_loss(logits: torch.Tensor) -> torch.Tensor:
    """1 - normalised entropy of the batch-mean prediction: 0 when classes are balanced,
    1 when every sample predicts the same class (differentiable)."""
    mean_prob = logits.softmax(1).mean(0)
    ent = -(mean_prob * mean_prob.clamp_min(1e-12).log()).sum()
    return 1.0 - ent / math.log(logits.shape[1])


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the student against the teacher's softmax (CoTTA's
    consistency loss, its CIFAR form). The teacher side carries no gradient."""
    return -(teacher_logits.detach().softmax(1) * student_logits.log_softmax(1)).sum(1)


def masked_mse(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels only (MAE-style: the visible pixels are given,
    so reconstructing them teaches nothing). `mask` is True where the input was masked and
    broadcasts over channels; with nothing masked the loss is 0 (and so is its gradient)."""
    mask = mask.expand_as(target).to(reconstruction.dtype)
    return ((reconstruction - target).pow(2) * mask).sum() / mask.sum().clamp_min(1.0)
