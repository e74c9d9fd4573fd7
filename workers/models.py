"""Load a model replica from a factory reference and a checkpoint, as a user's own model would be.

The factory reference (`package.module:function`) is the only thing a config may cause to be
executed; checkpoints load with `weights_only=True`.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelLoadError(ValueError):
    pass


def resolve_factory(ref: str):
    module_name, _, func_name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"model.factory {ref!r}: cannot import {module_name!r} ({exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelLoadError(f"model.factory {ref!r}: {module_name} has no callable {func_name!r}")
    return func


def load_model(factory: str, checkpoint: str | None, factory_kwargs: dict[str, Any] | None = None,
               device: str = "cpu") -> nn.Module:
    model = resolve_factory(factory)(**(factory_kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model.factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelLoadError(f"model.checkpoint not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"model.checkpoint {path}: cannot load with weights_only=True ({type(exc).__name__}: {exc})") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"model.checkpoint {path} does not fit {factory}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()
