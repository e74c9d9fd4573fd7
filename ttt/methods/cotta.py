"""CoTTA (Wang et al. 2022): continual test-time adaptation with a mean teacher.

Three models share the architecture: the student (the adapter's model, updated), the teacher
(an exponential moving average of the student, which gives the predictions) and the anchor
(a frozen copy of the source model). All three normalise with test-batch statistics, as the
reference configures its model before copying it. Per step:
  1. teacher pseudo-labels: if the anchor's max softmax probability, averaged over the batch,
     is below anchor_threshold, the mean of the teacher's logits over n_augmentations augmented
     views; otherwise the teacher's logits on the un-augmented batch (the paper's rule; the
     un-augmented view does not enter the average, as in the reference code);
  2. student update: cross-entropy of the student against the teacher's softmax;
  3. teacher <- ema_alpha * teacher + (1 - ema_alpha) * student, on the trainable parameters
     (the others are equal in both and stay bit-identical);
  4. stochastic restore: each element of the trainable parameters goes back to its source
     value with probability restore_prob.
Steps 3-4 run only after a step the guards kept. The prediction is the teacher's output from
step 1 (`same_forward`) or a fresh teacher prediction after the update (`after_update`).
Augmentations come from the adapter's `augment(inputs, generator)` hook (`ttt.augment.cotta_augment`:
the reference's transforms, one parameter set per augmented copy of the batch), plus the
reference's horizontal flip when `cotta.flips` is on (off in configs/mnistc_cotta.yaml: a mirrored
digit is another digit or none); augmentation and restore draws come from two generators seeded
from cfg.seed, restarted at every reset.
The reference trains all weights and biases: set `update_filter: all` (the config decides).
"""
from __future__ import annotations

import torch

from ttt.losses import soft_cross_entropy
from ttt.methods.base import GradientMethod, seeded_generator
from ttt.methods.parts import augmented_view
from ttt.params import ema_update_, frozen_copy, restore, stochastic_restore_, use_batch_norm_stats


class CoTTA(GradientMethod):
    name = "cotta"
    required_hooks = ("augment",)

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)
        self.teacher = frozen_copy(self.model)
        self.anchor = frozen_copy(self.model)
        teacher_params = dict(self.teacher.named_parameters())
        self.teacher_params = [teacher_params[n] for n in self.param_names]
        self._teacher_logits: torch.Tensor | None = None

    def reseed(self) -> None:
        self._augment_generator = seeded_generator(self.cfg.seed, "cotta.augment")
        self._restore_generator = seeded_generator(self.cfg.seed, "cotta.restore")

    def reset(self) -> None:
        super().reset()
        restore(self.teacher, self.source_state)
        self._teacher_logits = None

    @torch.no_grad()
    def anchor_confidence(self, inputs: torch.Tensor) -> float:
        """Mean over the batch of the source model's max softmax probability."""
        return float(self.anchor(inputs).softmax(1).amax(1).mean())

    @torch.no_grad()
    def teacher_prediction(self, inputs: torch.Tensor) -> torch.Tensor:
        c = self.cfg.cotta
        if self.anchor_confidence(inputs) >= c.anchor_threshold:
            return self.teacher(inputs)
        # one forward per view, not one big batch: batch statistics are per view, as in the reference
        views = [self.teacher(augmented_view(self.adapter, inputs, self._augment_generator, c.flips))
                 for _ in range(c.n_augmentations)]
        return torch.stack(views).mean(0)

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        student = self.model(inputs)
        self._teacher_logits = self.teacher_prediction(inputs)
        loss = soft_cross_entropy(student, self._teacher_logits).mean()
        return loss, student, {"consistency": float(loss.detach())}

    def after_step(self) -> None:
        c = self.cfg.cotta
        ema_update_(self.teacher_params, self.params, c.ema_alpha)
        if c.restore_prob > 0.0:
            stochastic_restore_(self.params, self.source_params(), c.restore_prob, self._restore_generator)

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        # the teacher's output from the loss() call that produced the student's `logits`
        return self._teacher_logits

    def predict_after_update(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.teacher_prediction(inputs)
