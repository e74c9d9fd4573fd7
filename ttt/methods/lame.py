"""LAME (Boudiaf et al., CVPR 2022, "Parameter-free Online Test-time Adaptation").

Reference: fiveai/LAME `src/adaptation/lame.py` (defaults: affinity rbf, knn 5, bound_lambda 1,
100 bound iterations), as in mariodoebler/test-time-adaptation `classification/methods/lame.py`.
No parameter changes: the source model in eval mode (its own BatchNorm statistics) gives, per
batch, class probabilities p and features f (the adapter's `embed` hook: the input of the
classifier head). LAME then solves the Laplacian-regularised maximum likelihood over the batch's
assignments Y by its bound iterations:
  Y <- softmax(log p + bound_lambda x W Y), starting from Y = p,
until the energy sum(-log p . Y - bound_lambda (W Y) . Y + Y log Y) changes by at most 1e-8 of
itself (after at least 3 iterations) or max_steps. W is the affinity of the L2-normalised
features: `knn` (1 for each of the k nearest other samples), `rbf` (exp(-d^2 / 2 s^2), s the
mean distance to the knn-th nearest sample counting the sample itself, as the reference) or
`linear` (f_i . f_j); `force_symmetry` averages W with its transpose. The prediction is Y
(returned as log Y, so softmax gives Y back); `same_forward` and `after_update` coincide.
Analysis field: n_changed (predictions LAME changed against the model's own argmax).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ttt.losses import class_distribution
from ttt.methods.base import Method, StepResult


def affinity_matrix(features: torch.Tensor, kind: str, knn: int) -> torch.Tensor:
    n = features.shape[0]
    if kind == "linear":
        return features @ features.t()
    # exact distances: cdist's default matrix-product shortcut (|a|^2 + |b|^2 - 2ab) leaves
    # self-distances near 1e-3 instead of 0, which can push a true nearest neighbour out of the kNN
    dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
    if kind == "knn":
        neighbours = dist.topk(min(knn + 1, n), dim=-1, largest=False).indices[:, 1:]  # drop the sample itself
        return torch.zeros(n, n, dtype=features.dtype, device=features.device).scatter_(1, neighbours, 1.0)
    sigma = dist.topk(min(knn, n), dim=-1, largest=False).values[:, -1].mean()
    return torch.exp(-dist ** 2 / (2 * sigma ** 2))


def entropy_energy(y: torch.Tensor, unary: torch.Tensor, pairwise: torch.Tensor, bound_lambda: float) -> float:
    return float((unary * y - bound_lambda * pairwise * y + y * torch.log(y.clip(1e-20))).sum())


def laplacian_optimization(unary: torch.Tensor, kernel: torch.Tensor, bound_lambda: float = 1.0,
                           max_steps: int = 100) -> tuple[torch.Tensor, int]:
    """The reference's bound iterations; returns (Y, iterations run)."""
    y = (-unary).softmax(-1)
    old_energy = float("inf")
    for i in range(max_steps):
        pairwise = bound_lambda * kernel.matmul(y)
        y = (-unary + pairwise).softmax(-1)
        energy = entropy_energy(y, unary, pairwise, bound_lambda)
        if i > 1 and abs(energy - old_energy) <= 1e-8 * abs(old_energy):
            return y, i + 1
        old_energy = energy
    return y, max_steps


class LAME(Method):
    name = "lame"
    analysis_columns = ("n_changed",)
    required_hooks = ("embed",)

    def step(self, inputs: torch.Tensor) -> StepResult:
        c = self.cfg.lame
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self.adapter.forward(inputs)
            features = self.adapter.embed(inputs)
        t_forward = time.perf_counter() - t0
        with torch.no_grad():
            probs = logits.softmax(1)
            unary = -torch.log(probs + 1e-10)
            kernel = affinity_matrix(F.normalize(features.flatten(1), p=2, dim=-1), c.affinity, c.knn)
            if c.force_symmetry:
                kernel = 0.5 * (kernel + kernel.t())
            y, _ = laplacian_optimization(unary, kernel, c.bound_lambda, c.max_steps)
            adjusted = torch.log(y.clamp_min(1e-30))
        record = {"steps": 0, "stop_reason": "no_adaptation", "updated_param_count": 0,
                  "timing_forward_pass": t_forward, "timing_fine_tuning": time.perf_counter() - t0 - t_forward,
                  "n_changed": int((adjusted.argmax(1) != logits.argmax(1)).sum()),
                  **class_distribution(adjusted)}
        return StepResult(adjusted, record)
