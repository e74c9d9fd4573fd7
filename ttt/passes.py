"""Count the forward and backward passes a method makes, and the worker's peak memory: the cost
columns of the analysis (`forward_passes`, `backward_passes`, `peak_rss_mb`, `peak_gpu_mb`).

`counter_for(method)` hooks every top-level module the method holds (its model, a teacher, an
anchor: the attributes that are `nn.Module`s not inside another one) once, and counts the rows
of every call: a forward pass of a batch of B rows counts B. A forward under autograd whose output
needs a gradient counts as a backward too: every such forward in this project's methods is
followed by one backward (EATA back-propagates only its reliable rows, so its count is an upper
bound; SAR's two SAM passes count twice). Per-sample passes of a batch are the counts divided by
its rows: a plain source forward is 1 forward, 0 backward. Pure torch, no Ray.
"""
from __future__ import annotations

import resource
import sys
import weakref
from typing import Any

import torch
from torch import nn


class PassCounter:
    def __init__(self) -> None:
        self.forward_rows = 0
        self.backward_rows = 0

    def hook(self, _module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0] if args else None
        rows = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1
        self.forward_rows += rows
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            self.backward_rows += rows

    def snapshot(self) -> tuple[int, int]:
        return self.forward_rows, self.backward_rows


_COUNTERS: "weakref.WeakKeyDictionary[Any, PassCounter]" = weakref.WeakKeyDictionary()


def root_modules(method: Any) -> list[nn.Module]:
    """The method's top-level modules: nn.Module attributes not contained in another one."""
    mods = {id(v): v for v in vars(method).values() if isinstance(v, nn.Module)}
    inner = {id(m) for v in mods.values() for m in v.modules() if m is not v}
    return [m for k, m in mods.items() if k not in inner]


def counter_for(method: Any) -> PassCounter:
    """The method's pass counter, hooking its modules on first use (never twice)."""
    counter = _COUNTERS.get(method)
    if counter is None:
        counter = PassCounter()
        for module in root_modules(method):
            module.register_forward_hook(counter.hook)
        _COUNTERS[method] = counter
    return counter


def peak_memory_mb() -> tuple[float, float | None]:
    """(peak resident set size of this process so far, peak CUDA memory allocated or None) in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return float(rss_mb), gpu
