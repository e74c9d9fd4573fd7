"""Clean image sets for `python -m pipeline corrupt`: where the images are (an array, a .npy file,
image files of a class folder or a manifest), their labels (whole numbers, one per image) and, for
files, a scan on the driver that leaves out (and counts) what cannot be corrupted: a file that is
not an image or is damaged, an image under MIN_SIDE px a side, or one over MAX_PIXELS.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.benchmarks.layouts import LayoutError, class_folders, class_indices, integer_labels, list_images

MIN_SIDE = 8  # the corruption functions run from 8 px up (see above); a smaller clean image is skipped
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): a larger image is skipped


class CorruptError(ValueError):
    """Bad input to the corruption generator, phrased as one line."""


# ------------------------------------------------------------------------------ clean images

@dataclass
class CleanSource:
    """Where the clean images are: an in-memory array (shipped to tasks through the object store),
    a .npy array file (memory-mapped by each task), or image files. `names` are output stems,
    `classes` the class folder names (label i -> classes[i])."""

    labels: np.ndarray
    names: list[str]
    classes: list[str]
    array: Any = None  # np.ndarray, or an ObjectRef to one once shipped
    npy_path: str | None = None
    npy_rows: np.ndarray | None = None  # row of each image in npy_path
    files: list[str] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # clean image file -> why it was left out
    shapes: set = field(default_factory=set)  # the decoded shapes of the kept files (scanned on the driver)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: np.ndarray) -> list[np.ndarray]:
        if self.files:
            return [_read_file(self.files[i]) for i in indices]
        if self.npy_path is not None:
            arr = np.load(self.npy_path, mmap_mode="r", allow_pickle=False)
            return [np.asarray(arr[self.npy_rows[i]]) for i in indices]
        arr = self.array
        if not isinstance(arr, np.ndarray):
            import ray

            arr = ray.get(arr)
        return [arr[i] for i in indices]


def _read_file(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    with Image.open(path) as img:
        img.load()
        return np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))


def _check_labels(labels: Sequence[Any], where: str) -> np.ndarray:
    if any(label is None for label in labels):
        raise CorruptError(f"{where}: every image needs a label (it names the output's class folder)")
    try:
        return integer_labels(np.asarray(labels), where)  # fractional labels are refused, not truncated
    except LayoutError as exc:
        raise CorruptError(str(exc)) from None


def scan_image(path: str) -> tuple[tuple[int, ...] | None, str | None]:
    """(decoded shape, None) of a clean image file, or (None, why it cannot be corrupted): not an
    image, damaged, under MIN_SIDE px a side, or over MAX_PIXELS (read from the header only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                (w, h), mode = img.size, img.mode
                if w * h > MAX_PIXELS:
                    return None, f"{w} x {h} pixels, over the {MAX_PIXELS} limit (a decompression bomb?)"
                if min(w, h) < MIN_SIDE:
                    return None, f"{w} x {h} pixels, under {MIN_SIDE} px a side"
                img.verify()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, "over PIL's decompression-bomb limit"
    except Exception as exc:  # noqa: BLE001 - whatever PIL cannot open is not an image to corrupt
        return None, f"not a readable image ({type(exc).__name__}: {str(exc)[:80]})"
    return ((h, w) if mode == "L" else (h, w, 3)), None  # _read_file keeps L and RGB, converts the rest to RGB


def _keep_readable(source: "CleanSource") -> "CleanSource":
    """Drop the files `scan_image` refuses, counting each (corrupt.json records them)."""
    keep = []
    for i, path in enumerate(source.files):
        shape, why = scan_image(path)
        if why is None:
            keep.append(i)
            source.shapes.add(shape)
        else:
            source.skipped[path] = why
    if len(keep) < len(source.files):
        source.labels = source.labels[keep]
        source.names = [source.names[i] for i in keep]
        source.files = [source.files[i] for i in keep]
    return source


def _check_array_shape(shape: Sequence[int], where: str) -> None:
    if len(shape) < 2 or min(shape[:2]) < MIN_SIDE:
        raise CorruptError(f"{where}: images of shape {list(shape)} are under {MIN_SIDE} px a side")


def _default_classes(labels: np.ndarray) -> list[str]:
    # zero-padded so sorted folder names (ImageFolder's class order) keep label order
    return [f"{c:04d}" for c in range(int(labels.max()) + 1 if len(labels) else 0)]


def source_from_folder(root: str | Path) -> CleanSource:
    root = Path(root).resolve()
    classes, index = class_indices(class_folders(root))  # wnid folders: the model's ImageNet index
    keys = list_images(root, classes)
    if not keys:
        raise CorruptError(f"no images in class folders under {root}")
    imagenet = any(index[c] != i for i, c in enumerate(classes))
    names = [k.split("/", 1)[1].rsplit(".", 1)[0] for k in keys]
    stems = [(k.split("/", 1)[0], n) for k, n in zip(keys, names)]
    if len(set(stems)) != len(stems):  # a.png and a.jpg of one class would write one output file
        dup = next(k for k, st in zip(keys, stems) if stems.count(st) > 1)
        raise CorruptError(f"{root}: two images of one class share the name of {dup!r} (the output is <stem>.png)")
    return _keep_readable(CleanSource(
        labels=np.asarray([index[k.split("/", 1)[0]] for k in keys], np.int64), names=names, classes=classes,
        files=[str(root / k) for k in keys],
        description={"kind": "folder", "root": str(root), "labels": "imagenet" if imagenet else "found"}))


def source_from_arrays(images: str | Path, labels: str | Path) -> CleanSource:
    """A .npy of N x H x W [x C] uint8 images and a .npy of N labels."""
    arr = np.load(images, mmap_mode="r", allow_pickle=False)
    lab = _check_labels(np.load(labels, allow_pickle=False).tolist(), str(labels))
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or len(arr) != len(lab):
        raise CorruptError(f"{images}: expected N x H x W [x C] uint8 with N = {len(lab)} labels, got {arr.shape} {arr.dtype}")
    _check_array_shape(arr.shape[1:], str(images))
    return CleanSource(labels=lab, names=[f"{i:06d}" for i in range(len(lab))], classes=_default_classes(lab),
                       npy_path=str(Path(images).resolve()), npy_rows=np.arange(len(lab)),
                       description={"kind": "arrays", "images": str(images), "labels": str(labels)})


def source_from_manifest(path: str | Path, image_shape: Sequence[int] | None = None) -> CleanSource:
    """A Parquet manifest: rows with `path` (image file, or .npy with an `index` row) or `pixels`
    (flat uint8; shaped by `image_shape` H,W[,C], default square grey), and `label`."""
    table = pq.read_table(path)
    names = table.column_names
    if "label" not in names:
        raise CorruptError(f"manifest {path}: needs a 'label' column")
    labels = _check_labels(table.column("label").to_pylist(), f"manifest {path}")
    ids = [str(s) for s in table.column("sample_id").to_pylist()] if "sample_id" in names else [str(i) for i in range(len(labels))]
    stems = [s.replace("/", "_") for s in ids]
    desc = {"kind": "manifest", "path": str(path)}
    if "pixels" in names:
        flat = table.column("pixels").to_pylist()
        size = len(flat[0])
        shape = tuple(image_shape) if image_shape else (int(round(size ** 0.5)),) * 2
        if int(np.prod(shape)) != size:
            raise CorruptError(f"manifest {path}: pixels hold {size} values, not an image of shape {list(shape)}; give --image-shape")
        _check_array_shape(shape, f"manifest {path}")
        arr = np.asarray(flat, dtype=np.uint8).reshape((len(flat),) + shape)
        return CleanSource(labels=labels, names=stems, classes=_default_classes(labels), array=arr, description=desc)
    if "path" not in names:
        raise CorruptError(f"manifest {path}: needs a 'path' or 'pixels' column")
    paths = [str(p) for p in table.column("path").to_pylist()]
    if "index" in names:  # rows of one array file (the CIFAR-C manifest form)
        files = set(paths)
        if len(files) != 1:
            raise CorruptError(f"manifest {path}: rows with 'index' must all point into one .npy file")
        return CleanSource(labels=labels, names=stems, classes=_default_classes(labels), npy_path=paths[0],
                           npy_rows=np.asarray(table.column("index").to_pylist(), np.int64), description=desc)
    return _keep_readable(CleanSource(labels=labels, names=stems, classes=_default_classes(labels), files=paths,
                                      description=desc))


def source_from_digits(seed: int = 0, n: int | None = None) -> CleanSource:
    """The embedded default's held-out clean MNIST digits (28 x 28 grey; the split of pipeline.embedded.mnistc)."""
    from pipeline.embedded.mnistc import split_digits

    split = split_digits(seed)
    x, y = split["x_test"][:n], split["y_test"][:n]
    return CleanSource(labels=y.astype(np.int64), names=[f"{i:06d}" for i in range(len(y))],
                       classes=_default_classes(y), array=np.ascontiguousarray(x),
                       description={"kind": "digits", "split_seed": seed})
