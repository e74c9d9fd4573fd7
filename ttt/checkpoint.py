"""Checkpoint a method's adaptation state mid-stream, so a shard can go on from where it was.

A continual method carries state from batch to batch: the adapted model (parameters and
buffers), the optimiser's moments, a teacher or anchor model, random generators, counters and
moving averages. `capture(method)` walks the method's attributes and copies every piece of
such state into plain containers of CPU tensors and Python scalars (what `torch.load(...,
weights_only=True)` reads back on any node, GPU or not); `restore(method, state)` writes it back
in place into a method built fresh from the same config, so a stream resumed from a checkpoint
gives the same rows, bit for bit, as one that never stopped. Torch's (CPU and, once used, CUDA)
and NumPy's global generators are included, for code that draws from them (dropout on a GPU).

What is skipped: the adapter, config and services (rebuilt from the config; also where a method
keeps a service under its own name, e.g. nn's `kb`), the source
snapshot (constant), lists of `nn.Parameter` (views of the model, restored with it), and what a
method names in its `constant_attrs` (state built from the config at construction that no step
changes, e.g. RMT's source samples and prototypes: copying it into every checkpoint would only cost). A
method with state of another kind (a custom class) implements `state_dict()` /
`load_state_dict()`; anything else that cannot be captured raises `CheckpointError` naming the
attribute, so state is never silently left behind. Plain objects of the project's own classes
(under `ttt.`, e.g. RoTTA's memory bank and its items) are captured attribute by attribute.
"""
from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import nn

OWN_MODULES = ("ttt.",)  # plain-Python state objects from these modules are captured attribute by attribute
SKIP = frozenset({"adapter", "cfg", "services", "source_state", "predict_from", "param_names"})
_SCALARS = (int, float, bool, str, type(None))


class CheckpointError(TypeError):
    pass


def capture(method: Any) -> dict[str, Any]:
    """The method's state as tensors and scalars (copies: later steps do not change it)."""
    if callable(getattr(method, "state_dict", None)):
        attrs = {"__custom__": method.state_dict()}
    else:
        services = [id(v) for v in (getattr(method, "services", None) or {}).values()]
        skip = SKIP | set(getattr(method, "constant_attrs", ()))
        attrs = {name: _capture(value, name) for name, value in vars(method).items()
                 if name not in skip and id(value) not in services and not _holds_parameters(value)}
    return {"attrs": attrs, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "numpy_rng": _numpy_global_state()}


def restore(method: Any, state: dict[str, Any]) -> None:
    """Write a captured state back into `method` (built from the same config and model)."""
    attrs = state["attrs"]
    if "__custom__" in attrs:
        method.load_state_dict(attrs["__custom__"])
    else:
        for name, saved in attrs.items():
            setattr(method, name, _restore(getattr(method, name, None), saved, name))
    torch.set_rng_state(state["torch_rng"])
    cuda_rng = state.get("cuda_rng")
    if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)
    np.random.set_state(_numpy_state_tuple(state["numpy_rng"]))


def _holds_parameters(value: Any) -> bool:
    if isinstance(value, nn.Parameter):
        return True
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, nn.Parameter) for v in value):
        return True
    return False


def _capture(value: Any, where: str) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, nn.Module):
        return {"__module__": {k: _cpu_copy(v) for k, v in value.state_dict().items()}}
    if isinstance(value, torch.optim.Optimizer):
        return {"__optimizer__": _clone_tree(value.state_dict())}
    if isinstance(value, torch.Generator):
        return {"__generator__": value.get_state()}
    if isinstance(value, np.random.Generator):
        return {"__np_generator__": _clone_tree(value.bit_generator.state)}
    if isinstance(value, torch.Tensor):
        return {"__tensor__": _cpu_copy(value), "device": str(value.device)}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return {"__list__": [_capture(v, f"{where}[{i}]") for i, v in enumerate(value)], "tuple": isinstance(value, tuple)}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise CheckpointError(f"method attribute {where}: dict keys must be str or int to checkpoint")
        return {"__dict__": {k: _capture(v, f"{where}[{k!r}]") for k, v in value.items()}}
    cls = type(value)
    if cls.__module__.startswith(OWN_MODULES) and hasattr(value, "__dict__"):  # e.g. RoTTA's memory bank
        return {"__object__": f"{cls.__module__}:{cls.__qualname__}",
                "attrs": {k: _capture(v, f"{where}.{k}") for k, v in vars(value).items()}}
    raise CheckpointError(f"method attribute {where} holds a {cls.__name__}, which the checkpoint cannot "
                          "capture; give the method state_dict() / load_state_dict()")


def _restore(current: Any, saved: Any, where: str) -> Any:
    if not isinstance(saved, dict):
        return saved
    if "__module__" in saved:
        current.load_state_dict(saved["__module__"])  # in place: references to its parameters stay valid
        return current
    if "__optimizer__" in saved:
        current.load_state_dict(saved["__optimizer__"])
        return current
    if "__generator__" in saved:
        current.set_state(saved["__generator__"])
        return current
    if "__np_generator__" in saved:
        current.bit_generator.state = saved["__np_generator__"]
        return current
    if "__tensor__" in saved:
        if isinstance(current, torch.Tensor) and current.shape == saved["__tensor__"].shape:
            with torch.no_grad():
                current.copy_(saved["__tensor__"])
            return current
        return saved["__tensor__"].to(_device(saved.get("device", "cpu")), copy=True)
    if "__ndarray__" in saved:
        return saved["__ndarray__"].numpy().copy()
    if "__list__" in saved:
        old = list(current) if isinstance(current, (list, tuple)) and len(current) == len(saved["__list__"]) else None
        items = [_restore(old[i] if old else None, s, f"{where}[{i}]") for i, s in enumerate(saved["__list__"])]
        return tuple(items) if saved["tuple"] else items
    if "__dict__" in saved:
        old = current if isinstance(current, dict) else {}
        return {k: _restore(old.get(k), s, f"{where}[{k!r}]") for k, s in saved["__dict__"].items()}
    if "__object__" in saved:
        obj = current if current is not None and _qualname(current) == saved["__object__"] else _new(saved["__object__"])
        for k, v in saved["attrs"].items():
            setattr(obj, k, _restore(getattr(obj, k, None), v, f"{where}.{k}"))
        return obj
    raise CheckpointError(f"method attribute {where}: unknown saved form {sorted(saved)}")


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _new(ref: str) -> Any:
    """An empty instance of one of the project's own classes (never any other: a checkpoint names
    only classes under ttt/), to be filled with its saved attributes."""
    module_name, _, qualname = ref.partition(":")
    if not module_name.startswith(OWN_MODULES):
        raise CheckpointError(f"checkpoint names class {ref}, outside {OWN_MODULES}")
    cls: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls.__new__(cls)


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU: load_state_dict and `_restore` move it back to where the state lives."""
    return t.detach().to("cpu", copy=True)


def _device(name: str) -> torch.device:
    """Where a restored tensor that had no counterpart goes: its own device when this process has
    one of that type, else the CPU."""
    dev = torch.device(name)
    return dev if dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_available()) else torch.device("cpu")


def _clone_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _cpu_copy(obj)
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tree(v) for v in obj)
    return obj


def _numpy_global_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_tuple(state: dict[str, Any]) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"])
