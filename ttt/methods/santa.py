"""SANTA (Chakrabarty, Sreenivas & Biswas, TMLR 2023, "SANTA: Source Anchoring Network and Target
Alignment for Continual Test Time Adaptation").

Reference (reachable: mariodoebler/test-time-adaptation holds it): `classification/methods/santa.py`,
`utils/losses.py` (AugCrossEntropy, alpha 0.5), conf.py (SANTA.LAMBDA_CE_TRG / LAMBDA_CONT = 1,
CONTRAST.TEMPERATURE 0.1, PROJECTION_DIM 128) and `cfgs/cifar10_c/santa.yaml`: Adam lr 1e-3,
beta 0.9, batch 200. Tent's setup: BatchNorm on test-batch statistics, only the normalisation
layers' affine parameters trainable (`update_filter: norm_only`), plus the projector; a frozen anchor
(a copy of the source model after that setup). The source prototypes, the projector and the
contrastive term are RMT's (ttt/methods/rmt.py, `PrototypeContrast`; `santa.source_data` as
`rmt.source_data`). Per batch x (x_a: one view from the adapter's `augment` hook):
    loss = lambda_ce_trg x mean[ -0.5 sum p(x) log p_anchor(x) - 0.5 sum p(x_a) log p_anchor(x) ]
         + lambda_cont x SupCon([nearest source prototype, f(x), f(x_a)]),
the anchor side without gradient; the prediction is the student's output on x from that forward
(`same_forward`). No warm-up, no source replay, no teacher EMA.
Deviation on purpose: the reference's prototype extraction appends each batch's labels twice
(`labels_src` concatenated two times per batch), which misaligns labels and features; the prototypes
here are RMT's (each class's mean source feature).
Analysis fields: loss_contrastive, teacher_agreement (argmax student == anchor).
"""
from __future__ import annotations

import torch

from ttt.methods.rmt import PrototypeContrast
from ttt.params import frozen_copy


def anchored_cross_entropy(logits: torch.Tensor, logits_aug: torch.Tensor, anchor: torch.Tensor,
                           alpha: float = 0.5) -> torch.Tensor:
    """The reference's AugCrossEntropy: per sample, -(1 - alpha) sum p(x) log p_anchor
    - alpha sum p(x_aug) log p_anchor."""
    log_anchor = anchor.detach().log_softmax(1)
    return -(1 - alpha) * (logits.softmax(1) * log_anchor).sum(1) - alpha * (logits_aug.softmax(1) * log_anchor).sum(1)


class SANTA(PrototypeContrast):
    name = "santa"

    def configure(self) -> None:
        super().configure()
        self.anchor = frozen_copy(self.model)

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        b = self.block
        f = self.features(inputs)
        logits = self.head(f)
        f_aug = self.features(self.view(inputs))
        logits_aug = self.head(f_aug)
        with torch.no_grad():
            anchor = self.anchor(inputs)
        contrastive = self.contrastive(f, f_aug)
        self_training = anchored_cross_entropy(logits, logits_aug, anchor).mean()
        self.batch_stats = {"loss_contrastive": float(contrastive.detach()),
                            "teacher_agreement": float((logits.detach().argmax(1) == anchor.argmax(1)).float().mean())}
        return b.lambda_ce_trg * self_training + b.lambda_cont * contrastive, logits, \
            {"self_training": float(self_training.detach())}
