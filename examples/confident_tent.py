"""A method of your own, by reference: `--set ttt.method=examples.confident_tent:ConfidentTent`.

Entropy minimisation (Tent's loss) on the confident samples of each batch only: those whose
top-class probability is at least `ttt.method_kwargs.threshold` (default 0.5). Subclassing
GradientMethod brings everything else: the update filter (`ttt.update_filter`), the optimiser,
`ttt.steps`, the guards with their rollback, `predict_from`, resets and checkpoints.
"""
from __future__ import annotations

import torch

from ttt.losses import softmax_entropy
from ttt.methods.base import GradientMethod
from ttt.params import use_batch_norm_stats


class ConfidentTent(GradientMethod):
    name = "confident_tent"  # how errors and the worker's info name it; results carry the reference
    # the analysis columns its records fill besides the common ones (names from ttt/schema.py)
    analysis_columns = GradientMethod.analysis_columns + ("n_reliable",)

    def configure(self) -> None:
        super().configure()
        use_batch_norm_stats(self.model)  # BatchNorm normalises by the test batch, as Tent
        self.threshold = float(self.cfg.method_kwargs.get("threshold", 0.5))

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
        logits = self.model(inputs)
        keep = logits.softmax(dim=1).max(dim=1).values >= self.threshold
        self.batch_stats = {"n_reliable": int(keep.sum())}  # lands in the analysis Parquet
        if not keep.any():
            return None, logits, {}  # nothing confident: no step this batch (stop_reason all_filtered)
        loss = softmax_entropy(logits[keep]).mean()
        return loss, logits, {"entropy": float(loss.detach())}
