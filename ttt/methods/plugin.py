"""Your own method by reference: `ttt.method: mypkg.methods:MyMethod` (+ `ttt.method_kwargs`).

The class must be a subclass of `ttt.methods.base.Method` (usually of `GradientMethod`, which
brings the guarded steps, optimiser, rollback and collapse guards: a subclass defines `loss`),
defined in your own package. Refused before anything runs, in one line, like model factories:
standard-library and builtin names, `__main__`, anything that is not a class, and classes that are
not methods. The job imports it on the driver (start-up checks) and in every worker, so the
package must be importable there (README, "Your own model and manifest").
"""
from __future__ import annotations

import importlib
import inspect
import sys

from ttt.methods.base import Method


def resolve_method(ref: str) -> type[Method]:
    module_name, _, attr = ref.partition(":")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in ("builtins", "__main__"):
        raise ValueError(f"ttt.method {ref!r}: {top!r} is not your package; name a Method subclass in your own "
                         "package, e.g. mypkg.methods:MyMethod")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"ttt.method {ref!r}: cannot import {module_name!r} ({exc})") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if obj is None:
        raise ValueError(f"ttt.method {ref!r}: {module_name} has no {attr!r}")
    if not inspect.isclass(obj) or not issubclass(obj, Method) or obj is Method:
        what = type(obj).__name__ if not inspect.isclass(obj) else f"class {obj.__qualname__}"
        raise ValueError(f"ttt.method {ref!r}: {what} is not a method (a subclass of ttt.methods.base.Method, "
                         "e.g. of GradientMethod with a `loss`)")
    origin = (obj.__module__ or "").split(".")[0]
    if origin in sys.stdlib_module_names or origin in ("builtins", "__main__"):
        raise ValueError(f"ttt.method {ref!r} is defined in {origin!r}, not in your package")
    return obj
