"""ImageNet class lists: the 1,000-wnid order of the models' outputs, and the class subsets a
benchmark is scored over (ImageNet-R, ImageNet-A: 200 classes each).

The lists are timm's (`timm/data/_info/imagenet_synsets.txt`, `imagenet_r_indices.txt`,
`imagenet_a_indices.txt`; read from the installed package's folder without importing timm).
`imagenet_synsets.txt` is the sorted wnid list, i.e. the class order of torchvision's and timm's
ImageNet-1k heads.

A class subset scores a 1,000-way model over some of its classes: the logits are masked to the
subset's columns (`SubsetLogits`), so predictions, entropies and method losses see only those, and
a prediction is reported as the model's own class index (a manifest's labels are ImageNet indices).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

NAMED_SUBSETS = {"imagenet_r": "imagenet_r_indices.txt", "imagenet_a": "imagenet_a_indices.txt"}


class ClassListError(ValueError):
    pass


def _info_dir() -> Path:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ClassListError("the ImageNet class lists come from timm's package data; timm is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k wnids in class-index order."""
    wnids = tuple((_info_dir() / "imagenet_synsets.txt").read_text().split())
    if len(wnids) != 1000:
        raise ClassListError(f"timm's imagenet_synsets.txt holds {len(wnids)} wnids, not 1,000")
    return wnids


def imagenet_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


@functools.cache
def class_subset_indices(subset: str) -> tuple[int, ...]:
    """The model's class indices of `subset`: `imagenet_r`, `imagenet_a`, or a file with one class
    per line, an index or an ImageNet wnid (in the order the subset's logits take)."""
    name = str(subset)
    if name in NAMED_SUBSETS:
        path = _info_dir() / NAMED_SUBSETS[name]
    else:
        path = Path(name)
        if not path.is_file():
            raise ClassListError(f"model.class_subset: {name!r} is neither {' nor '.join(NAMED_SUBSETS)} nor a file")
    try:
        items = path.read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassListError(f"model.class_subset: cannot read {path} ({exc})") from None
    index = imagenet_index() if any(not t.isdigit() for t in items) else None
    out = []
    for item in items:
        if item.isdigit():
            out.append(int(item))
        elif item in index:
            out.append(index[item])
        else:
            raise ClassListError(f"model.class_subset {path}: {item!r} is neither a class index nor an ImageNet wnid")
    if not out:
        raise ClassListError(f"model.class_subset {path} lists no classes")
    if len(set(out)) != len(out):
        raise ClassListError(f"model.class_subset {path} lists a class twice")
    return tuple(out)


class SubsetLogits(nn.Module):
    """`model` with its logits cut to the columns `indices` (the class subset it is scored over).
    The wrapped model's hooks (`embed`, `reconstruct`) pass through."""

    def __init__(self, model: nn.Module, indices: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.indices)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("embed", "reconstruct", "pretrained_cfg", "preprocess_cfg"):
                return getattr(self._modules["model"], name)
            raise
