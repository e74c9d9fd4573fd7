"""Helpers that several methods share: the optimiser a config names, a method's augmented view
of a batch (CoTTA, RoTTA, ROID, ...) and a model split into features and classifier (T3A,
SHOT-IM, RMT, SANTA, AdaContrast).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ttt.augment import random_hflip
from ttt.config import TTTConfig


def build_optimizer(params: list[nn.Parameter], cfg: TTTConfig, nesterov: bool = False) -> torch.optim.Optimizer:
    """Adam (beta1 = cfg.momentum) or SGD; `nesterov` (SGD with momentum only) for the methods whose
    reference uses it (AdaContrast, MEMO: mariodoebler's OPTIM.NESTEROV)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=nesterov and cfg.momentum > 0)


def augmented_view(adapter: Any, inputs: torch.Tensor, generator: torch.Generator, flips: bool) -> torch.Tensor:
    """One augmented copy of the batch through the adapter's `augment` hook (CoTTA's transforms,
    one parameter set per copy), horizontally flipped with probability 0.5 when `flips` is on:
    the hook has no flip switch, so the method's config decides (ttt.augment's docstring)."""
    view = adapter.augment(inputs, generator)
    return random_hflip(view, generator) if flips else view


def split_model(adapter: Any, model: nn.Module | None = None) -> tuple[Any, nn.Linear]:
    """(features, classifier) of a model for the methods that need both (T3A, SHOT-IM, RMT, SANTA,
    AdaContrast): `features(x)` is the adapter's `embed` hook flattened, `classifier` the final
    linear layer it feeds (the adapter's `classifier` hook). With `model` (a copy of the adapter's,
    e.g. a teacher), the same two taken from that copy: its `embed` and its layer at the same name."""
    head = adapter.classifier()
    if model is None or model is adapter.get_model():
        return (lambda x: adapter.embed(x).flatten(1)), head
    names = {id(m): n for n, m in adapter.get_model().named_modules()}
    if id(head) not in names:
        raise ValueError("the classifier hook's layer is not a submodule of the model")
    copy_head = model.get_submodule(names[id(head)])
    return (lambda x: model.embed(x).flatten(1)), copy_head
