"""Method registry: `build_method(adapter, cfg, services)` is the one way to make a method."""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from ttt.config import TTTConfig
from ttt.methods.adacontrast import AdaContrast
from ttt.methods.base import GradientMethod, Method, MissingHookError, StepResult
from ttt.methods.bn_alpha import BNAlpha
from ttt.methods.cmf import CMF
from ttt.methods.cotta import CoTTA
from ttt.methods.deyo import DeYO
from ttt.methods.eata import EATA
from ttt.methods.lame import LAME
from ttt.methods.memo import MEMO
from ttt.methods.mim import MIM
from ttt.methods.nn import NN
from ttt.methods.nn_lm import NNLM
from ttt.methods.rmt import RMT
from ttt.methods.roid import ROID
from ttt.methods.rotta import RoTTA
from ttt.methods.rpl import RPL
from ttt.methods.santa import SANTA
from ttt.methods.sar import SAR
from ttt.methods.shot_im import SHOTIM
from ttt.methods.source import Norm, Source
from ttt.methods.t3a import T3A
from ttt.methods.tent import Tent
from ttt.methods.ttt_rotation import RotationTTT
from ttt.schema import analysis_schema

METHODS: dict[str, type[Method]] = {m.name: m for m in (Source, Norm, Tent, MIM, CoTTA, NN,
                                                         EATA, SAR, RoTTA, LAME, DeYO, ROID,
                                                         RMT, AdaContrast, CMF, MEMO, RPL, SANTA, T3A, SHOTIM,
                                                         BNAlpha, RotationTTT)}
# a method whose implementation depends on the model kind: (name, kind) -> class
BY_KIND: dict[tuple[str, str], type[Method]] = {("nn", "causal_lm"): NNLM}


def method_class(method: str, kind: str = "image_classifier") -> type[Method]:
    """The class that runs `method` on an adapter of `kind`: a built-in name, or a reference
    `package.module:Class` to a subclass of `Method` (ttt/methods/plugin.py)."""
    if ":" in method:
        from ttt.methods.plugin import resolve_method

        return resolve_method(method)
    if (method, kind) in BY_KIND:
        return BY_KIND[(method, kind)]
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"ttt.method={method!r} is not implemented; known: {sorted(METHODS)}") from None


def method_analysis_schema(method: str, kind: str = "image_classifier") -> pa.Schema:
    """The columns of the analysis parts of a run of `method` on a model of `kind`: the common ones
    and those the method's class declares (`analysis_columns`), typed by ttt/schema.py."""
    return analysis_schema(method_class(method, kind).analysis_columns)


def build_method(adapter: Any, cfg: TTTConfig, services: dict[str, Any] | None = None) -> Method:
    return method_class(cfg.method, getattr(adapter, "kind", "image_classifier"))(adapter, cfg, services)


__all__ = ["METHODS", "build_method", "method_class", "method_analysis_schema", "Method", "GradientMethod", "StepResult", "MissingHookError"]
