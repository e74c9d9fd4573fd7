"""`source` (no adaptation) and `norm` (test-batch BatchNorm statistics, Tent's BN baseline)."""
from __future__ import annotations

from ttt.methods.base import Method
from ttt.params import use_batch_norm_stats


class Source(Method):
    name = "source"
    model_kinds = ("image_classifier", "causal_lm")


class Norm(Method):
    name = "norm"

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)
