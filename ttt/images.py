"""Image rows -> model inputs: reading, validation and preprocessing, in one place.

The worker's image adapter and the KB embedder both call this module, so a KB vector and a
query vector see identical inputs. Pure numpy / Pillow / torch, no Ray, so it can also run
inside a Ray Data operator or a plain DataLoader.

A row holds `pixels` (a flat list, or an array in HW / HWC / CHW layout) or `path` (an image
file Pillow reads, or a `.npy` array; with an `index` column, a row of that array read by
memory map: the CIFAR-C layout). Every problem raises `RowError` with one line naming the file
or column: values that are not finite, outside [0, 255], an image mode or bit depth that
cannot be read as intensities, a size other than the model's when no resize is configured.
Nothing is ever reshaped across rows and columns: a 14x56 image is not a 28x28 one.

Value scale: 8-bit images are divided by 255, 16-bit ones by 65,535; float or integer arrays
whose maximum exceeds 1 are taken as 0-255, otherwise as 0-1 (the rule the embedded MNIST-C
data and the first version used). Resize (shorter side, `interpolation` bilinear / bicubic /
nearest) and centre crop follow torchvision's `Resize(int)` + `CenterCrop` (what torchvision's
weights transforms and timm's eval transform are): 8-bit images are resized by Pillow on their
8-bit values, as those transforms do on the PIL images their loaders open, so the result equals
theirs bit for bit (tests/test_real_models.py); other images (16-bit, float arrays) are resized
as float tensors with antialiasing, which torchvision documents as close to Pillow's, not equal.
The per-channel mean / std normalisation runs last, on the batch.
"""
from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

ColorMode = Literal["auto", "strict"]
# Pillow modes that hold intensities a model can read after `convert` (palette, bilevel, CMYK, ...
# are converted; "I" / "F" hold 32-bit values whose scale is unknown and are checked as arrays)
_CONVERT_TO_RGB = {"P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX", "RGBa"}
_CONVERT_TO_L = {"1", "LA", "La"}
Interpolation = Literal["bilinear", "bicubic", "nearest"]


class RowError(ValueError):
    """A manifest row that cannot become a model input; the message names its file or column."""


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes: `shape` (C, H, W), per-channel `mean` / `std` (one value broadcasts),
    optional `resize` (shorter side) and `center_crop`, and the colour rule: `auto` converts grey to
    RGB (replicated) and RGB to grey (ITU-R 601 luma) and drops alpha; `strict` refuses an image
    whose channel count differs from the model's."""

    shape: tuple[int, int, int] = (1, 28, 28)
    mean: tuple[float, ...] = (0.1307,)
    std: tuple[float, ...] = (0.3081,)
    resize: int | None = None
    center_crop: int | None = None
    color_mode: ColorMode = "auto"
    interpolation: Interpolation = "bilinear"
    # the model's class indices a label may take (model.class_subset: the classes it is scored over)
    label_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 3:
            raise ValueError(f"model.image_shape must be [C, H, W], got {list(self.shape)}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.shape[0]):
                raise ValueError(f"model.{name} has {len(values)} values; the model has {self.shape[0]} channels")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"model.std must be positive, got {list(self.std)}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"model.interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}")

    @property
    def channels(self) -> int:
        return self.shape[0]

    @classmethod
    def from_model_config(cls, model: dict[str, Any]) -> "ImageSpec":
        """From a `model` config section (pipeline.config.ModelConfig dumped to a dict)."""
        return cls(shape=tuple(int(s) for s in model.get("image_shape", (1, 28, 28))),
                   mean=_floats(model.get("mean", 0.1307)), std=_floats(model.get("std", 0.3081)),
                   resize=model.get("resize"), center_crop=model.get("center_crop"),
                   color_mode=model.get("color_mode", "auto"),
                   interpolation=model.get("interpolation") or "bilinear",
                   label_indices=_label_indices(model.get("class_subset")))


class ArrayFiles:
    """Memory-mapped `.npy` files, opened once per file per process (CIFAR-C rows point into them)."""

    def __init__(self) -> None:
        self._open: dict[str, np.ndarray] = {}

    def open(self, path: str) -> np.ndarray:
        """The memory-mapped array (RowError when the file is not a plain .npy)."""
        arr = self._open.get(path)
        if arr is None:
            _check_file(path)
            arr = _load_npy(path, mmap=True)
            self._open[path] = arr
        return arr

    def row(self, path: str, index: Any) -> np.ndarray:
        arr = self.open(path)
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise RowError(f"index {index!r} is not an integer row of {path}") from None
        if not 0 <= i < len(arr):
            raise RowError(f"index {i} is outside {path} ({len(arr)} rows)")
        return np.asarray(arr[i])


def read_row(row: dict[str, Any], spec: ImageSpec, arrays: ArrayFiles | None = None) -> np.ndarray:
    """One manifest row -> float32 [C, H, W] in [0, 1], validated and resized / cropped."""
    pixels, path = row.get("pixels"), row.get("path")
    if _present(pixels):
        where = "column 'pixels'"
        arr = _as_numeric(pixels, where)
        if arr.ndim == 1:  # a flat list carries no layout: it must be exactly the model's size
            if arr.size != int(np.prod(spec.shape)):
                raise RowError(f"{where}: {arr.size} values, the model takes {spec.shape} = {int(np.prod(spec.shape))}")
            arr = arr.reshape(spec.shape)
    elif _present(path):
        where = str(path)
        index = row.get("index")
        if _present(index):
            _check_file(where)
            arr = _as_numeric((arrays or ArrayFiles()).row(where, index), f"{where}[{index}]")
            where = f"{where}[{index}]"
        else:
            arr = read_file(where)
    else:
        raise RowError("row has neither 'pixels' nor 'path'")
    try:
        return to_model_image(arr, spec)
    except RowError as exc:
        raise RowError(f"{where}: {exc}") from None


def read_file(path: str) -> np.ndarray:
    """An image file or `.npy` array as a numeric array (HW, HWC or CHW), validated as a file."""
    _check_file(path)
    if path.lower().endswith(".npy"):
        return _as_numeric(_load_npy(path, mmap=False), path)
    from PIL import Image, UnidentifiedImageError

    with open(path, "rb") as fh:
        data = fh.read()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _pil_array(img)
    except UnidentifiedImageError:
        raise RowError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt files
        raise RowError(f"{path}: unreadable image ({exc})") from None


def to_model_image(arr: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """A numeric image array -> float32 [C, H, W] in [0, 1] in the model's channels and size."""
    x = _channels_first(arr)
    if x.shape[0] == 4:  # RGBA / RGBX arrays: drop alpha
        x = x[:3]
    resizes = spec.resize is not None or spec.center_crop is not None
    if resizes and x.dtype == np.uint8 and x.shape[0] in (1, 3):
        x = _pil_resize_crop(x, spec)  # on the 8-bit values, as torchvision / timm transforms on PIL images
        resizes = False
    x = _match_channels(_scaled(x), spec)
    if resizes:
        x = _resize_crop(x, spec)
    if tuple(x.shape[1:]) != tuple(spec.shape[1:]):
        h, w = x.shape[1:]
        raise RowError(f"image is {h}x{w}, the model takes {spec.shape[1]}x{spec.shape[2]} "
                       "(set model.resize / model.center_crop to resize it)")
    return np.ascontiguousarray(x, dtype=np.float32)


def normalise(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] -> (x - mean) / std per channel."""
    mean = torch.tensor(spec.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def denormalise(inputs: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """The inverse of `normalise` (back to [0, 1] pixel space, e.g. for augmentations)."""
    mean = torch.tensor(spec.mean, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
    return inputs * std + mean


def preprocess_items(items: Sequence[Any], spec: ImageSpec) -> torch.Tensor:
    """Raw images (flat pixel lists or arrays) -> the normalised batch tensor [N, C, H, W]."""
    arrays = []
    for i, item in enumerate(items):
        try:
            arrays.append(read_row({"pixels": item}, spec))
        except RowError as exc:
            raise RowError(f"item {i}: {exc}") from None
    return normalise(torch.from_numpy(np.stack(arrays)), spec)



def model_pixels(image: Any, spec: ImageSpec) -> np.ndarray:
    """An image array (HW, HWC or CHW) as the flat uint8 `pixels` a KB or manifest row stores for
    this model: a flat list carries no layout (`read_row` takes it as exactly the model's C x H x W),
    so channels and size are converted here, by the rules a row with layout gets (color_mode,
    resize, centre crop). Exact for 8-bit images (replicated channels, Pillow resizes); an RGB image
    converted to grey, or a float one, is rounded to the nearest 8-bit value."""
    x = to_model_image(_as_numeric(image, "image"), spec)
    return np.rint(x * 255.0).astype(np.uint8).reshape(-1)

# -- helpers -------------------------------------------------------------------------------
def _floats(value: float | Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def _check_file(path: str) -> None:
    """Refuse what would block or mislead a read before opening it: a FIFO or device blocks
    `open`, a directory or empty file has no image."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RowError(f"{path}: file not found") from None
    except OSError as exc:
        raise RowError(f"{path}: cannot stat ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise RowError(f"{path}: {kind}, not an image file")
    if st.st_size == 0:
        raise RowError(f"{path}: empty file (0 bytes)")


def _load_npy(path: str, *, mmap: bool) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as exc:  # pickled object arrays
        raise RowError(f"{path}: not a plain .npy array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise RowError(f"{path}: unreadable .npy file ({exc})") from None
    if not isinstance(arr, np.ndarray):  # np.load returns an NpzFile for a zip archive
        if hasattr(arr, "close"):
            arr.close()
        raise RowError(f"{path}: an .npz archive, not a .npy array")
    return arr


def _as_numeric(value: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise RowError(f"{where}: not a rectangular array ({exc})") from None
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise RowError(f"{where}: holds non-numeric values") from None
    if arr.dtype.kind not in "uif":
        raise RowError(f"{where}: holds {arr.dtype} values, not numbers")
    if arr.size == 0:
        raise RowError(f"{where}: holds no values")
    return arr


def _pil_array(img: Any) -> np.ndarray:
    mode = img.mode
    if mode in _CONVERT_TO_RGB:
        img = img.convert("RGBA" if mode in ("P", "PA") and "transparency" in img.info else "RGB")
        if img.mode == "RGBA":
            img = img.convert("RGB")
    elif mode in _CONVERT_TO_L:
        img = img.convert("L")
    arr = np.asarray(img)
    if mode.startswith("I;16"):
        arr = arr.astype(np.uint16)  # big- or little-endian 16-bit: one native dtype for _scaled
    return arr


def _scaled(arr: np.ndarray) -> np.ndarray:
    """Intensities -> float32 in [0, 1], refusing values a 0-255 or 0-1 image cannot hold."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    x = np.asarray(arr, dtype=np.float64)
    if arr.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise RowError(f"{bad} pixel value(s) are NaN or infinite")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 255.0:
        raise RowError(f"pixel values span [{lo:g}, {hi:g}], outside [0, 255]")
    return (x / 255.0 if hi > 1.0 else x).astype(np.float32)


def _channels_first(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return x[None]
    if x.ndim == 3:
        if x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
            return np.moveaxis(x, -1, 0)  # HWC (Pillow, CIFAR arrays)
        if x.shape[0] in (1, 3, 4):
            return x  # CHW
    raise RowError(f"array of shape {tuple(x.shape)} is not an image (HW, HWC or CHW with 1, 3 or 4 channels)")


def _match_channels(x: np.ndarray, spec: ImageSpec) -> np.ndarray:
    have, want = x.shape[0], spec.channels
    if have == want:
        return x
    if spec.color_mode == "strict":
        raise RowError(f"image has {have} channel(s), the model takes {want} (model.color_mode=strict)")
    if have == 1 and want == 3:
        return np.repeat(x, 3, axis=0)
    if have == 3 and want == 1:
        return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None].astype(np.float32)
    raise RowError(f"image has {have} channel(s), the model takes {want}")


def _resized_size(h: int, w: int, resize: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to `resize`, the longer one truncated, as torchvision."""
    short, long = min(h, w), max(h, w)
    long = int(resize * long / short)
    return (resize, long) if h <= w else (long, resize)


def _crop_box(h: int, w: int, c: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop; refuses an image smaller than the crop."""
    if h < c or w < c:
        raise RowError(f"image is {h}x{w}, smaller than model.center_crop={c}")
    return int(round((h - c) / 2.0)), int(round((w - c) / 2.0))


def _pil_resize_crop(x: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """8-bit [C, H, W] (C = 1 or 3) -> resized and cropped 8-bit [C, h, w] by Pillow, as
    torchvision's Resize / CenterCrop on a PIL image (antialiasing is Pillow's own)."""
    from PIL import Image

    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "nearest": Image.Resampling.NEAREST}[spec.interpolation]
    img = Image.fromarray(np.ascontiguousarray(x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)))
    if spec.resize is not None:
        h, w = _resized_size(img.height, img.width, spec.resize)
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), resample)
    out = np.asarray(img)
    out = out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)
    if spec.center_crop is not None:
        c = spec.center_crop
        top, left = _crop_box(out.shape[1], out.shape[2], c)
        out = out[:, top:top + c, left:left + c]
    return out


def _resize_crop(x: np.ndarray, spec: ImageSpec) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    if spec.resize is not None:
        h, w = t.shape[-2:]
        size = _resized_size(h, w, spec.resize)
        if size != (h, w):
            mode = spec.interpolation
            kwargs = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
            t = F.interpolate(t, size=size, mode=mode, **kwargs).clamp_(0.0, 1.0)
    if spec.center_crop is not None:
        c = spec.center_crop
        top, left = _crop_box(t.shape[-2], t.shape[-1], c)
        t = t[..., top:top + c, left:left + c]
    return t[0].numpy()


def _label_indices(subset: Any) -> tuple[int, ...] | None:
    if subset is None:
        return None
    from ttt.classes import class_subset_indices

    return tuple(class_subset_indices(subset))

