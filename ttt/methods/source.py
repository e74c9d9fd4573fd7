"""`source` (no adaptation) and `norm` (test-batch BatchNorm statistics, Tent's BN baseline)."""
from __future__ import annotations

from ttt.methods.base import Method
from ttt.params import UpdateFilterError, has_batch_norm, use_batch_norm_stats


class Source(Method):
    name = "source"
    model_kinds = ("image_classifier", "causal_lm")


class Norm(Method):
    name = "norm"

    def configure(self) -> None:
        super().configure()
        if not has_batch_norm(self.model):  # it would be `source` under another name
            raise UpdateFilterError(f"norm: model {type(self.model).__name__} has no BatchNorm layer whose statistics "
                                    "it could take from the test batch (LayerNorm / GroupNorm normalise per sample)")
        use_batch_norm_stats(self.model)
