"""TTTConfig: every knob of a TTT method, validated, with the same names in YAML and on the CLI.

Defaults follow the reference Tent / CoTTA CIFAR-10-C configs where they apply; each baseline's
block (eata, sar, rotta, lame, deyo, roid, rmt, adacontrast, cmf, memo, rpl, santa, t3a, shot_im,
bn_alpha, ttt) carries its reference defaults.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from ttt.protocol import OnlineConfig

# your own method by reference: `mypkg.methods:MyMethod`, a subclass of ttt.methods.base.Method
# (ttt.methods.method_class imports and checks it)
MethodRef = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")]



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
    # the reference flips each augmented copy horizontally with probability 0.5; digits and text
    # change class or meaning when mirrored, so configs/mnistc_cotta.yaml turns it off
    flips: bool = True


class EATAConfig(_Strict):
    """EATA (Niu et al. 2022); defaults of the CIFAR-10-C config of mariodoebler/test-time-adaptation
    (the EATA repo's ImageNet defaults are d_margin 0.05, fisher_alpha 2000)."""

    e_margin: float = Field(0.4, gt=0.0)  # reliable if entropy < e_margin * ln(C)
    d_margin: float = Field(0.4, ge=0.0, le=1.0)  # redundant if cosine to the moving average >= d_margin
    fisher_alpha: float = Field(1.0, ge=0.0)  # weight of the Fisher anti-forgetting term
    # clean source samples for the Fisher information: an .npz with images under `x` (uint8 0-255 or
    # float 0-1, [N, H, W] or [N, C, H, W]; the MNIST-C default's train.npz) or a Parquet manifest with
    # a `pixels` column; decoded and normalised by the model adapter. None = ETA (no Fisher term).
    fisher_data: str | None = None
    fisher_samples: int = Field(2000, ge=1)  # the reference's SOURCE.NUM_SAMPLES


class SARConfig(_Strict):
    """SAR (Niu et al. 2023), reference defaults (mr-eggplant/SAR)."""

    e_margin: float = Field(0.4, gt=0.0)  # reliable if entropy < e_margin * ln(C)
    rho: float = Field(0.05, ge=0.0)  # SAM neighbourhood radius
    reset_constant: float = Field(0.2, ge=0.0)  # recover the source model when the entropy EMA falls below
    ema_momentum: float = Field(0.9, ge=0.0, lt=1.0)  # of the second-forward entropy (fixed 0.9 in the reference)


class RoTTAConfig(_Strict):
    """RoTTA (Yuan et al. 2023), reference defaults (BIT-DA/RoTTA configs/adapter/rotta.yaml)."""

    memory_size: int = Field(64, ge=1)
    update_frequency: int = Field(64, ge=1)  # one update per this many test samples
    nu: float = Field(0.001, ge=0.0, le=1.0)  # teacher <- (1 - nu) * teacher + nu * student
    alpha: float = Field(0.05, ge=0.0, le=1.0)  # robust BN: weight of the batch statistics
    lambda_t: float = Field(1.0, ge=0.0)  # memory eviction score: timeliness
    lambda_u: float = Field(1.0, ge=0.0)  # memory eviction score: uncertainty
    flips: bool = True  # the strong augmentation is CoTTA's; off for digits (see cotta.flips)


class LAMEConfig(_Strict):
    """LAME (Boudiaf et al. 2022), reference defaults (fiveai/LAME src/config/defaults.py)."""

    affinity: Literal["rbf", "knn", "linear"] = "rbf"  # rbf: bandwidth = mean distance to the knn-th neighbour
    knn: int = Field(5, ge=1)
    force_symmetry: bool = False
    max_steps: int = Field(100, ge=1)  # of the bound optimisation (converges earlier)
    bound_lambda: float = Field(1.0, ge=0.0)


class DeYOConfig(_Strict):
    """DeYO (Lee et al. 2024), defaults of mariodoebler/test-time-adaptation (= Jhyun17/DeYO's)."""

    margin: float = Field(0.5, gt=0.0)  # entropy filter: entropy < margin * ln(C)
    margin_e0: float = Field(0.4, gt=0.0)  # entropy re-weighting: exp(-(E - margin_e0 * ln(C)))
    plpd_threshold: float = 0.2  # keep samples whose PLPD > threshold
    reweight_ent: bool = True
    reweight_plpd: bool = True
    aug_type: Literal["patch", "pixel"] = "patch"  # the object-destructive view
    patch_len: int = Field(4, ge=1)  # patch: a grid of patch_len x patch_len patches is shuffled


class ROIDConfig(_Strict):
    """ROID (Marsden et al. 2024), defaults of mariodoebler/test-time-adaptation (conf.py)."""

    use_weighting: bool = True  # certainty x diversity sample weights
    use_prior_correction: bool = True
    use_consistency: bool = True  # symmetric CE against an augmented view
    momentum_src: float = Field(0.99, ge=0.0, le=1.0)  # weight ensembling: p <- m * p + (1 - m) * p_source
    momentum_probs: float = Field(0.9, ge=0.0, le=1.0)  # of the class-probability moving average
    temperature: float = Field(1 / 3, gt=0.0)
    flips: bool = True  # the augmented view's horizontal flip (off for digits)


class RMTConfig(_Strict):
    """RMT (Doebler et al. 2023), defaults of mariodoebler/test-time-adaptation (conf.py RMT.*,
    M_TEACHER.*, CONTRAST.*)."""

    lambda_ce_src: float = Field(1.0, ge=0.0)  # source replay (0 = the source-free variant)
    lambda_ce_trg: float = Field(1.0, ge=0.0)  # self-training (symmetric CE against the teacher)
    lambda_cont: float = Field(1.0, ge=0.0)  # contrastive loss with the source prototypes
    ema_momentum: float = Field(0.999, ge=0.0, le=1.0)  # teacher <- m * teacher + (1 - m) * student
    temperature: float = Field(0.1, gt=0.0)  # of the contrastive loss
    projection_dim: int = Field(128, ge=1)
    warmup_samples: int = Field(50000, ge=0)  # source samples of the mean-teacher warm-up (0 = none)
    # labelled clean source samples (prototypes, warm-up, replay): an .npz with `x` and `y` (the MNIST-C
    # default's train.npz) or a Parquet manifest with `pixels` and `label`; required
    source_data: str | None = None
    source_samples: int | None = Field(None, ge=1)  # None = all (the reference's SOURCE.NUM_SAMPLES -1)
    flips: bool = True  # the augmented view is CoTTA's transform; off for digits (see cotta.flips)


class SANTAConfig(_Strict):
    """SANTA (Chakrabarty et al. 2023), defaults of mariodoebler/test-time-adaptation (SANTA.*, CONTRAST.*)."""

    lambda_ce_trg: float = Field(1.0, ge=0.0)
    lambda_cont: float = Field(1.0, ge=0.0)
    temperature: float = Field(0.1, gt=0.0)
    projection_dim: int = Field(128, ge=1)
    source_data: str | None = None  # labelled source samples for the prototypes (as rmt.source_data); required
    source_samples: int | None = Field(None, ge=1)
    flips: bool = True


class AdaContrastConfig(_Strict):
    """AdaContrast (Chen et al. 2022), defaults of mariodoebler/test-time-adaptation (ADACONTRAST.*,
    cfgs/cifar10_c/adacontrast.yaml: SGD lr 2e-4, momentum 0.9, Nesterov, weight decay 1e-4, T 0.07)."""

    queue_size: int = Field(16384, ge=1)  # MoCo queue and the nearest-neighbour feature bank
    momentum: float = Field(0.999, ge=0.0, le=1.0)  # key (momentum) encoder EMA
    temperature: float = Field(0.07, gt=0.0)  # MoCo softmax temperature
    contrast_type: Literal["class_aware", "nearest"] = "class_aware"  # class_aware: same-pseudo-label keys are not negatives
    alpha: float = Field(1.0, ge=0.0)  # classification (pseudo-label CE) weight
    beta: float = Field(1.0, ge=0.0)  # instance (MoCo) loss weight
    eta: float = Field(1.0, ge=0.0)  # diversity loss weight
    dist_type: Literal["cosine", "euclidean"] = "cosine"
    num_neighbors: int = Field(10, ge=1)
    refine_after: int = Field(1024, ge=0)  # samples seen before pseudo-labels are refined (fixed 1024 in the reference)
    nesterov: bool = True
    flips: bool = True  # the weak view's flip and the strong views' (off for digits)


class CMFConfig(_Strict):
    """CMF (Lee et al. 2024), defaults of mariodoebler/test-time-adaptation (CMF.*; the loss is ROID's
    and its knobs, ROID.* in the reference, are repeated here so a CMF run is configured in one block)."""

    alpha: float = Field(0.99, ge=0.0, le=1.0)  # hidden model's pull back to the source (predict step)
    gamma: float = Field(0.99, ge=0.0, le=1.0)  # target model <- gamma * target + (1 - gamma) * hidden
    q: float = Field(0.005, ge=0.0)  # process noise, scaled by trainable parameters / 38,400 as the reference
    type: Literal["lp", "op"] = "lp"  # ensemble with the filtered (lp) or predicted (op) hidden model
    use_weighting: bool = True
    use_prior_correction: bool = True
    use_consistency: bool = True
    momentum_probs: float = Field(0.9, ge=0.0, le=1.0)
    temperature: float = Field(1 / 3, gt=0.0)
    flips: bool = True


class MEMOConfig(_Strict):
    """MEMO (Zhang et al. 2022), defaults of mariodoebler/test-time-adaptation (cfgs/cifar10_c/memo.yaml:
    SGD lr 5e-3, momentum 0.9, Nesterov, batch 1, episodic, 32 augmentations, alpha-BN 0.1)."""

    n_augmentations: int = Field(32, ge=1)
    bn_alpha: float = Field(0.1, ge=0.0, le=1.0)  # weight of the test statistics in every BatchNorm
    nesterov: bool = True
    flips: bool = True


class RPLConfig(_Strict):
    """RPL (Rusak et al. 2022), mariodoebler/test-time-adaptation RPL.Q."""

    q: float = Field(0.8, gt=0.0, le=1.0)  # generalised cross-entropy (1 - p^q) / q


class T3AConfig(_Strict):
    """T3A (Iwasawa & Matsuo 2021), matsuolab/T3A hparams (filter_K 100)."""

    filter_k: int = Field(100, ge=-1)  # supports kept per class, lowest entropy first (-1 = all)

    @model_validator(mode="after")
    def _not_zero(self) -> "T3AConfig":
        if self.filter_k == 0:
            raise ValueError("filter_k must be >= 1 or -1 (all)")
        return self


class SHOTIMConfig(_Strict):
    """SHOT-IM (Liang et al. 2020): information maximisation, tim-learn/SHOT (epsilon 1e-5)."""

    div_weight: float = Field(1.0, ge=0.0)  # weight of the diversity term (the reference's gent, weight 1)
    epsilon: float = Field(1e-5, gt=0.0)


class BNAlphaConfig(_Strict):
    """alpha-BN (Schneider et al. 2020), mariodoebler/test-time-adaptation BN.ALPHA."""

    alpha: float = Field(0.1, ge=0.0, le=1.0)  # (1 - alpha) * source + alpha * test statistics


class RotationTTTConfig(_Strict):
    """TTT (Sun et al. 2020), yueatsprograms/ttt_cifar_release: the rotation task."""

    # expand: each image in all four rotations (the reference's training and rotation-error labels);
    # rand: one random rotation per image (its test-time adaptation on augmented copies)
    rotations: Literal["expand", "rand"] = "expand"
    # adapt only when the rotation head's confidence in "unrotated" on the batch is below (1 = always, the reference's)
    threshold: float = Field(1.0, ge=0.0, le=1.0)


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
    method: Literal["source", "norm", "tent", "mim", "cotta", "nn",
                    "eata", "sar", "rotta", "lame", "deyo", "roid",
                    "rmt", "adacontrast", "cmf", "memo", "rpl", "santa", "t3a", "shot_im", "bn_alpha",
                    "ttt"] | MethodRef = "source"
    method_kwargs: dict[str, Any] = {}  # a referenced method's own options (read as self.cfg.method_kwargs)
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
    eata: EATAConfig = EATAConfig()
    sar: SARConfig = SARConfig()
    rotta: RoTTAConfig = RoTTAConfig()
    lame: LAMEConfig = LAMEConfig()
    deyo: DeYOConfig = DeYOConfig()
    roid: ROIDConfig = ROIDConfig()
    rmt: RMTConfig = RMTConfig()
    adacontrast: AdaContrastConfig = AdaContrastConfig()
    cmf: CMFConfig = CMFConfig()
    memo: MEMOConfig = MEMOConfig()
    rpl: RPLConfig = RPLConfig()
    santa: SANTAConfig = SANTAConfig()
    t3a: T3AConfig = T3AConfig()
    shot_im: SHOTIMConfig = SHOTIMConfig()
    bn_alpha: BNAlphaConfig = BNAlphaConfig()
    ttt: RotationTTTConfig = RotationTTTConfig()
    guards: GuardConfig = GuardConfig()
    nn: NNConfig = NNConfig()
    # -- evaluation protocol (ttt/protocol.py): shared by every method, not a method's knob --
    protocol: Literal["offline", "online"] = "offline"  # online: batches that arrive mid-step are not adapted on
    online: OnlineConfig = OnlineConfig()  # eta and the cost table of protocol: online
    reset_every: int | None = Field(None, ge=1)  # RDumb: back to the source model every N adapted batches
