"""SAR (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild World").

Reference: mr-eggplant/SAR `sar.py` + `sam.py`, and its benchmark form in
mariodoebler/test-time-adaptation `classification/methods/sar.py` (CIFAR-10-C: SGD momentum 0.9,
lr 1e-3, batch 200; SAR's own defaults: e_margin 0.4 x ln C, rho 0.05, e_m 0.2). Normalisation
layers train (BatchNorm on test-batch statistics, LayerNorm / GroupNorm as they are), so it works
with batch size 1 and with BN-free models. Per step:
  1. first forward; reliable samples S1: entropy < E0 = e_margin x ln C; loss1 = mean entropy on
     S1 (its output is the prediction, `same_forward`); backward;
  2. SAM ascent: theta + e, e = rho g / (||g|| + 1e-12), ||g|| over all trainable gradients;
  3. second forward at theta + e; among S1, reliable samples S2 under E0 again;
     loss2 = mean entropy on S2; if finite, ema <- 0.9 ema + 0.1 loss2 (first value: loss2);
  4. back to theta, the base optimiser steps with the gradient taken at theta + e;
  5. model recovery: if ema < e_m, the model goes back to the source weights and the ema is
     forgotten; the base optimiser's momentum is kept, as both references keep it (their reset
     reloads the SAM wrapper's state_dict, which does not hold the base SGD's momentum buffers).
     Every other reset (episodic, domain change, a shard's start) starts the optimiser afresh.
No sample under E0 in the first forward: no update (`all_filtered`); the reference would still
take an SGD momentum-only step on zero gradients there. The guards apply to the whole SAM step
(grad_clip clips the first gradient). With `update_filter: norm_only` the parameters are the
references' (`collect_params`): normalisation affine parameters except the top layers of a ResNet
or ViT (`layer4`, `blocks.9-11`, the final `norm`; ttt.params.reference_norm_params); other
filters select as for every method. Analysis fields: n_reliable (S1), n_loss_samples (S2), loss_ema,
recovered; `stop_reason: model_recovery` on the batch that recovered.
"""
from __future__ import annotations

import math

import torch

from ttt.losses import softmax_entropy
from ttt.methods.base import GradientMethod, StepResult
from ttt.params import reference_norm_params, restore, select_params, use_batch_norm_stats


class SAR(GradientMethod):
    name = "sar"
    analysis_columns = GradientMethod.analysis_columns + ("n_reliable", "n_loss_samples", "loss_ema", "recovered")

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)
        self.loss_ema: float | None = None
        self.n_recoveries = 0
        self._reliable: torch.Tensor | None = None
        self._margin = 0.0

    def trainable_params(self) -> list[torch.nn.Parameter]:
        if self.cfg.update_filter == "norm_only":
            return reference_norm_params(self.model, self.name)
        return select_params(self.model, self.cfg.update_filter)

    def reset(self) -> None:
        super().reset()
        self.loss_ema = None

    def recover(self) -> None:
        """SAR's model recovery: the source weights back, the base optimiser's momentum kept."""
        restore(self.model, self.source_state)
        self.loss_ema = None

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
        logits = self.model(inputs)
        self._margin = self.cfg.sar.e_margin * math.log(logits.shape[1])
        entropy = softmax_entropy(logits)
        self._reliable = entropy < self._margin
        self.batch_stats.update(n_reliable=int(self._reliable.sum()), recovered=False)
        if not bool(self._reliable.any()):
            return None, logits, {}
        loss = entropy[self._reliable].mean(0)
        return loss, logits, {"entropy": float(loss.detach())}

    def sam_perturbation(self) -> list[torch.Tensor | None]:
        """e = rho g / (||g|| + 1e-12) per parameter (None where a parameter got no gradient)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:  # no trainable parameter on the loss path: nothing to perturb
            return [None] * len(self.params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = self.cfg.sar.rho / (norm + 1e-12)
        return [None if p.grad is None else p.grad * scale for p in self.params]

    def apply_update(self, inputs: torch.Tensor) -> None:
        perturbation = self.sam_perturbation()
        theta = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, perturbation):
                if e is not None:
                    p.add_(e)  # climb to theta + e
        self.optimizer.zero_grad(set_to_none=True)
        entropy2 = softmax_entropy(self.model(inputs))[self._reliable]
        loss2 = entropy2[entropy2 < self._margin].mean(0)
        value = float(loss2.detach())
        if not math.isnan(value):
            m = self.cfg.sar.ema_momentum
            self.loss_ema = value if self.loss_ema is None else m * self.loss_ema + (1.0 - m) * value
        # the reference backpropagates even an empty (nan) mean: zero gradients, a momentum-only step
        loss2.backward()
        with torch.no_grad():
            for p, saved in zip(self.params, theta):
                p.copy_(saved)  # back to theta exactly, as the reference restores its copy
        self.optimizer.step()
        self.batch_stats.update(n_loss_samples=int((entropy2 < self._margin).sum()), loss_ema=self.loss_ema)

    def after_step(self) -> None:
        if self.loss_ema is not None and self.loss_ema < self.cfg.sar.reset_constant:
            self.recover()
            self.n_recoveries += 1
            self.batch_stats["recovered"] = True

    def step(self, inputs: torch.Tensor) -> StepResult:
        result = super().step(inputs)
        if result.record.get("recovered"):
            result.record["stop_reason"] = "model_recovery"
        return result
