"""Model adapters: manifest rows -> tensors, tensors -> prediction rows, plus the hooks a
method may need (`reconstruct`, `embed`, `augment`). No Ray here: a worker actor wraps one.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ttt.augment import cotta_augment
from ttt.classes import SubsetLogits
from ttt.images import ArrayFiles, ImageSpec, denormalise, normalise, read_row
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


def parse_label(value: Any, num_classes: int | None = None) -> int | None:
    """A manifest label -> class index, or None when the row has none. Raises ValueError naming the
    problem for a label that is not a whole number or lies outside the model's classes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # a label column stored as text ("3")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"column 'label': {value!r} is not an integer class index")
    if isinstance(value, (float, np.floating)) and (not math.isfinite(value) or not float(value).is_integer()):
        raise ValueError(f"column 'label': {value!r} is not an integer class index")
    label = int(value)
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"column 'label': {label} is outside the model's {num_classes} classes (0-{num_classes - 1})")
    return label


class ImageRowReader:
    """Manifest rows -> validated [C, H, W] float32 arrays in [0, 1], or the error message of each
    row that cannot be used. Runs wherever rows are decoded: a Ray Data task ahead of the worker,
    or the adapter itself for rows that arrive undecoded. Each file read runs under a timeout, so
    a read that blocks becomes an error row instead of a hung stream."""

    def __init__(self, spec: ImageSpec, *, num_classes: int | None = None, read_timeout_s: float | None = 60.0):
        self.spec, self.num_classes, self.read_timeout_s = spec, num_classes, read_timeout_s
        self.arrays = ArrayFiles()

    def check_label(self, value: Any) -> None:
        """ValueError naming the problem for a label the model cannot be scored on: outside its
        classes, or (with model.class_subset) outside the subset it is scored over."""
        subset = self.spec.label_indices
        label = parse_label(value, None if subset else self.num_classes)
        if subset and label is not None and label not in self._subset:
            raise ValueError(f"column 'label': {label} is not one of the {len(subset)} classes of model.class_subset")

    @property
    def _subset(self) -> frozenset[int]:
        if getattr(self, "_subset_set", None) is None:
            self._subset_set = frozenset(self.spec.label_indices or ())
        return self._subset_set

    def decode(self, record: dict[str, Any]) -> np.ndarray:
        """One row -> float32 [C, H, W] in [0, 1]; raises ValueError naming the problem."""
        self.check_label(record.get("label"))
        return read_row(record, self.spec, self.arrays)

    def read_labels(self, labels: list[Any]) -> list[str | None]:
        """Each label's error message, or None when it is usable (or absent)."""
        out: list[str | None] = []
        for value in labels:
            try:
                self.check_label(value)
                out.append(None)
            except ValueError as exc:
                out.append(f"{type(exc).__name__}: {exc}")
        return out

    def read(self, records: list[dict[str, Any]]) -> list[np.ndarray | str]:
        """Each row's array, or its error message; a row whose read outlives the timeout is an error
        and the rows after it are read by a fresh thread (the stuck one is abandoned)."""
        if self.read_timeout_s is None or not any(r.get("path") for r in records):
            return [self._decode_or_error(r) for r in records]  # in-memory pixels cannot block
        out: list[np.ndarray | str] = []
        while len(out) < len(records):
            out.extend(self._read_until_stuck(records, len(out)))
        return out

    def _read_until_stuck(self, records: list[dict[str, Any]], first: int) -> list[np.ndarray | str]:
        """Rows from `first` on, read in order by one thread while this one only watches the current
        row's deadline (a thread hand-off per row tripled the cost of decoding a small PNG); stops
        after the first row that outlives `read_timeout_s`, which becomes a TimeoutError row."""
        results: list[np.ndarray | str] = []
        current = [first, time.monotonic()]  # the row being read and when its read began
        finished, abandoned = threading.Event(), threading.Event()

        def read_in_order() -> None:
            for i in range(first, len(records)):
                if abandoned.is_set():
                    return
                current[:] = [i, time.monotonic()]
                results.append(self._decode_or_error(records[i]))
            finished.set()

        threading.Thread(target=read_in_order, name="row-reader", daemon=True).start()
        while not finished.wait(max(0.0, current[1] + self.read_timeout_s - time.monotonic())):
            stuck, began = current
            if time.monotonic() - began < self.read_timeout_s:
                continue  # the reader moved on to a later row: wait for that one's deadline
            abandoned.set()
            where = records[stuck].get("path") or "column 'pixels'"
            return results[:stuck - first] + [
                f"TimeoutError: {where}: read took longer than data.read_timeout_s={self.read_timeout_s:g}"]
        return results

    def _decode_or_error(self, record: dict[str, Any]) -> np.ndarray | str:
        try:
            return self.decode(record)
        except Exception as exc:  # a bad row becomes an error row, never a crash
            return f"{type(exc).__name__}: {exc}"


class ImageClassifierAdapter:
    """Grayscale/colour image classifier. A manifest row holds `pixels` or `path` (an image file, a
    `.npy` array, or with `index` a row of a `.npy` array); reading, validation and preprocessing
    are `ttt.images` (shared with the KB embedder). Rows usually arrive decoded by the job's Ray
    Data operators (`_image` bytes or `_error`); rows that do not are read here."""

    kind = "image_classifier"

    def __init__(self, model: nn.Module, *, device: str = "cpu", spec: ImageSpec | None = None,
                 read_timeout_s: float | None = 60.0):
        self.device = torch.device(device)
        self.spec = spec or ImageSpec()
        if self.spec.label_indices and not isinstance(model, SubsetLogits):
            # model.class_subset: every forward (predictions, entropies, method losses) sees only those logits
            model = SubsetLogits(model, self.spec.label_indices)
        # channels-last on CUDA for convolutional models (tensor-core friendly); CPU keeps NCHW
        self.channels_last = self.device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.model = model.to(self.device, memory_format=torch.channels_last) if self.channels_last else \
            model.to(self.device)
        self.image_shape = self.spec.shape
        self.num_classes = self._count_classes()  # of the whole model (labels are its class indices)
        if self.spec.label_indices and self.num_classes is not None and max(self.spec.label_indices) >= self.num_classes:
            raise ValueError(f"model.class_subset names class {max(self.spec.label_indices)}, but the model has "
                             f"{self.num_classes} outputs")
        self.reader = ImageRowReader(self.spec, num_classes=self.num_classes, read_timeout_s=read_timeout_s)

    def _count_classes(self) -> int | None:
        """The model's number of outputs, read off one forward of a zero image in eval mode (before
        any method configures the model); None when the model cannot tell."""
        was_training = self.model.training
        self.model.eval()
        model = self.model.model if isinstance(self.model, SubsetLogits) else self.model
        try:
            with torch.no_grad():
                out = model(torch.zeros((1, *self.spec.shape), device=self.device))
            return int(out.shape[1]) if out.ndim == 2 else None
        except Exception:
            return None
        finally:
            self.model.train(was_training)

    def get_model(self) -> nn.Module:
        return self.model

    def has_hook(self, name: str) -> bool:
        if name in ("reconstruct", "embed", "rotation_logits"):
            return callable(getattr(self.model, name, None))
        if name == "classifier":
            return self.classifier() is not None
        return callable(getattr(self, name, None))

    # -- rows -> tensors ---------------------------------------------------------------
    def _arrays(self, records: list[dict[str, Any]]) -> list[np.ndarray | str]:
        if records and ("_image" in records[0] or "_error" in records[0]):  # decoded ahead by Ray Data
            return [r["_error"] if r.get("_error") is not None else
                    np.frombuffer(r["_image"], dtype=np.float32).reshape(self.spec.shape) for r in records]
        return self.reader.read(records)

    def build_loader(self, records: list[dict[str, Any]], *, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            good, arrays, errors = [], [], []
            for rec, got in zip(chunk, self._arrays(chunk)):
                if isinstance(got, str):
                    errors.append((rec, got))
                else:
                    arrays.append(got)
                    good.append(rec)
            inputs = None
            if arrays:
                x = torch.from_numpy(np.stack(arrays))
                if self.device.type == "cuda":
                    x = x.pin_memory().to(self.device, non_blocking=True)
                inputs = normalise(x, self.spec)
                if self.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
            yield Batch(good, inputs, errors)

    # -- tensors -> rows ---------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model on a batch's inputs (class logits)."""
        return self.model(inputs)

    def predict(self, batch: Batch, logits: torch.Tensor | None = None) -> list[dict[str, Any]]:
        if logits is None:
            with torch.no_grad():
                logits = self.forward(batch.inputs)
        rows = class_predictions(logits)
        if self.spec.label_indices:  # a subset position -> the model's class index (the manifest's labels)
            for row in rows:
                row["prediction"] = self.spec.label_indices[row["prediction"]]
        return rows

    # -- hooks -------------------------------------------------------------------------
    def reconstruct(self, masked_inputs: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruct(masked_inputs)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embed(inputs)

    def rotation_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """TTT's self-supervised head: 4-way rotation logits through the trunk the classifier shares."""
        return self.model.rotation_logits(inputs)

    def classifier(self) -> nn.Linear | None:
        """The model's final linear layer, the one `embed`'s features feed (methods that split the
        model into features and classifier: T3A, SHOT-IM, RMT, SANTA, AdaContrast): the model's own
        `classifier_head()` when it has one, timm's `get_classifier()`, else a Linear named `head`,
        `fc` or `classifier`; None when there is none."""
        own = getattr(self.model, "classifier_head", None) or getattr(self.model, "get_classifier", None)
        candidates = [own()] if callable(own) else []
        candidates += [getattr(self.model, n, None) for n in ("head", "fc", "classifier")]
        return next((m for m in candidates if isinstance(m, nn.Linear)), None)

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random view of each normalised image (CoTTA); augmented in pixel space, where the
        reference's brightness, contrast and clipping ranges are defined."""
        return normalise(cotta_augment(denormalise(inputs, self.spec), generator), self.spec)

