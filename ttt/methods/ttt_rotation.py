"""TTT (Sun, Wang, Liu, Miller, Efros & Hardt, ICML 2020, "Test-Time Training with
Self-Supervision for Generalization under Distribution Shifts"): the trunk shared with a rotation
head adapts on the test input's 4-way rotation loss, then the classifier predicts.

Reference: yueatsprograms/ttt_cifar_release `test_calls/test_adapt.py` (adapt_single, test_single),
`utils/rotation.py` and `main.py`/`script.sh` (joint training with `--rotation_type expand`), and
`script_test_c10.py` (TTT "slow": SGD lr 1e-3, 10 iterations, reset to the trained model for every
test point; TTT-Online: lr 1e-3, 1 iteration, never reset).
The model declares the `rotation_logits(x)` hook: 4-way rotation logits of a head on the trunk
the classifier uses (the embedded default `pipeline.embedded.model:small_cnn_rotation` trains it
jointly with the classifier). A model without it is refused at start-up in one line. Per batch:
  1. the rotated batch: every image in all four rotations (`ttt.rotations: expand`) or each in one
     random rotation (`rand`, drawn from a seeded generator), labels k = 0..3 for k x 90 degrees;
  2. `ttt.steps` guarded SGD steps (no momentum in the reference) on the cross-entropy of the
     rotation logits, with BatchNorm in training mode (the reference's ssh.train(): batch statistics,
     running statistics updated); the parameters that get a gradient are the trunk's and the
     rotation head's (`update_filter: all`), the classifier's own layers do not move;
  3. the prediction: the classifier in eval mode after the update (`after_update`, the reference's
     test_single with net.eval()).
Online (TTT-Online) = continual; `ttt.episodic: true` is the standard TTT (configs/mnistc_ttt.yaml
and mnistc_ttt_episodic.yaml). With `ttt.threshold` < 1 only the samples whose rotation head gives
"unrotated" a probability below it enter the loss (the reference's --threshold, per test point).
Deviation on purpose: the reference adapts on 32 augmented copies (random crop and flip) of one test
image; here on the stream's batch itself (a batch of test points is what the stream hands a
worker), with all four rotations of each by default.
Analysis fields: rotation_accuracy (the rotation head's accuracy on the rotated batch before the
first update: 1 - the paper's self-supervised error), n_loss_samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ttt.augment import expand_rotations, rotate_batch
from ttt.methods.base import GradientMethod, seeded_generator


def set_batch_norm_training(model: nn.Module, training: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(training)


def rotation_loss(adapter, inputs: torch.Tensor, rotations: str,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """(mean 4-way rotation cross-entropy, rotation accuracy) on the rotated copies of `inputs`."""
    if rotations == "expand":
        rotated, labels = expand_rotations(inputs)
    else:
        labels = torch.randint(4, (len(inputs),), generator=generator).to(inputs.device)
        rotated = rotate_batch(inputs, labels)
    logits = adapter.rotation_logits(rotated)
    return F.cross_entropy(logits, labels), float((logits.detach().argmax(1) == labels).float().mean())


class RotationTTT(GradientMethod):
    name = "ttt"
    analysis_columns = GradientMethod.analysis_columns + ("n_loss_samples", "rotation_accuracy")
    required_hooks = ("rotation_logits",)
    default_predict_from = "after_update"

    def reseed(self) -> None:
        self._rotation_generator = seeded_generator(self.cfg.seed, "ttt.rotations")

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
        c = self.cfg.ttt
        with torch.no_grad():  # the classifier's view of the batch, for the guards (eval mode, as predicted)
            logits = self.model(inputs)
        selected = inputs
        if c.threshold < 1.0:
            with torch.no_grad():
                unrotated = self.adapter.rotation_logits(inputs).softmax(1)[:, 0]
            selected = inputs[unrotated < c.threshold]
        self.batch_stats.setdefault("n_loss_samples", len(selected))
        if len(selected) == 0:
            return None, logits, {}
        set_batch_norm_training(self.model, True)
        try:
            loss, accuracy = rotation_loss(self.adapter, selected, c.rotations, self._rotation_generator)
        finally:
            set_batch_norm_training(self.model, False)
        self.batch_stats.setdefault("rotation_accuracy", accuracy)  # before the batch's first update
        return loss, logits, {"rotation": float(loss.detach())}
