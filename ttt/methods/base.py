"""The method interface and the guarded gradient loop every gradient method shares.

A method wraps the adapter's model; `step(inputs)` adapts (or not) and returns the logits the
prediction comes from plus the analysis fields it measured. The worker owns batching, rows
and timing of the whole batch; the method owns parameters, optimiser and guards.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ttt.config import TTTConfig
from ttt.losses import class_distribution, diversity_loss
from ttt.params import restore, select_params, snapshot


class MissingHookError(ValueError):
    pass


@dataclass
class StepResult:
    logits: torch.Tensor
    record: dict[str, Any] = field(default_factory=dict)


class Method:
    """No adaptation: a plain forward pass in eval mode (`source`)."""

    name: ClassVar[str] = "source"
    required_hooks: ClassVar[tuple[str, ...]] = ()
    default_predict_from: ClassVar[str] = "same_forward"

    def __init__(self, adapter: Any, cfg: TTTConfig, services: dict[str, Any] | None = None):
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
        self.configure()
        self.source_state = snapshot(self.model)

    def configure(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    @property
    def updated_param_count(self) -> int:
        return 0

    def reset(self) -> None:
        """Back to the source model (episodic resets, domain shifts, collapse, a restarted shard)."""
        restore(self.model, self.source_state)

    def step(self, inputs: torch.Tensor) -> StepResult:
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self.model(inputs)
        return StepResult(logits, {
            "steps": 0, "stop_reason": "no_adaptation", "updated_param_count": 0,
            "timing_forward_pass": time.perf_counter() - t0, "timing_fine_tuning": 0.0,
            **class_distribution(logits),
        })


def build_optimizer(params: list[nn.Parameter], cfg: TTTConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _flat(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)


class GradientMethod(Method):
    """Runs `cfg.steps` guarded updates of `loss(inputs)` on the filtered parameters.

    Guards (GuardConfig): adaptive diversity weight, early stop on low class entropy, reset
    after persistent collapse, non-finite loss/gradient skip, gradient clipping, per-step and
    cumulative update-norm caps, loss-ratio stop. A breached step is rolled back; the reason
    lands in `stop_reason`.
    """

    def configure(self) -> None:
        self.model.train()
        self.params = select_params(self.model, self.cfg.update_filter)
        self.optimizer = build_optimizer(self.params, self.cfg)
        self._reset_params = _flat(self.params)
        self._collapsed_batches = 0

    @property
    def updated_param_count(self) -> int:
        return sum(p.numel() for p in self.params)

    def reset(self) -> None:
        super().reset()
        self.optimizer = build_optimizer(self.params, self.cfg)
        self._reset_params = _flat(self.params)
        self._collapsed_batches = 0

    # Subclasses define the adaptation objective. `logits` is the output the prediction may
    # come from (same_forward); `parts` names the loss components for the analysis row.
    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook run after each accepted optimiser step (CoTTA: EMA teacher, stochastic restore)."""

    def predict_after_update(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inputs)

    def diversity_weight(self, class_entropy: float) -> float:
        g = self.cfg.guards
        if g.diversity_weight == 0.0 and g.diversity_gain == 0.0:
            return 0.0
        return min(g.diversity_cap, g.diversity_weight + g.diversity_gain * max(0.0, g.diversity_target - class_entropy))

    def add_diversity(self, loss: torch.Tensor, logits: torch.Tensor, parts: dict[str, float]) -> tuple[torch.Tensor, float]:
        weight = self.diversity_weight(class_distribution(logits)["class_entropy"])
        if weight > 0.0:
            div = diversity_loss(logits)
            parts["diversity"] = float(div.detach())
            loss = loss + weight * div
        return loss, weight

    def step(self, inputs: torch.Tensor) -> StepResult:
        g = self.cfg.guards
        t_start = time.perf_counter()
        losses: list[float] = []
        entropy_losses: list[float] = []
        diversity_losses: list[float] = []
        grad_norm = None
        weight = 0.0
        stop_reason = "steps_done"
        steps_taken = 0
        logits = None
        t_forward = 0.0
        initial_loss = None
        dist: dict[str, Any] = {}
        for _ in range(self.cfg.steps):
            t_f = time.perf_counter()
            loss, logits, parts = self.loss(inputs)
            t_forward = time.perf_counter() - t_f
            dist = class_distribution(logits)
            loss, weight = self.add_diversity(loss, logits, parts)
            value = float(loss.detach())
            losses.append(value)
            entropy_losses.append(parts.get("entropy", float("nan")))
            diversity_losses.append(parts.get("diversity", 0.0))
            if not torch.isfinite(loss):
                stop_reason = "nonfinite_loss"
                break
            if g.early_stop_entropy is not None and dist["class_entropy"] < g.early_stop_entropy:
                stop_reason = "low_class_entropy"
                break
            if initial_loss is None:
                initial_loss = value
            elif g.loss_ratio_stop is not None and value > abs(initial_loss) * g.loss_ratio_stop:
                stop_reason = "loss_ratio"
                break
            before = _flat(self.params)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack([gr.norm() for gr in grads]))) if grads else 0.0
            if not torch.isfinite(torch.tensor(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                stop_reason = "nonfinite_grad"
                break
            if g.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, g.grad_clip)
            optim_state = copy.deepcopy(self.optimizer.state_dict()) if g.max_update_norm or g.max_cumulative_update_norm else None
            self.optimizer.step()
            after = _flat(self.params)
            breach = None
            if g.max_update_norm is not None and float((after - before).norm()) > g.max_update_norm:
                breach = "update_norm_cap"
            elif g.max_cumulative_update_norm is not None and float((after - self._reset_params).norm()) > g.max_cumulative_update_norm:
                breach = "cumulative_update_cap"
            if breach:
                self._set_flat(before)
                if optim_state is not None:
                    self.optimizer.load_state_dict(optim_state)
                stop_reason = breach
                break
            steps_taken += 1
            self.after_step()
        t_adapt_end = time.perf_counter()

        if stop_reason in ("nonfinite_loss", "nonfinite_grad") and logits is not None and not torch.isfinite(logits).all():
            logits = None  # never predict from a non-finite forward
        collapsed = g.early_stop_entropy is not None and dist.get("class_entropy", 1.0) < g.early_stop_entropy
        self._collapsed_batches = self._collapsed_batches + 1 if collapsed else 0
        if g.collapse_patience and self._collapsed_batches >= g.collapse_patience:
            self.reset()
            stop_reason = "collapse_reset"

        if self.predict_from == "after_update" or logits is None or stop_reason == "collapse_reset":
            t_f = time.perf_counter()
            logits = self.predict_after_update(inputs)
            t_forward = time.perf_counter() - t_f
            t_adapt = t_adapt_end - t_start
        else:
            logits = self.prediction_logits(logits)
            t_adapt = t_adapt_end - t_start - t_forward
        final = class_distribution(logits)
        return StepResult(logits.detach(), {
            "losses": losses, "loss_entropy": entropy_losses[-1] if entropy_losses else None,
            "loss_diversity": diversity_losses[-1] if diversity_losses else None,
            "steps": steps_taken, "stop_reason": stop_reason,
            "updated_param_count": self.updated_param_count, "diversity_weight": weight,
            "grad_norm": grad_norm, "timing_fine_tuning": t_adapt, "timing_forward_pass": t_forward,
            **final,
        })

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Which output of the same forward the prediction uses (CoTTA overrides: the teacher's)."""
        return logits

    def _set_flat(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                p.copy_(flat[offset:offset + n].view_as(p))
                offset += n
