"""Test-time training and adaptation methods in pure PyTorch (no Ray, no pipeline imports)."""
from ttt.config import TTTConfig
from ttt.methods import METHODS, build_method

__all__ = ["TTTConfig", "METHODS", "build_method"]
