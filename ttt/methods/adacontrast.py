"""AdaContrast (Chen, Wang, Hoffman & Darrell, CVPR 2022, "Contrastive Test-Time Adaptation").

Reference: mariodoebler/test-time-adaptation `classification/methods/adacontrast.py` (after
DianCh/AdaContrast), conf.py ADACONTRAST.* (queue 16,384, class-aware contrast, alpha = beta = eta
= 1, cosine distance, 10 neighbours, weak-strong supervision), M_TEACHER.MOMENTUM 0.999, and
`cfgs/cifar10_c/adacontrast.yaml`: SGD lr 2e-4, momentum 0.9, Nesterov, weight decay 1e-4, MoCo
temperature 0.07, batch 200. Every parameter trains (`update_filter: all`); BatchNorm is in training
mode for the adaptation forwards (batch statistics, running statistics updated), as the reference's
model.train(). A key (momentum) encoder, a copy of the model, and a MoCo queue of queue_size
L2-normalised key features with their pseudo-labels (initialised at random from the seed, as the
reference's randn / randint), and a feature bank (the key encoder's features and softmax of weak
views, a ring of queue_size) for the nearest-neighbour refinement. Per batch x, with the weak view
x_w (x flipped with p 0.5 when `adacontrast.flips`, the CIFAR "plain" transform) and two strong views
x_q, x_k (each one call of the adapter's `augment` hook):
  1. student features and logits of x_w; pseudo-labels = argmax of the mean softmax of the
     num_neighbors bank entries nearest (cosine) to each feature, once refine_after samples have
     been seen (before that, the student's argmax);
  2. student logits of x_q and q = normalise(features(x_q)); the key encoder <- EMA of the student
     (all parameters, momentum m) before the keys k = normalise(key features(x_k)) are computed;
  3. instance logits [q.k, q.queue] / T; the queue is then updated with (k, pseudo-labels) and, in
     `class_aware` mode, queue entries that share the sample's pseudo-label (by the updated queue
     labels, as the reference orders it) are no negatives; loss_ins = CE(instance logits, 0);
  4. loss = alpha x CE(logits(x_q), pseudo-labels) + beta x loss_ins + eta x sum p_bar log p_bar
     (p_bar: mean softmax of logits(x_q)); optimiser step;
  5. the bank takes the key encoder's features and softmax of x_w (training-mode BatchNorm);
  6. the prediction: the student on x in eval mode (running statistics) after the update
     (`after_update`, the reference's forward).
Deviations on purpose: the strong views are the adapter's `augment` transform (CoTTA's) drawn once
per batch, not MoCo-v2-light per image; the weak view is x itself when flips are off (digits). The
key-encoder EMA and the queue update of step 2-3 happen in the loss, so a step the guards roll back
leaves them moved (the student's parameters, buffers and optimiser are restored).
Analysis fields: loss_contrastive (the instance loss), n_refined (pseudo-labels the refinement changed
against the student's argmax), memory_size (entries in the feature bank), teacher_agreement (key
encoder's argmax on x_w == the pseudo-label).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ttt.augment import random_hflip
from ttt.methods.base import GradientMethod, StepResult, seeded_generator
from ttt.methods.parts import augmented_view, build_optimizer, split_model
from ttt.methods.ttt_rotation import set_batch_norm_training
from ttt.params import ema_update_, frozen_copy, restore


def knn_pseudo_labels(features: torch.Tensor, bank_features: torch.Tensor, bank_probs: torch.Tensor,
                      k: int, dist_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, probs): the mean softmax of the k bank entries nearest to each feature, its argmax."""
    if dist_type == "cosine":
        distances = 1 - F.normalize(features, dim=1) @ F.normalize(bank_features, dim=1).t()
    else:
        distances = torch.cdist(features, bank_features)
    idx = distances.topk(min(k, len(bank_features)), dim=1, largest=False).indices
    probs = bank_probs[idx].mean(1)
    return probs.argmax(1), probs


class AdaContrast(GradientMethod):
    name = "adacontrast"
    analysis_columns = GradientMethod.analysis_columns + ("loss_contrastive", "n_refined", "teacher_agreement", "memory_size")
    required_hooks = ("embed", "classifier", "augment")
    default_predict_from = "after_update"
    constant_attrs = ("features", "head", "key_features", "key_head")

    def configure(self) -> None:
        super().configure()
        self.features, self.head = split_model(self.adapter)
        self.key_model = frozen_copy(self.model)
        self.key_features, self.key_head = split_model(self.adapter, self.key_model)
        self.init_memory()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.params, self.cfg, nesterov=self.cfg.adacontrast.nesterov)

    def init_memory(self) -> None:
        c = self.cfg.adacontrast
        g = seeded_generator(self.cfg.seed, "adacontrast.queue")
        dim, n_classes = self.head.in_features, self.head.out_features
        device = self.head.weight.device
        self.queue = F.normalize(torch.randn(dim, c.queue_size, generator=g), dim=0).to(device)
        self.queue_labels = torch.randint(0, n_classes, (c.queue_size,), generator=g).to(device)
        self.queue_ptr = 0
        self.bank_features = torch.zeros(0, dim, device=device)
        self.bank_probs = torch.zeros(0, n_classes, device=device)
        self.bank_ptr = 0
        self.n_seen = 0

    def reseed(self) -> None:
        self._augment_generator = seeded_generator(self.cfg.seed, "adacontrast.augment")

    def reset(self) -> None:
        super().reset()
        restore(self.key_model, self.source_state)
        self.init_memory()

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        size = self.queue.shape[1]
        idx = torch.arange(self.queue_ptr, self.queue_ptr + len(keys), device=keys.device) % size
        self.queue[:, idx] = keys.t()
        self.queue_labels[idx] = labels
        self.queue_ptr = (self.queue_ptr + len(keys)) % size

    @torch.no_grad()
    def _update_bank(self, features: torch.Tensor, probs: torch.Tensor) -> None:
        size = self.cfg.adacontrast.queue_size
        if len(self.bank_features) < size:
            self.bank_features = torch.cat([self.bank_features, features])[:size]
            self.bank_probs = torch.cat([self.bank_probs, probs])[:size]
            self.bank_ptr = (self.bank_ptr + len(features)) % len(self.bank_features)
        else:
            idx = torch.arange(self.bank_ptr, self.bank_ptr + len(features), device=features.device) % size
            self.bank_features[idx] = features
            self.bank_probs[idx] = probs
            self.bank_ptr = (self.bank_ptr + len(features)) % size

    def loss(self, _inputs: object) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        c = self.cfg.adacontrast
        x_w, x_q, x_k = self._views
        set_batch_norm_training(self.model, True)
        set_batch_norm_training(self.key_model, True)
        try:
            logits_w = self.head(f_w := self.features(x_w))
            with torch.no_grad():
                probs_w = logits_w.softmax(1)
                if self.n_seen >= c.refine_after and len(self.bank_features):
                    pseudo, _ = knn_pseudo_labels(f_w, self.bank_features, self.bank_probs, c.num_neighbors, c.dist_type)
                else:
                    pseudo = probs_w.argmax(1)
                    self.n_seen += len(f_w)
            n_refined = int((pseudo != probs_w.argmax(1)).sum())
            f_q = self.features(x_q)
            logits_q = self.head(f_q)
            q = F.normalize(f_q, dim=1)
            with torch.no_grad():
                ema_update_(list(self.key_model.parameters()), list(self.model.parameters()), c.momentum)
                k = F.normalize(self.key_features(x_k), dim=1)
            logits_ins = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone()], dim=1) / c.temperature
            self._enqueue(k, pseudo)
            if c.contrast_type == "class_aware":
                negatives = torch.ones_like(logits_ins, dtype=torch.bool)
                negatives[:, 1:] = pseudo.unsqueeze(1) != self.queue_labels.unsqueeze(0)
                logits_ins = logits_ins.masked_fill(~negatives, float("-inf"))
            loss_ins = F.cross_entropy(logits_ins, torch.zeros(len(q), dtype=torch.long, device=q.device))
            loss_cls = F.cross_entropy(logits_q, pseudo)
            mean_prob = logits_q.softmax(1).mean(0)
            loss_div = (mean_prob * torch.log(mean_prob + 1e-8)).sum()
        finally:
            set_batch_norm_training(self.model, False)
            set_batch_norm_training(self.key_model, False)
        self.batch_stats = {"loss_contrastive": float(loss_ins.detach()), "n_refined": n_refined}
        self._pseudo_check = pseudo
        loss = c.alpha * loss_cls + c.beta * loss_ins + c.eta * loss_div
        return loss, logits_w, {"classification": float(loss_cls.detach())}

    def after_step(self) -> None:
        x_w = self._views[0]
        set_batch_norm_training(self.key_model, True)
        try:
            with torch.no_grad():
                f = self.key_features(x_w)
                logits = self.key_head(f)
        finally:
            set_batch_norm_training(self.key_model, False)
        self._update_bank(f, logits.softmax(1))
        self.batch_stats["teacher_agreement"] = float((logits.argmax(1) == self._pseudo_check).float().mean()) \
            if self._pseudo_check is not None else None

    def step(self, inputs: torch.Tensor) -> StepResult:
        c = self.cfg.adacontrast
        g = self._augment_generator
        x_w = random_hflip(inputs, g) if c.flips else inputs
        self._views = (x_w, augmented_view(self.adapter, inputs, g, c.flips),
                       augmented_view(self.adapter, inputs, g, c.flips))
        self._pseudo_check = None
        result = super().step(inputs)
        result.record["memory_size"] = len(self.bank_features)
        self._views = self._pseudo_check = None
        return result
