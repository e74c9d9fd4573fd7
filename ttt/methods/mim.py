"""MIM: test-time training by masked-input reconstruction (MAE-style TTT, Gandelsman et al. 2022).

Each step masks random patches of the batch, reconstructs it through the adapter's
`reconstruct` hook and minimises the squared error on the masked pixels. Which parameters
move is the update filter's business; on SmallCNN the encoder is shared by the classifier and
the decoder, so the reconstruction gradient reaches the classifier through the features.

What "same forward" means here: the masked forward cannot give the prediction (the classifier
must see the whole, unmasked input), so each step also runs the classifier on the clean batch
with the parameters the step starts from. `same_forward` predicts from that clean forward of
the last step, i.e. before the last update, as Tent and CoTTA predict before theirs;
`after_update` predicts with one more clean forward after the last update.
"""
from __future__ import annotations

import torch

from ttt.augment import patch_mask
from ttt.losses import masked_mse
from ttt.methods.base import GradientMethod, StepResult, seeded_generator
from ttt.params import use_batch_norm_stats


class MIM(GradientMethod):
    name = "mim"
    analysis_columns = GradientMethod.analysis_columns + ("mask_ratio",)
    required_hooks = ("reconstruct",)

    def configure(self) -> None:
        super().configure()
        # test-batch statistics, as in Tent; the default source model was trained with
        # reconstruction in train mode, so masked batches are normalised as in training
        use_batch_norm_stats(self.model)
        self._mask_ratios: list[float] = []

    def reseed(self) -> None:
        self._mask_generator = seeded_generator(self.cfg.seed, "mim.mask")

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        m = self.cfg.mim
        # the clean forward carries a graph only when the diversity guard will put it in the loss
        with torch.set_grad_enabled(self.diversity_active):
            logits = self.model(inputs)
        mask = patch_mask(inputs.shape, m.mask_prob, m.patch_size, self._mask_generator).to(inputs.device)
        self._mask_ratios.append(float(mask.float().mean()))
        reconstruction = self.adapter.reconstruct(inputs.masked_fill(mask, m.mask_value))
        loss = masked_mse(reconstruction, inputs, mask)
        return loss, logits, {"reconstruction": float(loss.detach())}

    def step(self, inputs: torch.Tensor) -> StepResult:
        self._mask_ratios = []
        result = super().step(inputs)
        # realised, not configured: the fraction of pixels masked, averaged over this batch's steps
        ratios = self._mask_ratios
        result.record["mask_ratio"] = sum(ratios) / len(ratios) if ratios else None
        return result
