"""CMF (Lee, Yoon & Hwang, ICLR 2024, "Becoming More Robust under Continual Distribution Shifts:
Continual Momentum Filtering"): ROID's objective with the weight ensembling replaced by a
Kalman-filter-like ensembling of source, hidden and target models.

Reference: mariodoebler/test-time-adaptation `classification/methods/cmf.py` (after the authors'
OpenReview code) with its defaults CMF.ALPHA 0.99, CMF.GAMMA 0.99, CMF.Q 0.005, CMF.TYPE lp, and
the ROID loss knobs (the reference reads ROID.*; here they are repeated in the `cmf` block);
`cfgs/cifar10_c/cmf.yaml`: Adam lr 1e-3, beta 0.9, batch 200. Tent's setup (BatchNorm on test-batch
statistics, the normalisation affine parameters trainable). Per step:
  1. ROID's loss on the batch (ttt/methods/roid.py: certainty x diversity weighted soft likelihood
     ratio plus the weighted symmetric-CE consistency with an augmented view), optimiser step;
  2. Bayesian filtering of the trainable parameters theta (the hidden model h starts at the source
     theta_0, its variance v at 0; q = cmf.q x (trainable parameter elements / 38,400), the
     reference's scaling by WRN-28's BatchNorm size):
       predict:  h <- alpha h + (1 - alpha) theta_0;  v <- alpha^2 v + q
       update:   beta = (1 - q) / (v + 1 - q), clipped below at 0.89 and set to 1 from 0.9999 on;
                 v <- beta v;  h <- beta h + (1 - beta) theta
       ensemble: theta <- gamma theta + (1 - gamma) h;
  3. the prediction is the loss forward's output with ROID's prior correction (`same_forward`).
The reference's `type: op` ensembles with the predicted hidden model, but its update runs in place
on the same object, so op and lp give the same model there; here too (both use h after the update).
The hidden model covers every parameter in the reference; only trainable ones can differ from the
source, so it is kept for those alone (the same arithmetic). No other deviation.
Analysis fields: ROID's (n_loss_samples, sample_weight_mean) and kalman_beta (the last step's beta).
"""
from __future__ import annotations

import torch

from ttt.methods.roid import ROID


class CMF(ROID):
    name = "cmf"
    analysis_columns = ROID.analysis_columns + ("kalman_beta",)

    @property
    def loss_cfg(self):
        return self.cfg.cmf

    def configure(self) -> None:
        super().configure()
        self.n_trainable = sum(p.numel() for p in self.params)
        self.hidden = [p.detach().clone() for p in self.params]
        self.hidden_var = 0.0
        self.beta: float | None = None

    def reset(self) -> None:
        super().reset()
        self.hidden = [p.detach().clone() for p in self.source_params()]
        self.hidden_var = 0.0
        self.beta = None

    def kalman_gain(self, q: float) -> float:
        beta = (1.0 - q) / (self.hidden_var + 1.0 - q)
        beta = max(beta, 0.89)
        return 1.0 if beta >= 0.9999 else beta

    def after_step(self) -> None:
        c = self.cfg.cmf
        q = c.q * self.n_trainable / 38400
        with torch.no_grad():
            for h, src in zip(self.hidden, self.source_params()):
                h.lerp_(src.to(h.device), 1.0 - c.alpha)  # predict: pulled back towards the source
            self.hidden_var = c.alpha ** 2 * self.hidden_var + q
            self.beta = self.kalman_gain(q)
            self.hidden_var = self.beta * self.hidden_var
            for h, p in zip(self.hidden, self.params):
                h.lerp_(p.detach(), 1.0 - self.beta)  # update: towards the adapted model
            for p, h in zip(self.params, self.hidden):
                p.lerp_(h, 1.0 - c.gamma)  # parameter ensemble
        self.batch_stats["kalman_beta"] = self.beta
