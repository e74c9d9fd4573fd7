"""T3A (Iwasawa & Matsuo, NeurIPS 2021, "Test-Time Classifier Adjustment Module for Model-Agnostic
Domain Generalization"): a back-propagation-free classifier built from per-class support sets.

Reference: matsuolab/T3A `domainbed/adapt_algorithms.py` (class T3A), hparam filter_K 100 (the
DomainBed registry's default; TTAB's top_M 100). No parameter changes; the source model in eval mode
(its own BatchNorm statistics) gives features z (the adapter's `embed` hook) and the linear
classifier W (its `classifier` hook). The support set starts with W's rows (labelled by the
classifier's argmax on them, with their entropy). Per batch:
  1. each test sample joins the support set with its pseudo-label argmax W z and the entropy of
     softmax(W z);
  2. per class, only the filter_k supports of lowest entropy stay (all with -1);
  3. the prediction is z . w_c with w_c the L2-normalised sum of the class's L2-normalised
     supports (no bias), so a sample is classified by its batch's and earlier batches' most
     confident samples of each class.
The support set carries over batches (continual); `reset` (episodic, domain shifts) returns to the
classifier's rows. `same_forward` and `after_update` coincide.
Deviation on purpose: the reference's filter_K = -1 still slices [:-1] and so drops each class's
highest-entropy support; here -1 keeps them all. Ties in entropy keep the earlier support (a stable
sort; the reference's sort order on ties is unspecified).
Analysis fields: support_size, n_changed (predictions that differ from the classifier's own).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ttt.losses import class_distribution, softmax_entropy
from ttt.methods.base import Method, StepResult
from ttt.methods.parts import split_model


def select_supports(entropy: torch.Tensor, labels: torch.Tensor, n_classes: int, filter_k: int) -> torch.Tensor:
    """Indices of the supports kept: per class (in class order), the filter_k of lowest entropy."""
    keep = []
    for c in range(n_classes):
        idx = (labels == c).nonzero().flatten()
        order = torch.sort(entropy[idx], stable=True).indices
        keep.append(idx[order] if filter_k == -1 else idx[order][:filter_k])
    return torch.cat(keep)


class T3A(Method):
    name = "t3a"
    analysis_columns = ("support_size", "n_changed")
    required_hooks = ("embed", "classifier")

    def configure(self) -> None:
        super().configure()
        self.features, self.head = split_model(self.adapter)
        with torch.no_grad():
            weights = self.head.weight.detach().clone()
            logits = self.head(weights)
        self.n_classes = logits.shape[1]
        self.warmup = (weights, logits.argmax(1), softmax_entropy(logits))
        self.reset_supports()

    def reset_supports(self) -> None:
        self.supports, self.labels, self.entropy = (t.clone() for t in self.warmup)

    def reset(self) -> None:
        super().reset()
        self.reset_supports()

    def step(self, inputs: torch.Tensor) -> StepResult:
        t0 = time.perf_counter()
        with torch.no_grad():
            z = self.features(inputs)
            logits = self.head(z)
        t_forward = time.perf_counter() - t0
        with torch.no_grad():
            supports = torch.cat([self.supports, z])
            labels = torch.cat([self.labels, logits.argmax(1)])
            entropy = torch.cat([self.entropy, softmax_entropy(logits)])
            keep = select_supports(entropy, labels, self.n_classes, self.cfg.t3a.filter_k)
            self.supports, self.labels, self.entropy = supports[keep], labels[keep], entropy[keep]
            one_hot = F.one_hot(self.labels, self.n_classes).to(z.dtype)
            weights = F.normalize(F.normalize(self.supports, dim=1).t() @ one_hot, dim=0)
            adjusted = z @ weights
        record = {"steps": 0, "stop_reason": "no_adaptation", "updated_param_count": 0,
                  "timing_forward_pass": t_forward, "timing_fine_tuning": time.perf_counter() - t0 - t_forward,
                  "support_size": len(self.supports),
                  "n_changed": int((adjusted.argmax(1) != logits.argmax(1)).sum()), **class_distribution(adjusted)}
        return StepResult(adjusted, record)

    constant_attrs = ("features", "head", "warmup", "n_classes")
