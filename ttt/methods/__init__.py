"""Method registry: `build_method(adapter, cfg, services)` is the one way to make a method."""
from __future__ import annotations

from typing import Any

from ttt.config import TTTConfig
from ttt.methods.base import GradientMethod, Method, MissingHookError, StepResult
from ttt.methods.cotta import CoTTA
from ttt.methods.mim import MIM
from ttt.methods.nn import NN
from ttt.methods.source import Norm, Source
from ttt.methods.tent import Tent

METHODS: dict[str, type[Method]] = {m.name: m for m in (Source, Norm, Tent, MIM, CoTTA, NN)}


def build_method(adapter: Any, cfg: TTTConfig, services: dict[str, Any] | None = None) -> Method:
    try:
        cls = METHODS[cfg.method]
    except KeyError:
        raise ValueError(f"ttt.method={cfg.method!r} is not implemented; known: {sorted(METHODS)}") from None
    return cls(adapter, cfg, services)


__all__ = ["METHODS", "build_method", "Method", "GradientMethod", "StepResult", "MissingHookError"]
