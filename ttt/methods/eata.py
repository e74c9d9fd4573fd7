"""EATA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting").

Reference: mr-eggplant/EATA `eata.py`, and its benchmark form in mariodoebler/test-time-adaptation
`classification/methods/eata.py` (whose CIFAR-10-C config gives our defaults: Adam lr 1e-3, beta
0.9, batch 200, e_margin 0.4 x ln C, d_margin 0.4, fisher_alpha 1, 2,000 clean samples).
Tent's setup (BatchNorm on test-batch statistics, normalisation affine parameters trainable:
`update_filter: norm_only`), and per step:
  1. reliable samples: entropy E < E0 = e_margin x ln C;
  2. non-redundant samples among those: |cosine(p, m)| < d_margin, where m is the moving average
     of the probabilities of the samples kept so far (m <- 0.9 m + 0.1 mean(p_kept); the first
     batch only initialises m and drops nothing as redundant);
  3. loss = mean over the kept samples of E x exp(E0 - E) (the weight carries no gradient),
     plus fisher_alpha x sum F (theta - theta_source)^2 when the Fisher term is on;
  4. no update when nothing is kept (`stop_reason: all_filtered`), as the reference.
The prediction is the output of the forward that computed the loss (`same_forward`).
The Fisher information F is the mean over batches (of cfg.batch_size clean samples) of the
squared gradient of the cross-entropy against the model's own argmax labels, computed once at
construction on the source model. Clean samples come from `eata.fisher_data` (an .npz with `x`, or
a Parquet manifest), decoded by the model adapter so they are normalised like the test stream;
`fisher_samples` of them are drawn with the run's seed. Without `fisher_data` the method is ETA.
Analysis fields: n_reliable, n_filtered_redundant, n_loss_samples, sample_weight_mean.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ttt.losses import softmax_entropy
from ttt.methods.base import GradientMethod
from ttt.params import use_batch_norm_stats


def load_clean_images(path: str, n: int, seed: int) -> np.ndarray:
    """`n` images (a seeded random subset) from an .npz (`x`) or a Parquet manifest (`pixels`)."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"ttt.eata.fisher_data: {path} does not exist")
    if file.suffix == ".npz":
        with np.load(file) as data:
            if "x" not in data:
                raise ValueError(f"ttt.eata.fisher_data: {path} has no array 'x' (arrays: {sorted(data.files)})")
            images = data["x"]
    elif file.suffix == ".parquet" or file.is_dir():
        import pyarrow.parquet as pq

        table = pq.read_table(file, columns=["pixels"])
        images = np.asarray(table.column("pixels").to_pylist(), dtype=np.float32)
    else:
        raise ValueError(f"ttt.eata.fisher_data: {path} is neither an .npz nor a Parquet manifest")
    if len(images) == 0:
        raise ValueError(f"ttt.eata.fisher_data: {path} holds no images")
    order = np.random.default_rng(seed).permutation(len(images))[:n]
    return images[np.sort(order)]


def fisher_information(model: torch.nn.Module, params: list[torch.nn.Parameter],
                       batches: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Per parameter, the mean over batches of the squared gradient of CE(model(x), argmax)
    (None for a parameter that gets no gradient). Leaves the gradients cleared."""
    sums: list[torch.Tensor | None] = [None] * len(params)
    for x in batches:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            logits = model(x)
            F.cross_entropy(logits, logits.argmax(1)).backward()
        for i, p in enumerate(params):
            if p.grad is not None:
                g2 = p.grad.detach() ** 2
                sums[i] = g2 if sums[i] is None else sums[i] + g2
    for p in params:
        p.grad = None
    return [None if s is None else s / len(batches) for s in sums]


class EATA(GradientMethod):
    name = "eata"
    analysis_columns = GradientMethod.analysis_columns + ("n_reliable", "n_filtered_redundant", "n_loss_samples", "sample_weight_mean")

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)
        self.class_probs: torch.Tensor | None = None  # moving average of the kept samples' probabilities
        self.fishers: list[torch.Tensor | None] | None = None
        self.fisher_anchor: list[torch.Tensor] = []
        c = self.cfg.eata
        if c.fisher_data is not None and c.fisher_alpha > 0.0:
            self.fishers = fisher_information(self.model, self.params, self._clean_batches())
            self.fisher_anchor = [p.detach().clone() for p in self.params]

    def _clean_batches(self) -> list[torch.Tensor]:
        c = self.cfg.eata
        images = load_clean_images(c.fisher_data, c.fisher_samples, self.cfg.seed)
        # each image keeps its layout (HW / CHW): a grey source converts to an RGB model's channels
        records: list[dict[str, Any]] = [{"sample_id": str(i), "pixels": img} for i, img in enumerate(images)]
        batches = []
        for batch in self.adapter.build_loader(records, batch_size=self.cfg.batch_size):
            if batch.errors:
                raise ValueError(f"ttt.eata.fisher_data: {c.fisher_data}: {batch.errors[0][1]}")
            batches.append(batch.inputs)
        return batches

    def reset(self) -> None:
        super().reset()
        self.class_probs = None

    def fisher_penalty(self) -> torch.Tensor | None:
        if self.fishers is None:
            return None
        terms = [(f * (p - p0) ** 2).sum() for f, p, p0 in zip(self.fishers, self.params, self.fisher_anchor)
                 if f is not None]
        return self.cfg.eata.fisher_alpha * torch.stack(terms).sum() if terms else None

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
        c = self.cfg.eata
        logits = self.model(inputs)
        e_margin = c.e_margin * math.log(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < e_margin
        kept_entropy, kept_probs = entropy[reliable], logits[reliable].softmax(1).detach()
        n_reliable = int(reliable.sum())
        if self.class_probs is not None:
            cosine = F.cosine_similarity(self.class_probs.unsqueeze(0), kept_probs, dim=1)
            fresh = cosine.abs() < c.d_margin
            kept_entropy, kept_probs = kept_entropy[fresh], kept_probs[fresh]
        self.class_probs = update_class_probs(self.class_probs, kept_probs)
        weight = torch.exp(e_margin - kept_entropy.detach())  # = 1 / exp(E - E0)
        self.batch_stats = {"n_reliable": n_reliable, "n_filtered_redundant": n_reliable - len(kept_entropy),
                            "n_loss_samples": len(kept_entropy),
                            "sample_weight_mean": float(weight.mean()) if len(weight) else None}
        if len(kept_entropy) == 0:
            return None, logits, {}
        entropy_loss = (kept_entropy * weight).mean(0)
        loss = entropy_loss
        penalty = self.fisher_penalty()
        parts = {"entropy": float(entropy_loss.detach())}
        if penalty is not None:
            loss = loss + penalty
            parts["fisher"] = float(penalty.detach())
        return loss, logits, parts


def update_class_probs(current: torch.Tensor | None, new_probs: torch.Tensor) -> torch.Tensor | None:
    """m <- 0.9 m + 0.1 mean(new); initialised by the first non-empty set (the reference's rule)."""
    with torch.no_grad():
        if len(new_probs) == 0:
            return current
        if current is None:
            return new_probs.mean(0)
        return 0.9 * current + 0.1 * new_probs.mean(0)
