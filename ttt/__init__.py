"""Test-time training and adaptation methods in pure PyTorch (no Ray, no pipeline imports).

`ttt.METHODS` and `ttt.build_method` are loaded on first use (PEP 562): `import ttt.config` or
`ttt.schema` (what the config, the CLI and the run registry need) must not import torch.
"""
from typing import Any

from ttt.config import TTTConfig

__all__ = ["TTTConfig", "METHODS", "build_method"]


def __getattr__(name: str) -> Any:
    if name in ("METHODS", "build_method"):
        from ttt import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'ttt' has no attribute {name!r}")
