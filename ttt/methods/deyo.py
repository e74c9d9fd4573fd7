"""DeYO (Lee et al., ICLR 2024, "Entropy is not Enough for Test-Time Adaptation: From the
Perspective of Disentangled Factors").

Reference: Jhyun17/DeYO `methods/deyo.py`, and its benchmark form in mariodoebler/test-time-adaptation
`classification/methods/deyo.py` (CIFAR-10-C: Adam lr 1e-3, beta 0.9, batch 200; DeYO's defaults:
margin 0.5 x ln C, margin_e0 0.4 x ln C, PLPD threshold 0.2, patch shuffle with a 4 x 4 grid,
both re-weightings on). Tent's setup (BatchNorm on test-batch statistics, normalisation affine
parameters trainable; with `update_filter: norm_only`, the reference's `collect_params`: not the
top layers of a ResNet / ViT, `layer4`, `blocks.9-11` and the final `norm`). Per step:
  1. forward; keep samples with entropy E < margin x ln C (S1);
  2. the object-destructive view x' of S1: its patches shuffled (`aug_type: patch`, a fresh
     permutation per image) or its pixels permuted (`pixel`); forward x' without gradient
     (BatchNorm normalises x' with its own batch statistics, as in the reference);
  3. PLPD = p(y_hat | x) - p(y_hat | x'), y_hat = argmax p(. | x); keep S1 samples with
     PLPD > plpd_threshold (S2);
  4. loss = mean over S2 of E x (exp(-(E - margin_e0 x ln C)) + exp(PLPD)) with the enabled
     re-weightings (the weights carry no gradient); no update when S1 or S2 is empty.
The prediction is the first forward's output (`same_forward`). The shuffle draws from a generator
seeded from cfg.seed (restarted at every reset). The reference's `occ` (occlusion) view needs
ImageNet-sized windows and is not offered. Analysis fields: n_reliable (S1), n_filtered_plpd
(S1 minus S2), n_loss_samples (S2), sample_weight_mean.
"""
from __future__ import annotations

import math

import torch

from ttt.augment import patch_shuffle, pixel_shuffle
from ttt.losses import softmax_entropy
from ttt.methods.base import GradientMethod, seeded_generator
from ttt.params import reference_norm_params, select_params, use_batch_norm_stats


def plpd(probs: torch.Tensor, probs_shuffled: torch.Tensor) -> torch.Tensor:
    """Pseudo-label probability difference: p(y_hat | x) - p(y_hat | x'), y_hat = argmax p(. | x)."""
    label = probs.argmax(1, keepdim=True)
    return (probs.gather(1, label) - probs_shuffled.gather(1, label)).reshape(-1)


class DeYO(GradientMethod):
    name = "deyo"
    analysis_columns = GradientMethod.analysis_columns + ("n_reliable", "n_filtered_plpd", "n_loss_samples", "sample_weight_mean")

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)
        self.last_shuffled: torch.Tensor | None = None  # the x' of the last step (for inspection)

    def trainable_params(self) -> list[torch.nn.Parameter]:
        if self.cfg.update_filter == "norm_only":
            return reference_norm_params(self.model, self.name)
        return select_params(self.model, self.cfg.update_filter)

    def reseed(self) -> None:
        self._shuffle_generator = seeded_generator(self.cfg.seed, "deyo.shuffle")

    def destroy(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg.deyo
        if c.aug_type == "patch":
            return patch_shuffle(x, c.patch_len, self._shuffle_generator)
        return pixel_shuffle(x, self._shuffle_generator)

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
        c = self.cfg.deyo
        logits = self.model(inputs)
        n_classes = logits.shape[1]
        entropy = softmax_entropy(logits)
        reliable = entropy < c.margin * math.log(n_classes)
        n_reliable = int(reliable.sum())
        self.batch_stats = {"n_reliable": n_reliable, "n_filtered_plpd": 0, "n_loss_samples": 0,
                            "sample_weight_mean": None}
        if n_reliable == 0:
            return None, logits, {}
        self.last_shuffled = self.destroy(inputs[reliable].detach())
        with torch.no_grad():
            probs_shuffled = self.model(self.last_shuffled).softmax(1)
        difference = plpd(logits[reliable].softmax(1), probs_shuffled)
        keep = difference > c.plpd_threshold
        kept_entropy, kept_plpd = entropy[reliable][keep], difference[keep].detach()
        self.batch_stats.update(n_filtered_plpd=n_reliable - len(kept_entropy), n_loss_samples=len(kept_entropy))
        if len(kept_entropy) == 0:
            return None, logits, {}
        if c.reweight_ent or c.reweight_plpd:
            weight = float(c.reweight_ent) * torch.exp(c.margin_e0 * math.log(n_classes) - kept_entropy.detach()) \
                + float(c.reweight_plpd) * torch.exp(kept_plpd)
            self.batch_stats["sample_weight_mean"] = float(weight.mean())
            kept_entropy = kept_entropy * weight
        loss = kept_entropy.mean(0)
        return loss, logits, {"entropy": float(loss.detach())}
