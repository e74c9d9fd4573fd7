"""The method interface and the guarded gradient loop every gradient method shares.

A method wraps the adapter's model; `step(inputs)` adapts (or not) and returns the logits the
prediction comes from plus the analysis fields it measured. The worker owns batching, rows
and timing of the whole batch; the method owns parameters, optimiser, random streams and guards.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ttt.config import TTTConfig
from ttt.losses import class_distribution, diversity_loss
from ttt.methods.parts import build_optimizer
from ttt.params import StepCheckpoint, distance, grad_norm, param_names, restore, select_params, snapshot


class MissingHookError(ValueError):
    pass


@dataclass
class StepResult:
    logits: torch.Tensor
    record: dict[str, Any] = field(default_factory=dict)


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one random stream of a method, derived from (seed, purpose).

    Separate streams keep one knob from shifting another's draws: e.g. CoTTA's restore
    probability does not change which augmentations it sees. crc32, not hash(): Python's
    string hash differs between processes.
    """
    entropy = [seed % 2**64, zlib.crc32(purpose.encode())]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class Method:
    """No adaptation: a plain forward pass in eval mode (`source`)."""

    name: ClassVar[str] = "source"
    required_hooks: ClassVar[tuple[str, ...]] = ()
    default_predict_from: ClassVar[str] = "same_forward"
    model_kinds: ClassVar[tuple[str, ...]] = ("image_classifier",)  # adapter kinds the method is defined for
    # the analysis columns its records fill besides ttt/schema.py's COMMON_ANALYSIS_COLUMNS (what its
    # runs' analysis parts hold; names from ANALYSIS_SCHEMA only)
    analysis_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, adapter: Any, cfg: TTTConfig, services: dict[str, Any] | None = None):
        kind = getattr(adapter, "kind", "image_classifier")
        if kind not in self.model_kinds:
            raise ValueError(f"method {self.name!r} does not apply to model.kind={kind!r} "
                             f"(it applies to {', '.join(self.model_kinds)})")
        has_hook = getattr(adapter, "has_hook", lambda h: callable(getattr(adapter, h, None)))
        missing = [h for h in self.required_hooks if not has_hook(h)]
        if missing:
            raise MissingHookError(
                f"method {self.name!r} needs hook(s) {missing} that adapter {type(adapter).__name__} lacks"
            )
        self.adapter = adapter
        self.model: nn.Module = adapter.get_model()
        self.cfg = cfg
        self.services = services or {}
        self.predict_from = cfg.predict_from or self.default_predict_from
        # protocol state the stream keeps on the method, so a checkpoint carries it (ttt/protocol.py):
        # adapted batches since the last reset (ttt.reset_every) and batches the online protocol
        # still has to let pass before the method is free again (ttt.protocol: online)
        self.batches_since_reset = 0
        self.online_delay = 0
        self.configure()
        self.source_state = self.snapshot_source()
        self.reseed()

    def snapshot_source(self) -> dict[str, torch.Tensor]:
        """What `reset` restores: every parameter and buffer (LoRA methods keep only the adapter)."""
        return snapshot(self.model)

    def configure(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    def reseed(self) -> None:
        """Restart the method's random streams from cfg.seed (at construction and every reset,
        so a shard or an episode gives the same result whatever ran on this replica before)."""

    @property
    def updated_param_count(self) -> int:
        return 0

    @property
    def class_scores(self) -> bool:
        """Whether `forward` gives class scores (a causal LM's gives per-token NLL: no class distribution)."""
        return getattr(self.adapter, "kind", None) != "causal_lm"

    def reset(self) -> None:
        """Back to the source model (episodic resets, domain shifts, collapse, a restarted shard)."""
        restore(self.model, self.source_state)
        self.reseed()
        self.batches_since_reset = 0

    def predict_only(self, inputs: torch.Tensor) -> StepResult:
        """The current model's prediction of a batch, with no update (a batch the online protocol
        does not adapt on, and the probes): `predict_after_update` for gradient methods, a plain
        forward for the rest (LAME's Laplacian is part of its step: a skipped batch gets none)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self.current_prediction(inputs)
        record = {"steps": 0, "stop_reason": "online_skipped", "updated_param_count": 0,
                  "timing_forward_pass": time.perf_counter() - t0, "timing_fine_tuning": 0.0}
        if self.class_scores:
            record.update(class_distribution(logits))
        return StepResult(logits.detach(), record)

    def current_prediction(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.adapter.forward(inputs)

    def step(self, inputs: torch.Tensor) -> StepResult:
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self.adapter.forward(inputs)
        record = {"steps": 0, "stop_reason": "no_adaptation", "updated_param_count": 0,
                  "timing_forward_pass": time.perf_counter() - t0, "timing_fine_tuning": 0.0}
        if self.class_scores:
            record.update(class_distribution(logits))
        return StepResult(logits, record)


class GradientMethod(Method):
    """Runs `cfg.steps` guarded updates of `loss(inputs)` on the filtered parameters.

    The model runs in eval mode with only the filtered parameters trainable; subclasses switch
    BatchNorm to test-batch statistics where their reference does (all of ours do). Eval mode,
    unlike the reference code's `model.train()`, keeps dropout off: dropout noise would also
    randomise a same-forward prediction.

    Guards (GuardConfig), checked in this order in each step, each naming itself in
    `stop_reason` and rolling back that step (parameters, every buffer, optimiser state) so the
    model is exactly as before the step:
      before the update: `nonfinite_loss`; `low_class_entropy` (normalised entropy of the
      batch-mean prediction below early_stop_entropy); `loss_ratio` (loss > first loss x ratio);
      after backward: `nonfinite_grad`; then gradients are clipped to grad_clip;
      after the update: `nonfinite_update`, `update_norm_cap` (this step's change),
      `cumulative_update_cap` (distance from the source parameters, i.e. since the last reset).
    A method whose filters drop every sample of a batch takes no step (`all_filtered`).
    Method-specific analysis fields (what a filter dropped, SAR's recoveries, ...) go into
    `self.batch_stats`, cleared at each `step` and merged into its record; the class names them in
    `analysis_columns` (a run's analysis parts hold only those and the common ones).
    Earlier accepted steps of the batch are kept. The adaptive diversity regulariser
    w * (1 - normalised class entropy) is added to every loss, w = min(cap, base + gain *
    max(0, target - class entropy)), so it pulls harder the less diverse the batch is.
    After the steps, a batch whose last adaptation forward had class entropy below
    early_stop_entropy counts as collapsed; collapse_patience consecutive collapsed batches
    reset the method to source (`collapse_reset`) and that batch is predicted by the source.

    `updated_param_count` counts the parameter elements that a kept step changed: trainable
    parameters off the loss path (e.g. SmallCNN's decoder under Tent) get no gradient, so the
    optimiser never touches them and they are not counted. 0 when no step was kept.
    """

    analysis_columns = ("losses", "loss_entropy", "loss_diversity", "diversity_weight", "grad_norm")

    def configure(self) -> None:
        super().configure()
        self.params = self.trainable_params()
        self.param_names = param_names(self.model, self.params)
        self.optimizer = self.make_optimizer()
        self._collapsed_batches = 0
        self._updated_count = 0
        self.loss_scale: float | None = None  # fp16 only (use_loss_scaling)
        self._scaled_steps = 0
        self.batch_stats: dict[str, Any] = {}  # what the method filtered / did on the last batch

    @property
    def updated_param_count(self) -> int:
        """Parameter elements changed by the last `step` (see the class docstring)."""
        return self._updated_count

    @property
    def diversity_active(self) -> bool:
        g = self.cfg.guards
        return g.diversity_weight > 0.0 or g.diversity_gain > 0.0

    def source_params(self) -> list[torch.Tensor]:
        """The source values of the trainable parameters, in `self.params` order."""
        return [self.source_state[n] for n in self.param_names]

    def reset(self) -> None:
        super().reset()
        self.optimizer = self.make_optimizer()
        self._collapsed_batches = 0

    # Subclasses define the adaptation objective. `logits` are the classifier outputs of this
    # forward (what a same-forward prediction is made from, and what the class-distribution
    # guards watch); `parts` names loss components for the analysis row ("entropy", ...).
    # A loss of None means the method's sample filters left nothing to learn from: the step is
    # not taken (no optimiser step, so no momentum-only move) and `stop_reason` is `all_filtered`.
    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook run after each kept optimiser step (CoTTA: EMA teacher, stochastic restore)."""

    def extra_params(self) -> list[nn.Parameter]:
        """Trainable parameters outside the model that the optimiser also steps (RMT's and SANTA's
        projector): rolled back with the model's on a guard breach; not in `self.params`, so they
        count in neither updated_param_count, grad_norm, clipping nor the update caps."""
        return []

    def _backward(self, loss: torch.Tensor) -> None:
        """loss.backward(); under fp16 (`loss_scale` set) the loss is scaled up first so small
        gradients survive fp16 activations, and the gradients are unscaled before any guard or
        clipping sees them (torch.amp.GradScaler's rule, kept inside the guarded step)."""
        if self.loss_scale is None:
            loss.backward()
            return
        (loss * self.loss_scale).backward()
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(self.loss_scale)
        self._scaled_steps += 1
        if self._scaled_steps % 2000 == 0:
            self.loss_scale *= 2.0

    def use_loss_scaling(self, initial_scale: float = 2.0**16) -> None:
        """Turn on fp16 loss scaling (the worker does, for workers.precision=fp16)."""
        self.loss_scale, self._scaled_steps = float(initial_scale), 0

    def apply_update(self, inputs: Any) -> None:
        """The parameter update from the gradients of `loss` (SAR overrides: the SAM two-step)."""
        self.optimizer.step()

    def trainable_params(self) -> list[nn.Parameter]:
        """Mark the update filter's parameters trainable and return them (RoTTA overrides: its
        robust BatchNorm layers count as normalisation layers)."""
        return select_params(self.model, self.cfg.update_filter)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.params, self.cfg)

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Which output of the same forward the prediction uses (CoTTA overrides: the teacher's)."""
        return logits

    def predict_after_update(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inputs)

    def current_prediction(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.predict_after_update(inputs)

    def diversity_weight(self, class_entropy: float) -> float:
        g = self.cfg.guards
        if not self.diversity_active:
            return 0.0
        return min(g.diversity_cap, g.diversity_weight + g.diversity_gain * max(0.0, g.diversity_target - class_entropy))

    def add_diversity(self, loss: torch.Tensor, logits: torch.Tensor, parts: dict[str, float],
                      class_entropy: float) -> tuple[torch.Tensor, float]:
        weight = self.diversity_weight(class_entropy)
        if weight > 0.0:
            div = diversity_loss(logits)
            parts["diversity"] = float(div.detach())
            loss = loss + weight * div
        return loss, weight

    def _breach_before_update(self, value: float, class_entropy: float, initial_loss: float | None) -> str | None:
        g = self.cfg.guards
        if not math.isfinite(value):
            return "nonfinite_loss"
        if g.early_stop_entropy is not None and class_entropy < g.early_stop_entropy:
            return "low_class_entropy"
        if g.loss_ratio_stop is not None and initial_loss is not None and value > abs(initial_loss) * g.loss_ratio_stop:
            return "loss_ratio"
        return None

    def _breach_after_update(self, checkpoint: StepCheckpoint) -> str | None:
        g = self.cfg.guards
        step_norm = checkpoint.update_norm()
        if not math.isfinite(step_norm):
            return "nonfinite_update"
        if g.max_update_norm is not None and step_norm > g.max_update_norm:
            return "update_norm_cap"
        if g.max_cumulative_update_norm is not None and \
                distance(self.params, self.source_params()) > g.max_cumulative_update_norm:
            return "cumulative_update_cap"
        return None

    def _adapt(self, inputs: torch.Tensor) -> dict[str, Any]:
        """The guarded steps on one batch; returns what the record and the prediction need."""
        out = self._new_adapt_out()
        updated: dict[int, int] = {}
        for _ in range(self.cfg.steps):
            if not self._guarded_step(inputs, out, updated):
                break
        self.optimizer.zero_grad(set_to_none=True)  # gradients are not state: free them
        self._updated_count = sum(updated.values())
        return out

    @staticmethod
    def _new_adapt_out() -> dict[str, Any]:
        return {"losses": [], "loss_entropy": None, "loss_diversity": None, "grad_norm": None,
                "diversity_weight": 0.0, "stop_reason": "steps_done", "steps": 0,
                "logits": None, "class_entropy": None, "t_forward": 0.0, "initial_loss": None}

    def _guarded_step(self, inputs: Any, out: dict[str, Any], updated: dict[int, int]) -> bool:
        """One guarded update of `loss(inputs)`, recorded into `out`; False when the batch's
        steps must stop (a guard breach, rolled back, or nothing left to learn from)."""
        g = self.cfg.guards
        checkpoint = StepCheckpoint(self.model, self.params + self.extra_params(), self.optimizer)
        t_f = time.perf_counter()
        loss, logits, parts = self.loss(inputs)
        out["t_forward"] = time.perf_counter() - t_f
        out["logits"] = logits
        if logits is not None:
            out["class_entropy"] = class_distribution(logits)["class_entropy"]
        if loss is None:  # the method's filters left no sample to learn from: no update (as its reference)
            out["stop_reason"] = "all_filtered"
            return False
        loss, out["diversity_weight"] = self.add_diversity(loss, logits, parts, out["class_entropy"])
        value = float(loss.detach())
        out["losses"].append(value)
        out["loss_entropy"], out["loss_diversity"] = parts.get("entropy"), parts.get("diversity")

        breach = self._breach_before_update(value, out["class_entropy"], out["initial_loss"])
        if out["initial_loss"] is None and breach is None:
            out["initial_loss"] = value
        if breach is None:
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(loss)
            out["grad_norm"] = grad_norm(self.params)
            if not math.isfinite(out["grad_norm"]):
                breach = "nonfinite_grad"
                if self.loss_scale is not None:  # fp16 overflow: back off, as torch's GradScaler does
                    self.loss_scale /= 2.0
        if breach is None:
            if g.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, g.grad_clip)
            self.apply_update(inputs)
            breach = self._breach_after_update(checkpoint)
        if breach is not None:
            checkpoint.rollback()
            out["stop_reason"] = breach
            return False
        updated.update((id(p), p.numel()) for p in self.params if p.grad is not None)
        out["steps"] += 1
        self.after_step()
        return True

    def _check_collapse(self, class_entropy: float | None) -> bool:
        """Count consecutive collapsed batches; reset to source when patience runs out."""
        g = self.cfg.guards
        collapsed = g.early_stop_entropy is not None and class_entropy is not None \
            and class_entropy < g.early_stop_entropy
        self._collapsed_batches = self._collapsed_batches + 1 if collapsed else 0
        if g.collapse_patience and self._collapsed_batches >= g.collapse_patience:
            self.reset()
            return True
        return False

    def step(self, inputs: torch.Tensor) -> StepResult:
        t_start = time.perf_counter()
        self.batch_stats = {}
        with torch.enable_grad():  # callers may predict under no_grad; adaptation needs autograd
            out = self._adapt(inputs)
        t_adapt_end = time.perf_counter()
        stop_reason = out["stop_reason"]
        if self._check_collapse(out["class_entropy"]):
            stop_reason = "collapse_reset"

        prediction = None
        if self.predict_from == "same_forward" and out["logits"] is not None and stop_reason != "collapse_reset":
            prediction = self.prediction_logits(out["logits"])
            if not torch.isfinite(prediction).all():
                prediction = None  # never predict from a non-finite forward when another can be made
        if prediction is None:
            t_f = time.perf_counter()
            prediction = self.predict_after_update(inputs)
            t_forward = time.perf_counter() - t_f
            t_adapt = t_adapt_end - t_start
        else:
            t_forward = out["t_forward"]
            t_adapt = t_adapt_end - t_start - t_forward
        return StepResult(prediction.detach(), {
            "losses": out["losses"], "loss_entropy": out["loss_entropy"], "loss_diversity": out["loss_diversity"],
            "steps": out["steps"], "stop_reason": stop_reason, "updated_param_count": self.updated_param_count,
            "diversity_weight": out["diversity_weight"], "grad_norm": out["grad_norm"],
            "timing_fine_tuning": t_adapt, "timing_forward_pass": t_forward,
            **class_distribution(prediction), **self.batch_stats,
        })
