"""ROID (Marsden et al., WACV 2024, "Universal Test-time Adaptation through Weight Ensembling,
Diversity Weighting, and Prior Correction").

Reference: mariodoebler/test-time-adaptation `classification/methods/roid.py` and its defaults
(conf.py ROID.*; CIFAR-10-C: Adam lr 1e-3, beta 0.9, batch 200). Tent's setup (BatchNorm on
test-batch statistics, normalisation affine parameters trainable). Per step, on the forward's
logits z (probabilities p):
  1. weights (no gradient): diversity w_div = 1 - cos(p_i, m) with m the moving average of the
     batch-mean probabilities (starts uniform), min-max normalised over the batch; samples with
     w_div below its batch mean are masked out; certainty w_cert = -entropy, min-max normalised;
     w = exp(w_div x w_cert / temperature) (0 where masked); then m <- 0.9 m + 0.1 mean(p);
  2. loss = sum over unmasked samples of w x SLR(z) / batch_size, SLR the soft likelihood ratio
     -sum_c p_c log(p_c / (1 - p_c) + 1e-5) with p clipped to 0.99;
  3. plus the consistency term: sum over unmasked samples of w x SCE(z_aug, z) / batch_size, SCE
     the symmetric cross-entropy (alpha 0.5) against the model's output on an augmented view
     (gradient through both sides, as the reference);
  4. after the optimiser step, weight ensembling of the trainable parameters with the source:
     theta <- momentum_src x theta + (1 - momentum_src) x theta_source;
  5. prediction (`same_forward`: this forward's logits; `after_update`: a fresh forward) with
     prior correction: the logits are multiplied by the smoothed batch prior
     (prior + s) / (1 + s C), s = max(1/N, 1/C) / max(prior), exactly as the reference multiplies
     its output tensor (logits, not probabilities).
Deviation on purpose: the reference's augmented view is CoTTA's transform without blur and noise
(reflect padding); here it is the adapter's `augment` hook (CoTTA's full transform: the same
jitter and affine plus a light blur and noise 0.005), flipped with `roid.flips`. Analysis
fields: n_loss_samples (unmasked), sample_weight_mean (over them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ttt.losses import softmax_entropy
from ttt.methods.base import GradientMethod, seeded_generator
from ttt.methods.parts import augmented_view
from ttt.params import ema_update_, use_batch_norm_stats


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    probs = logits.softmax(1).clamp(0.0, clip)
    return -(probs * torch.log(probs / (1.0 - probs) + eps)).sum(1)


def symmetric_cross_entropy(x: torch.Tensor, x_ref: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    return -(1 - alpha) * (x_ref.softmax(1) * x.log_softmax(1)).sum(1) \
        - alpha * (x.softmax(1) * x_ref.log_softmax(1)).sum(1)


def _min_max(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min())


def roid_weights(probs: torch.Tensor, logits: torch.Tensor, class_probs: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, mask): certainty x diversity weights, and True where a sample is masked out."""
    w_div = _min_max(1.0 - F.cosine_similarity(class_probs.unsqueeze(0), probs, dim=1))
    mask = w_div < w_div.mean()
    w_cert = _min_max(-softmax_entropy(logits))
    weights = torch.exp(w_div * w_cert / temperature)
    weights[mask] = 0.0
    return weights, mask


def prior_correction(logits: torch.Tensor) -> torch.Tensor:
    """Multiply the output by the smoothed batch prior, as the reference does (on logits)."""
    n, c = logits.shape
    prior = logits.softmax(1).mean(0)
    smooth = max(1.0 / n, 1.0 / c) / prior.max()
    return logits * ((prior + smooth) / (1.0 + smooth * c))


class ROID(GradientMethod):
    name = "roid"
    analysis_columns = GradientMethod.analysis_columns + ("n_loss_samples", "sample_weight_mean")
    required_hooks = ("augment",)

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)
        self.class_probs: torch.Tensor | None = None  # uniform once the number of classes is known

    def reseed(self) -> None:
        self._augment_generator = seeded_generator(self.cfg.seed, f"{self.name}.augment")

    def reset(self) -> None:
        super().reset()
        self.class_probs = None

    @property
    def loss_cfg(self):
        """The block the loss, prior correction and views read (CMF reuses them with its own)."""
        return self.cfg.roid

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        c = self.loss_cfg
        logits = self.model(inputs)
        n_classes = logits.shape[1]
        if self.class_probs is None:
            self.class_probs = torch.full((n_classes,), 1.0 / n_classes, device=logits.device)
        keep = torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        weights = torch.ones(len(logits), device=logits.device)
        if c.use_weighting:
            with torch.no_grad():
                probs = logits.softmax(1)
                weights, mask = roid_weights(probs, logits, self.class_probs, c.temperature)
                keep = ~mask
                self.class_probs = c.momentum_probs * self.class_probs + (1 - c.momentum_probs) * probs.mean(0)
        # the reference divides by the configured batch size, not the batch's (a short last batch weighs less)
        batch_size = self.cfg.batch_size
        slr = (soft_likelihood_ratio(logits) * weights)[keep]
        loss = slr.sum() / batch_size
        parts = {"entropy": float(loss.detach())}
        if c.use_consistency:
            view = augmented_view(self.adapter, inputs[keep], self._augment_generator, c.flips)
            consistency = (symmetric_cross_entropy(self.model(view), logits[keep]) * weights[keep]).sum() / batch_size
            parts["consistency"] = float(consistency.detach())
            loss = loss + consistency
        self.batch_stats = {"n_loss_samples": int(keep.sum()),
                            "sample_weight_mean": float(weights[keep].mean()) if bool(keep.any()) else None}
        return loss, logits, parts

    def after_step(self) -> None:
        ema_update_(self.params, self.source_params(), self.cfg.roid.momentum_src)

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return prior_correction(logits.detach()) if self.loss_cfg.use_prior_correction else logits

    def predict_after_update(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.prediction_logits(self.model(inputs))
