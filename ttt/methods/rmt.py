"""RMT (Doebler, Marsden & Yang, CVPR 2023, "Robust Mean Teacher for Continual and Gradual
Test-Time Adaptation").

Reference: mariodoebler/test-time-adaptation `classification/methods/rmt.py`, `utils/losses.py`
(SymmetricCrossEntropy) and conf.py (RMT.LAMBDA_CE_SRC / LAMBDA_CE_TRG / LAMBDA_CONT = 1,
RMT.NUM_SAMPLES_WARM_UP 50,000, M_TEACHER.MOMENTUM 0.999, CONTRAST.TEMPERATURE 0.1,
PROJECTION_DIM 128, MODE all); `cfgs/cifar10_c/rmt.yaml`: Adam lr 1e-3, beta 0.9, batch 200.
Setup: the model in eval mode with BatchNorm on test-batch statistics, every parameter trainable
(`update_filter: all`), a mean teacher (a copy after that setup) and a projector
Linear(D, 128) - ReLU - Linear(128, 128) on the features, trained with the model.
Source data: `rmt.source_data`, labelled clean samples (on the embedded default, the MNIST-C clean
training split `train.npz` beside the manifest, 4,000 digits; configs/mnistc_rmt.yaml points there),
decoded and normalised by the model adapter. At construction:
  1. class prototypes: per class, the mean feature (the adapter's `embed`) of its source samples;
  2. warm-up: warmup_samples // batch_size steps on source batches of the symmetric cross-entropy
     SCE(student, teacher) with the learning rate rising linearly to ttt.lr, each followed by the
     teacher EMA; the state after it (model, teacher, projector, optimiser) is what `reset` restores.
Per test batch x (features f = embed, logits = classifier(f), x_a = one augmented view through the
adapter's `augment` hook, CoTTA's transform as the reference's get_tta_transforms):
  3. the nearest source prototype of each f (cosine); the supervised-contrastive loss (SupCon, all
     anchors, temperature T) over the three views [prototype, f, f(x_a)] of each sample through
     the projector: each view's positives are the other two views of the same sample;
  4. self-training: 0.5 SCE(student(x), teacher(x)) + 0.5 SCE(student(x_a), teacher(x)), SCE's
     teacher side without gradient;
  5. source replay: cross-entropy on the next labelled source batch (lambda_ce_src; 0 = source-free);
  6. loss = lambda_ce_trg x (4) + lambda_cont x (3) + lambda_ce_src x (5); optimiser step; then the
     teacher <- m teacher + (1 - m) student over every parameter;
  7. the prediction is student(x) + teacher(x) (logits) from that forward (`same_forward`).
Deviations on purpose: source batches cycle through a seeded permutation of the source set per
epoch (the reference's shuffled loader), and `reset` also puts that sequence back to where the
warm-up left it, so an episode does not depend on what ran before; the augmented view draws one
parameter set per batch (as the reference's batched transform). configs/mnistc_rmt.yaml warms up on
4,000 samples, one pass over the digits' source split as 50,000 is one pass over CIFAR-10's.
Analysis fields: loss_contrastive, loss_source, teacher_agreement (argmax student == teacher).

`PrototypeContrast` holds what RMT shares with SANTA (ttt/methods/santa.py): source samples,
prototypes, the projector and the contrastive loss.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ttt.methods.base import GradientMethod, seeded_generator
from ttt.methods.parts import augmented_view, build_optimizer, split_model
from ttt.methods.roid import symmetric_cross_entropy
from ttt.params import ema_update_, frozen_copy, restore, snapshot, use_batch_norm_stats


def load_labelled_images(path: str | None, n: int | None, seed: int, field: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from an .npz (`x`, `y`) or a Parquet manifest (`pixels`, `label`); with
    `n`, a seeded random subset of that size (in file order)."""
    if path is None:
        raise ValueError(f"{field} is not set: the method needs labelled clean source samples (an .npz with x and y, "
                         "e.g. the MNIST-C default's train.npz beside its manifest)")
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{field}: {path} does not exist")
    if file.suffix == ".npz":
        with np.load(file) as data:
            missing = [k for k in ("x", "y") if k not in data]
            if missing:
                raise ValueError(f"{field}: {path} lacks array(s) {missing} (arrays: {sorted(data.files)})")
            images, labels = data["x"], data["y"]
    elif file.suffix == ".parquet" or file.is_dir():
        import pyarrow.parquet as pq

        table = pq.read_table(file, columns=["pixels", "label"])
        images = np.asarray(table.column("pixels").to_pylist(), dtype=np.float32)
        labels = np.asarray(table.column("label").to_pylist())
    else:
        raise ValueError(f"{field}: {path} is neither an .npz nor a Parquet manifest")
    if len(images) == 0:
        raise ValueError(f"{field}: {path} holds no images")
    if n is not None and n < len(images):
        keep = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
        images, labels = images[keep], labels[keep]
    return images, labels.astype(np.int64)


def supcon_loss(features: torch.Tensor, projector: nn.Module, temperature: float) -> torch.Tensor:
    """Supervised-contrastive loss (SupCon, contrast mode `all`, no labels: positives are the other
    views of the same sample) of features [B, V, D] through `projector`, as the reference."""
    batch, views = features.shape[:2]
    contrast = F.normalize(projector(torch.cat(torch.unbind(features, dim=1), dim=0)), p=2, dim=1)
    logits = contrast @ contrast.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    positives = torch.eye(batch, device=features.device).repeat(views, views)
    not_self = 1.0 - torch.eye(batch * views, device=features.device)
    positives = positives * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    return -((positives * log_prob).sum(1) / positives.sum(1)).mean()


class PrototypeContrast(GradientMethod):
    """Source samples and prototypes, the projector and the contrastive term (RMT, SANTA)."""

    required_hooks = ("embed", "classifier", "augment")
    analysis_columns = GradientMethod.analysis_columns + ("loss_contrastive", "teacher_agreement")
    constant_attrs = ("source_x", "source_y", "prototypes", "features", "head", "_perm_cache", "_projector_source")

    @property
    def block(self) -> Any:
        return getattr(self.cfg, self.name)

    def configure(self) -> None:
        use_batch_norm_stats(self.model)  # prototypes come from the configured model, as the reference's
        self.features, self.head = split_model(self.adapter)
        self._load_source()
        self.prototypes = self._prototypes()
        with torch.random.fork_rng(devices=[]):  # the projector's initialisation from the seed alone
            torch.manual_seed(int(seeded_generator(self.cfg.seed, f"{self.name}.projector").initial_seed()) % 2**63)
            dim = self.prototypes.shape[1]
            self.projector = nn.Sequential(nn.Linear(dim, self.block.projection_dim), nn.ReLU(),
                                           nn.Linear(self.block.projection_dim, self.block.projection_dim))
        self.projector.to(self.prototypes.device)
        self._projector_source = snapshot(self.projector)
        self._perm_cache: dict[int, torch.Tensor] = {}
        self.source_batches = 0
        super().configure()
        use_batch_norm_stats(self.model)

    def extra_params(self) -> list[nn.Parameter]:
        return list(self.projector.parameters())

    def reset(self) -> None:
        super().reset()
        restore(self.projector, self._projector_source)
        self.source_batches = 0

    def make_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.params + self.extra_params(), self.cfg)

    def _load_source(self) -> None:
        field = f"ttt.{self.name}.source_data"
        images, labels = load_labelled_images(self.block.source_data, self.block.source_samples, self.cfg.seed, field)
        # each image keeps its layout (HW / CHW): a grey source converts to an RGB model's channels
        records = [{"sample_id": str(i), "pixels": img} for i, img in enumerate(images)]
        batches = []
        for batch in self.adapter.build_loader(records, batch_size=max(self.cfg.batch_size, 256)):
            if batch.errors:
                raise ValueError(f"{field}: {self.block.source_data}: {batch.errors[0][1]}")
            batches.append(batch.inputs)
        self.source_x = torch.cat(batches)
        self.source_y = torch.from_numpy(labels).to(self.source_x.device)

    @torch.no_grad()
    def _prototypes(self) -> torch.Tensor:
        feats = torch.cat([self.features(x) for x in self.source_x.split(self.cfg.batch_size)])
        n_classes = self.head.out_features
        missing = [c for c in range(n_classes) if not bool((self.source_y == c).any())]
        if missing:
            raise ValueError(f"ttt.{self.name}.source_data: no source sample of class(es) {missing[:10]} "
                             "to build their prototypes from")
        return torch.stack([feats[self.source_y == c].mean(0) for c in range(n_classes)])

    def next_source_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The source batch number `source_batches` of the per-epoch seeded permutations."""
        n = len(self.source_x)
        size = min(self.cfg.batch_size, n)
        epoch, j = divmod(self.source_batches, n // size)
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(n, generator=seeded_generator(self.cfg.seed + epoch,
                                                                                     f"{self.name}.source"))}
        idx = self._perm_cache[epoch][j * size:(j + 1) * size].to(self.source_x.device)
        self.source_batches += 1
        return self.source_x[idx], self.source_y[idx]

    def contrastive(self, f: torch.Tensor, f_aug: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            nearest = F.cosine_similarity(f.unsqueeze(1), self.prototypes.unsqueeze(0), dim=-1).argmax(1)
        views = torch.stack([self.prototypes[nearest], f, f_aug], dim=1)
        return supcon_loss(views, self.projector, self.block.temperature)

    def reseed(self) -> None:
        self._augment_generator = seeded_generator(self.cfg.seed, f"{self.name}.augment")

    def view(self, inputs: torch.Tensor) -> torch.Tensor:
        return augmented_view(self.adapter, inputs, self._augment_generator, self.block.flips)


class RMT(PrototypeContrast):
    name = "rmt"
    analysis_columns = PrototypeContrast.analysis_columns + ("loss_source",)
    constant_attrs = PrototypeContrast.constant_attrs + ("_after_warmup",)

    def configure(self) -> None:
        super().configure()
        self.teacher = frozen_copy(self.model)
        self._teacher_logits: torch.Tensor | None = None
        self.warmup()
        self._after_warmup = {"teacher": snapshot(self.teacher), "projector": snapshot(self.projector),
                              "optimizer": copy.deepcopy(self.optimizer.state_dict()), "source_batches": self.source_batches}

    def warmup(self) -> None:
        steps = self.block.warmup_samples // min(self.cfg.batch_size, len(self.source_x))
        with torch.enable_grad():
            for i in range(steps):
                for group in self.optimizer.param_groups:
                    group["lr"] = self.cfg.lr * (i + 1) / steps
                x, _ = self.next_source_batch()
                with torch.no_grad():
                    teacher = self.teacher(x)
                loss = symmetric_cross_entropy(self.model(x), teacher).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.update_teacher()
        self.optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr

    def update_teacher(self) -> None:
        ema_update_(list(self.teacher.parameters()), list(self.model.parameters()), self.block.ema_momentum)

    def reset(self) -> None:
        super().reset()  # the model (and a fresh optimiser)
        if hasattr(self, "_after_warmup"):
            saved = self._after_warmup
            restore(self.teacher, saved["teacher"])
            restore(self.projector, saved["projector"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.source_batches = saved["source_batches"]
        self._teacher_logits = None

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        b = self.block
        f = self.features(inputs)
        logits = self.head(f)
        f_aug = self.features(self.view(inputs))
        logits_aug = self.head(f_aug)
        with torch.no_grad():
            teacher = self.teacher(inputs)
        contrastive = self.contrastive(f, f_aug)
        self_training = (0.5 * symmetric_cross_entropy(logits, teacher)
                         + 0.5 * symmetric_cross_entropy(logits_aug, teacher)).mean()
        loss = b.lambda_ce_trg * self_training + b.lambda_cont * contrastive
        stats = {"loss_contrastive": float(contrastive.detach()),
                 "teacher_agreement": float((logits.detach().argmax(1) == teacher.argmax(1)).float().mean())}
        if b.lambda_ce_src > 0:
            xs, ys = self.next_source_batch()
            source = F.cross_entropy(self.head(self.features(xs)), ys)
            loss = loss + b.lambda_ce_src * source
            stats["loss_source"] = float(source.detach())
        self.batch_stats = stats
        self._teacher_logits = teacher
        return loss, logits, {"self_training": float(self_training.detach())}

    def after_step(self) -> None:
        self.update_teacher()

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.detach() + self._teacher_logits

    def predict_after_update(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inputs) + self.teacher(inputs)
