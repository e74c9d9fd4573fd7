"""Model adapters: manifest rows -> tensors, tensors -> prediction rows, plus the hooks a
method may need (`reconstruct`, `embed`, `augment`). No Ray here: a worker actor wraps one.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ttt.losses import softmax_entropy


@dataclass
class Batch:
    """A contiguous slice of a shard: the rows that decoded (with their tensor) and those that failed."""

    records: list[dict[str, Any]]
    inputs: torch.Tensor | None
    errors: list[tuple[dict[str, Any], str]] = field(default_factory=list)


def class_predictions(logits: torch.Tensor) -> list[dict[str, Any]]:
    """Scores over classes (or answer choices) [N, C] -> per row: the argmax, its softmax
    probability and the softmax entropy."""
    logits = logits.detach().float().cpu()
    conf, pred = logits.softmax(1).max(1)
    ent = softmax_entropy(logits)
    return [{"prediction": int(p), "confidence": float(c), "entropy": float(e)}
            for p, c, e in zip(pred.tolist(), conf.tolist(), ent.tolist())]


class ImageClassifierAdapter:
    """Grayscale/colour image classifier. A manifest row holds either `path` (.png/.jpg/.npy)
    or `pixels` (a flat list, reshaped to `image_shape`)."""

    kind = "image_classifier"

    def __init__(self, model: nn.Module, *, device: str = "cpu", image_shape: tuple[int, ...] = (1, 28, 28),
                 mean: float = 0.1307, std: float = 0.3081):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.image_shape = tuple(image_shape)
        self.mean, self.std = mean, std

    def get_model(self) -> nn.Module:
        return self.model

    def has_hook(self, name: str) -> bool:
        if name in ("reconstruct", "embed"):
            return callable(getattr(self.model, name, None))
        return callable(getattr(self, name, None))

    # -- rows -> tensors ---------------------------------------------------------------
    def decode(self, record: dict[str, Any]) -> np.ndarray:
        """One row -> float32 array of `image_shape` in [0, 1]; raises ValueError naming the problem."""
        path, pixels = record.get("path"), record.get("pixels")
        if pixels is not None and not (isinstance(pixels, float) and np.isnan(pixels)):
            arr = np.asarray(pixels, dtype=np.float32)
        elif path:
            arr = _read_image(str(path))
        else:
            raise ValueError("row has neither 'path' nor 'pixels'")
        if arr.size != int(np.prod(self.image_shape)):
            raise ValueError(f"image has {arr.size} values, expected shape {self.image_shape}")
        arr = arr.reshape(self.image_shape).astype(np.float32)
        return arr / 255.0 if arr.max() > 1.0 else arr

    def build_loader(self, records: list[dict[str, Any]], *, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(records), batch_size):
            good, arrays, errors = [], [], []
            for rec in records[start:start + batch_size]:
                try:
                    arrays.append(self.decode(rec))
                    good.append(rec)
                except Exception as exc:  # a bad row becomes an error row, never a crash
                    errors.append((rec, f"{type(exc).__name__}: {exc}"))
            inputs = None
            if arrays:
                x = torch.from_numpy(np.stack(arrays))
                inputs = ((x - self.mean) / self.std).to(self.device)
            yield Batch(good, inputs, errors)

    # -- tensors -> rows ---------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model on a batch's inputs (class logits)."""
        return self.model(inputs)

    def predict(self, batch: Batch, logits: torch.Tensor | None = None) -> list[dict[str, Any]]:
        if logits is None:
            with torch.no_grad():
                logits = self.forward(batch.inputs)
        return class_predictions(logits)

    # -- hooks -------------------------------------------------------------------------
    def reconstruct(self, masked_inputs: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruct(masked_inputs)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embed(inputs)

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random view of each normalised image (CoTTA); augmented in pixel space, where the
        reference's brightness, contrast and clipping ranges are defined."""
        from ttt.augment import cotta_augment

        pixels = inputs * self.std + self.mean
        return (cotta_augment(pixels, generator) - self.mean) / self.std


def _read_image(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with open(path, "rb") as fh:
        data = fh.read()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img, dtype=np.float32)
