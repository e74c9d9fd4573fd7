"""RoTTA (Yuan et al., CVPR 2023, "Robust Test-Time Adaptation in Dynamic Scenarios").

Reference: BIT-DA/RoTTA `core/adapter/rotta.py`, `core/utils/memory.py`, `core/utils/bn_layers.py`
(defaults `configs/adapter/rotta.yaml`: Adam lr 1e-3, beta 0.9, memory 64, one update per 64
samples, nu 0.001, RBN alpha 0.05, lambda_t = lambda_u = 1), and its benchmark form in
mariodoebler/test-time-adaptation `classification/methods/rotta.py` (batch 200 on CIFAR-10-C).
  - Robust BatchNorm (RBN) replaces every BatchNorm: it starts from the source running statistics;
    in an update forward it normalises with (1 - alpha) x running + alpha x batch statistics (the
    batch part carries gradient) and keeps that mix as its new running statistics; otherwise it
    normalises with the running statistics. Only the RBN (and LayerNorm / GroupNorm) affine
    parameters train (`update_filter: norm_only`).
  - The teacher, an EMA of the student over all parameters (teacher <- (1 - nu) teacher + nu
    student after every update), predicts: each test batch goes through the teacher with its
    running statistics, and that output is the batch's prediction (`same_forward`; computed before
    the batch's updates, as in the reference).
  - Category-balanced memory (CSTU): every sample enters with its teacher pseudo-label and
    uncertainty (entropy); eviction keeps at most capacity / C per class, removing the item with
    the highest score lambda_t / (1 + exp(-age / capacity)) + lambda_u x entropy / ln C from its
    own class (when full) or from the majority classes, and only if it scores higher than the
    newcomer; all ages grow by one per arriving sample.
  - Every update_frequency samples (counted inside the batch, so a batch of 200 triggers 3 or 4
    updates), one update on the whole memory: loss = mean over items of
    w(age) x CE(student(strong_aug(x)), softmax(teacher(x))), w = exp(-a) / (1 + exp(-a)),
    a = age / capacity, both models' RBNs in update mode; strong_aug is CoTTA's transform (the
    adapter's `augment` hook, one parameter set per call, `rotta.flips` as cotta.flips).
Deviations on purpose: the reference puts both models in train mode for the update (dropout on
too); here only the RBN layers switch, as every method here keeps dropout off. A sample whose
teacher output is not finite does not enter the memory (it would make every later update
non-finite until evicted; the reference does not check). `ttt.steps` updates
run per trigger (the reference's steps loop would also re-add the batch to the memory). A step
the guards roll back restores the student's parameters and RBN statistics, not the teacher's RBN
statistics, which that step's teacher forward already moved.
Analysis fields: memory_size, n_loss_samples (memory items in the last update),
sample_weight_mean (their mean timeliness weight); `steps` counts the updates in the batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ttt.losses import class_distribution, soft_cross_entropy
from ttt.methods.base import GradientMethod, StepResult, seeded_generator
from ttt.methods.parts import augmented_view
from ttt.params import UpdateFilterError, ema_update_, frozen_copy, restore, select_params


class RobustBN(nn.Module):
    """RoTTA's RBN, for BatchNorm1d/2d/3d: running statistics updated with momentum alpha in
    training mode (in place, so a step checkpoint can roll them back), used as they are otherwise."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, alpha: float):
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"rotta: {type(bn).__name__} has no running statistics to start robust BN from")
        self.alpha = alpha
        self.eps = bn.eps
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.weight = nn.Parameter(bn.weight.detach().clone()) if bn.weight is not None else None
        self.bias = nn.Parameter(bn.bias.detach().clone()) if bn.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            batch_var, batch_mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], unbiased=False)
            mean = (1 - self.alpha) * self.running_mean + self.alpha * batch_mean
            var = (1 - self.alpha) * self.running_var + self.alpha * batch_var
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
        else:
            mean, var = self.running_mean, self.running_var
        x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            x = x * self.weight.view(shape)
        if self.bias is not None:
            x = x + self.bias.view(shape)
        return x


def convert_to_robust_bn(model: nn.Module, alpha: float) -> int:
    """Replace every BatchNorm of `model` in place by a RobustBN; returns how many."""
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RobustBN(getattr(parent, child), alpha))
    return len(targets)


def set_robust_bn_mode(model: nn.Module, update: bool) -> None:
    for m in model.modules():
        if isinstance(m, RobustBN):
            m.train(update)


def timeliness_weight(ages: torch.Tensor) -> torch.Tensor:
    return torch.exp(-ages) / (1 + torch.exp(-ages))


@dataclass
class MemoryItem:
    data: torch.Tensor
    uncertainty: float
    age: int = 0


class CSTUMemory:
    """RoTTA's category-balanced memory with timeliness and uncertainty (the reference's CSTU)."""

    def __init__(self, capacity: int, n_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0):
        self.capacity = capacity
        self.n_classes = n_classes
        self.per_class = capacity / n_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.items: list[list[MemoryItem]] = [[] for _ in range(n_classes)]

    def occupancy(self) -> int:
        return sum(len(c) for c in self.items)

    def per_class_counts(self) -> list[int]:
        return [len(c) for c in self.items]

    def score(self, age: int, uncertainty: float) -> float:
        return self.lambda_t / (1 + math.exp(-age / self.capacity)) + self.lambda_u * uncertainty / math.log(self.n_classes)

    def add(self, data: torch.Tensor, label: int, uncertainty: float) -> None:
        if self._make_room(label, self.score(0, uncertainty)):
            self.items[label].append(MemoryItem(data, uncertainty))
        for cls in self.items:
            for item in cls:
                item.age += 1

    def _make_room(self, label: int, new_score: float) -> bool:
        if len(self.items[label]) < self.per_class:
            if self.occupancy() < self.capacity:
                return True
            counts = self.per_class_counts()
            majority = [c for c, n in enumerate(counts) if n == max(counts)]
            return self._evict(majority, new_score)
        return self._evict([label], new_score)

    def _evict(self, classes: list[int], new_score: float) -> bool:
        """Remove the highest-scoring item of `classes` if it scores above the newcomer."""
        best: tuple[int, int] | None = None
        best_score = None
        for cls in classes:
            for idx, item in enumerate(self.items[cls]):
                s = self.score(item.age, item.uncertainty)
                if best_score is None or s >= best_score:  # >=: the last of equal scores, as the reference
                    best, best_score = (cls, idx), s
        if best is None:
            return True
        if best_score > new_score:
            self.items[best[0]].pop(best[1])
            return True
        return False

    def contents(self) -> tuple[list[torch.Tensor], list[float]]:
        """The items' data and ages / capacity, class by class."""
        data, ages = [], []
        for cls in self.items:
            for item in cls:
                data.append(item.data)
                ages.append(item.age / self.capacity)
        return data, ages


class RoTTA(GradientMethod):
    name = "rotta"
    # its own step record (the memory bank decides when to update): no loss_entropy
    analysis_columns = ("losses", "loss_diversity", "diversity_weight", "grad_norm", "n_loss_samples",
                        "sample_weight_mean", "memory_size")
    required_hooks = ("augment",)

    def configure(self) -> None:
        if not convert_to_robust_bn(self.model, self.cfg.rotta.alpha):
            raise UpdateFilterError(f"rotta: model {type(self.model).__name__} has no BatchNorm layer to make robust "
                                    "(RoTTA's robust BN is defined on BatchNorm models)")
        super().configure()
        set_robust_bn_mode(self.model, False)
        self.teacher = frozen_copy(self.model)
        self.memory: CSTUMemory | None = None
        self.n_seen = 0

    def trainable_params(self) -> list[nn.Parameter]:
        if self.cfg.update_filter != "norm_only":
            return select_params(self.model, self.cfg.update_filter)
        self.model.requires_grad_(False)
        params = [p for m in self.model.modules() if isinstance(m, (RobustBN, nn.LayerNorm, nn.GroupNorm))
                  for p in m.parameters(recurse=False)]
        if not params:
            raise UpdateFilterError(f"rotta: update_filter=norm_only: model {type(self.model).__name__} has no "
                                    "normalisation layers with affine parameters; set ttt.update_filter=all")
        for p in params:
            p.requires_grad_(True)
        return params

    def reseed(self) -> None:
        self._augment_generator = seeded_generator(self.cfg.seed, "rotta.augment")

    def reset(self) -> None:
        super().reset()
        restore(self.teacher, self.source_state)
        self.memory = None
        self.n_seen = 0

    @torch.no_grad()
    def teacher_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        set_robust_bn_mode(self.teacher, False)
        return self.teacher(inputs)

    def loss(self, _inputs: object) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
        data, ages = self.memory.contents() if self.memory is not None else ([], [])
        if not data:
            return None, None, {}
        x = torch.stack(data)
        strong = augmented_view(self.adapter, x, self._augment_generator, self.cfg.rotta.flips)
        set_robust_bn_mode(self.teacher, True)
        set_robust_bn_mode(self.model, True)
        try:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            student_logits = self.model(strong)
        finally:
            set_robust_bn_mode(self.teacher, False)
            set_robust_bn_mode(self.model, False)
        weight = timeliness_weight(torch.tensor(ages, dtype=student_logits.dtype, device=student_logits.device))
        loss = (soft_cross_entropy(student_logits, teacher_logits) * weight).mean()
        self.batch_stats.update(n_loss_samples=len(data), sample_weight_mean=float(weight.mean()))
        return loss, student_logits, {"consistency": float(loss.detach())}

    def after_step(self) -> None:
        # all parameters, as the reference (update_all); untouched ones stay bit-identical (lerp)
        ema_update_(list(self.teacher.parameters()), list(self.model.parameters()), 1.0 - self.cfg.rotta.nu)

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self._teacher_logits

    def predict_after_update(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.teacher_forward(inputs)

    def step(self, inputs: torch.Tensor) -> StepResult:
        c = self.cfg.rotta
        t_start = time.perf_counter()
        self.batch_stats = {}
        self._teacher_logits = self.teacher_forward(inputs)
        t_forward = time.perf_counter() - t_start
        probs = self._teacher_logits.softmax(1)
        labels = probs.argmax(1).tolist()
        uncertainty = (-(probs * torch.log(probs + 1e-6)).sum(1)).tolist()
        if self.memory is None:
            self.memory = CSTUMemory(c.memory_size, probs.shape[1], c.lambda_t, c.lambda_u)
        out, updated = self._new_adapt_out(), {}
        with torch.enable_grad():
            for i in range(len(inputs)):
                if not math.isfinite(uncertainty[i]):
                    continue  # a non-finite sample would poison every later update until evicted
                self.memory.add(inputs[i].detach().clone(), labels[i], uncertainty[i])
                self.n_seen += 1
                if self.n_seen % c.update_frequency == 0:
                    for _ in range(self.cfg.steps):
                        if not self._guarded_step(None, out, updated):
                            break
        self.optimizer.zero_grad(set_to_none=True)
        self._updated_count = sum(updated.values())
        stop_reason = out["stop_reason"]
        if stop_reason == "steps_done" and not out["losses"]:
            stop_reason = "no_update_due"  # fewer than update_frequency samples since the last update
        if self._check_collapse(out["class_entropy"]):
            stop_reason = "collapse_reset"
        t_adapt_end = time.perf_counter()
        if self.predict_from == "same_forward" and stop_reason != "collapse_reset":
            prediction, t_adapt = self._teacher_logits, t_adapt_end - t_start - t_forward
        else:
            prediction, t_adapt = self.predict_after_update(inputs), t_adapt_end - t_start
            t_forward = time.perf_counter() - t_adapt_end
        return StepResult(prediction.detach(), {
            "losses": out["losses"], "loss_diversity": out["loss_diversity"], "steps": out["steps"],
            "stop_reason": stop_reason, "updated_param_count": self.updated_param_count,
            "diversity_weight": out["diversity_weight"], "grad_norm": out["grad_norm"],
            "timing_fine_tuning": t_adapt, "timing_forward_pass": t_forward,
            "memory_size": self.memory.occupancy(), **class_distribution(prediction), **self.batch_stats,
        })
