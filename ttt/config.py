"""TTTConfig: every knob of a TTT method, validated, with the same names in YAML and on the CLI.

Defaults follow the reference Tent / CoTTA CIFAR-10-C configs where they apply.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MIMConfig(_Strict):
    mask_prob: float = Field(0.5, ge=0.0, le=1.0)
    patch_size: int = Field(4, ge=1)
    mask_value: float = 0.0


class CoTTAConfig(_Strict):
    ema_alpha: float = Field(0.999, ge=0.0, le=1.0)
    restore_prob: float = Field(0.01, ge=0.0, le=1.0)
    anchor_threshold: float = Field(0.92, ge=0.0, le=1.0)
    n_augmentations: int = Field(32, ge=1)


class GuardConfig(_Strict):
    """Guards against collapse; every breach names itself in the analysis `stop_reason`."""

    diversity_weight: float = Field(0.0, ge=0.0)  # base weight w of (1 - normalised class entropy)
    diversity_target: float = Field(0.7, ge=0.0, le=1.0)  # weight grows when diversity falls below
    diversity_gain: float = Field(0.0, ge=0.0)
    diversity_cap: float = Field(10.0, ge=0.0)
    early_stop_entropy: float | None = Field(None, ge=0.0, le=1.0)  # stop a batch's steps below
    collapse_patience: int = Field(0, ge=0)  # reset after this many collapsed batches (0 = never)
    grad_clip: float | None = Field(None, gt=0.0)
    max_update_norm: float | None = Field(None, gt=0.0)  # per step
    max_cumulative_update_norm: float | None = Field(None, gt=0.0)  # since the last reset
    loss_ratio_stop: float | None = Field(None, gt=0.0)  # stop when loss > initial * ratio

    @model_validator(mode="after")
    def _collapse_needs_threshold(self) -> "GuardConfig":
        # A batch counts as collapsed below early_stop_entropy; without it patience would never fire.
        if self.collapse_patience and self.early_stop_entropy is None:
            raise ValueError("guards.collapse_patience needs guards.early_stop_entropy (the class-entropy "
                             "threshold below which a batch counts as collapsed)")
        return self


class NNConfig(_Strict):
    """Retrieval-based TTT (Hardt & Sun 2024; CT3)."""

    k: int = Field(8, ge=0)
    min_score: float | None = None  # drop neighbours scoring below
    score_weighted: bool = False
    use_cache: bool = False
    cache_threshold: float = Field(0.95, ge=-1.0, le=1.0)  # cosine of batch key to an entry for a hit
    cache_capacity: int = Field(256, ge=1)  # adapters held by the shared cache actor
    cache_eviction: Literal["lfu", "lru", "random"] = "lru"
    # causal LMs only: one optimiser step per neighbour (TTT-NN) or one step on all per epoch (= ttt.steps)
    one_step_per_neighbour: bool = True
    logit_lens_top_k: int = Field(0, ge=0)  # causal LMs: top tokens per layer before/after adaptation (0 = off)
    logit_lens_position: int = -2  # token position read (-2: the prediction of the text's last token)


class TTTConfig(_Strict):
    method: Literal["source", "norm", "tent", "mim", "cotta", "nn"] = "source"
    steps: int = Field(1, ge=0)
    lr: float = Field(1e-3, gt=0.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # Adam beta1 / SGD momentum
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(200, ge=1)
    max_batches: int | None = Field(None, ge=1)  # per shard; None = all
    episodic: bool = False
    reset_on_domain_change: bool = False  # the Tent paper's protocol: reset at each domain shift
    update_filter: Literal["all", "norm_only", "adapter_only"] = "norm_only"
    predict_from: Literal["same_forward", "after_update"] | None = None  # None = method default
    seed: int = 0
    log_out: str | None = None
    mim: MIMConfig = MIMConfig()
    cotta: CoTTAConfig = CoTTAConfig()
    guards: GuardConfig = GuardConfig()
    nn: NNConfig = NNConfig()
