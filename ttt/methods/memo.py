"""MEMO (Zhang, Levine & Finn, NeurIPS 2022, "MEMO: Test Time Robustness via Adaptation and
Augmentation"): marginal entropy over augmentations of a single test point.

Reference: mariodoebler/test-time-adaptation `classification/methods/memo.py` (after
zhangmarvin/memo) and `cfgs/cifar10_c/memo.yaml`: episodic, batch size 1, 32 augmented views,
SGD lr 5e-3, momentum 0.9, Nesterov (OPTIM.NESTEROV), 1 step, every weight and bias trainable
(`update_filter: all`), every BatchNorm an alpha-BN with alpha 0.1 (ttt/methods/bn_alpha.py).
Per test point x (each sample of a batch on its own, so any batch size means MEMO's single-point
protocol):
  1. n_augmentations views of x, each one call of the adapter's `augment` hook (its own parameter
     set), flipped with probability 0.5 when `memo.flips`;
  2. loss = H(p_bar), the entropy of the marginal p_bar = mean over the views of softmax(model(view))
     (computed in log space as the reference: logsumexp of the log-softmaxes minus log n);
  3. `ttt.steps` guarded updates, then the prediction is the adapted model on x alone (alpha-BN mixes
     that one image's statistics with the source's): `after_update`, as the reference.
With `ttt.episodic` (on in configs/mnistc_memo.yaml, as the reference) the model goes back to the
source before every test point, not only between batches.
Deviations on purpose: the views are CoTTA's transform (the `augment` hook), not AugMix (the
hook is what a user's model adapter supplies); the augmentation generator is not restarted at each
episodic reset (each test point would otherwise get the same 32 parameter sets), only at
construction, so the draws depend on the position in the shard, which is fixed by the seed.
Analysis fields: marginal_entropy (mean over the batch's points of the first step's H(p_bar)),
n_loss_samples (points adapted); `steps` counts the updates of all points.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from ttt.losses import class_distribution
from ttt.methods.base import GradientMethod, StepResult, seeded_generator
from ttt.methods.bn_alpha import AlphaBN, convert_to_alpha_bn
from ttt.methods.parts import augmented_view, build_optimizer
from ttt.params import UpdateFilterError, select_params


def marginal_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H(p_bar), log p_bar) for the views' logits [n_views, C]: p_bar = mean of their softmaxes."""
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    log_mean = log_probs.logsumexp(dim=0) - math.log(logits.shape[0])
    log_mean = torch.clamp(log_mean, min=torch.finfo(log_mean.dtype).min)
    return -(log_mean * log_mean.exp()).sum(-1), log_mean


class MEMO(GradientMethod):
    name = "memo"
    # its own step record (one episode per sample): no diversity term
    analysis_columns = ("losses", "loss_entropy", "diversity_weight", "grad_norm", "marginal_entropy", "n_loss_samples")
    required_hooks = ("augment",)
    default_predict_from = "after_update"

    def configure(self) -> None:
        convert_to_alpha_bn(self.model, self.cfg.memo.bn_alpha)  # before the parameters are collected
        super().configure()

    def trainable_params(self) -> list[nn.Parameter]:
        if self.cfg.update_filter != "norm_only":
            return select_params(self.model, self.cfg.update_filter)
        self.model.requires_grad_(False)  # norm_only: the alpha-BN layers count as normalisation layers
        params = [p for m in self.model.modules() if isinstance(m, (AlphaBN, nn.LayerNorm, nn.GroupNorm))
                  for p in m.parameters(recurse=False)]
        if not params:
            raise UpdateFilterError(f"memo: update_filter=norm_only: model {type(self.model).__name__} has no "
                                    "normalisation layers with affine parameters; set ttt.update_filter=all")
        for p in params:
            p.requires_grad_(True)
        return params

    def make_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.params, self.cfg, nesterov=self.cfg.memo.nesterov)

    def reseed(self) -> None:
        if not hasattr(self, "_augment_generator"):  # at construction only (see the module docstring)
            self._augment_generator = seeded_generator(self.cfg.seed, "memo.augment")

    def views(self, x: torch.Tensor) -> torch.Tensor:
        m = self.cfg.memo
        return torch.cat([augmented_view(self.adapter, x, self._augment_generator, m.flips)
                          for _ in range(m.n_augmentations)])

    def loss(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits = self.model(views)
        loss, _ = marginal_entropy(logits)
        return loss, logits, {"entropy": float(loss.detach())}

    def step(self, inputs: torch.Tensor) -> StepResult:
        t_start = time.perf_counter()
        self.batch_stats = {}
        losses, first, steps, updated, predictions = [], [], 0, 0, []
        stop_reason, grad_norm = "steps_done", None
        t_forward = 0.0
        for i in range(len(inputs)):
            if i > 0 and self.cfg.episodic:
                self.reset()
            x = inputs[i:i + 1]
            with torch.enable_grad():
                out = self._adapt(self.views(x))
            losses += out["losses"]
            if out["losses"]:
                first.append(out["losses"][0])
            steps += out["steps"]
            updated = max(updated, self.updated_param_count)
            grad_norm = out["grad_norm"] if out["grad_norm"] is not None else grad_norm
            if out["stop_reason"] != "steps_done":
                stop_reason = out["stop_reason"]
            t_f = time.perf_counter()
            predictions.append(self.predict_after_update(x))
            t_forward += time.perf_counter() - t_f
        prediction = torch.cat(predictions)
        self._updated_count = updated
        return StepResult(prediction.detach(), {
            "losses": losses, "loss_entropy": sum(first) / len(first) if first else None,
            "steps": steps, "stop_reason": stop_reason, "updated_param_count": updated, "grad_norm": grad_norm,
            "diversity_weight": 0.0, "timing_fine_tuning": time.perf_counter() - t_start - t_forward,
            "timing_forward_pass": t_forward, "marginal_entropy": sum(first) / len(first) if first else None,
            "n_loss_samples": len(first), **class_distribution(prediction),
        })
