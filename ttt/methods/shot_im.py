"""SHOT-IM (Liang, Hu & Feng, ICML 2020, "Do We Really Need to Access the Source Data? Source
Hypothesis Transfer for Unsupervised Domain Adaptation"): information maximisation on the feature
extractor with the source classifier (the hypothesis) frozen.

References: tim-learn/SHOT `object/image_target.py` (the IM loss: mean entropy minus the entropy of
the batch-mean prediction, with epsilon 1e-5; netC frozen, netF and netB trained) and its online
test-time form in LINs-lab/ttab `ttab/model_adaptation/shot.py` (SGD, the layers named fc /
classifier / head frozen, ent_par 1). SHOT-IM is SHOT without the pseudo-label term (cls_par = 0).
Per step, on the forward's logits with p = softmax:
    loss = mean_i H(p_i) + div_weight x sum_c p_bar_c log(p_bar_c + epsilon),  p_bar = mean_i p_i,
i.e. confident and, over the batch, diverse predictions. Trainable: every parameter except the final
linear classifier's (the adapter's `classifier` hook; `update_filter: all`, or only the
normalisation layers with `norm_only`). The prediction is the loss forward's output (`same_forward`).
Deviations on purpose: BatchNorm normalises by the test batch without updating running statistics
(Tent's setup, as every online method here) where SHOT trains with BatchNorm in training mode; the
reference trains offline for epochs over the target set, here it is one pass over the stream,
`ttt.steps` updates per batch, continual (configs/mnistc_shot_im.yaml: SGD lr 1e-3, momentum 0.9,
batch 200, TTAB's optimiser with the project's learning rate).
Analysis fields: loss_entropy (mean entropy), marginal_entropy (H(p_bar), the diversity term).
"""
from __future__ import annotations

import torch
from torch import nn

from ttt.losses import softmax_entropy
from ttt.methods.base import GradientMethod
from ttt.params import UpdateFilterError, select_params, use_batch_norm_stats


class SHOTIM(GradientMethod):
    name = "shot_im"
    analysis_columns = GradientMethod.analysis_columns + ("marginal_entropy",)
    required_hooks = ("classifier",)

    def trainable_params(self) -> list[nn.Parameter]:
        params = select_params(self.model, self.cfg.update_filter)
        head = {id(p) for p in self.adapter.classifier().parameters()}
        for p in params:
            if id(p) in head:
                p.requires_grad_(False)
        params = [p for p in params if id(p) not in head]
        if not params:
            raise UpdateFilterError("shot_im: no trainable parameter outside the classifier")
        return params

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        c = self.cfg.shot_im
        logits = self.model(inputs)
        entropy = softmax_entropy(logits).mean()
        mean_prob = logits.softmax(1).mean(0)
        neg_marginal = (mean_prob * torch.log(mean_prob + c.epsilon)).sum()
        loss = entropy + c.div_weight * neg_marginal
        self.batch_stats = {"marginal_entropy": float(-neg_marginal.detach())}
        return loss, logits, {"entropy": float(entropy.detach())}
