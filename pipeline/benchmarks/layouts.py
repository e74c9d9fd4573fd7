"""Manifests from the standard benchmark layouts: `python -m pipeline manifest LAYOUT ROOT ...`.

Layouts (as the public TTA benchmarks and RobustBench read them):
- `cifar-c`: `<root>/<corruption>.npy`, N x H x W x C uint8 (CIFAR-10-C / CIFAR-100-C: 50,000 x
  32 x 32 x 3, the 5 severities stacked, 10,000 each) and `<root>/labels.npy` (N labels). Only the
  shapes and labels are read, by memory map: a row's `path` names the array and `index` its row
  in it, so no pixels are copied into Parquet. A `corrupt.json` beside them (written by
  `python -m pipeline corrupt`) lists which severities the blocks hold; without it, 1..5.
- `imagenet-c`: `<root>/<corruption>/<severity>/<wnid>/*.JPEG`; when every class folder is an
  ImageNet-1k wnid, the class index is the model's ImageNet index (the 1,000-wnid order of
  timm's `imagenet_synsets.txt`, ttt.classes), whichever folders are present (a 5,000-image
  subset, ImageNet-R's or -A's 200 classes); otherwise the folder's rank in sorted order over the
  union of the folders found (torchvision's ImageFolder). `--classes imagenet | found | FILE`
  (one name per line, in class-index order) says which explicitly.
- `folder`: `<root>/<class>/*.<image>`, one domain (a plain class-folder image set), labelled the
  same way.

A domain is `<corruption>-<severity>`. Samples per domain: all, the first N (RobustBench's choice
for CIFAR-C), a seeded random N (the same images in every domain, in one seeded random order:
reproducible, e.g. 5,000 per ImageNet-C domain), or the images a subset file lists (one
`<wnid>/<file>` per line, in that order: e.g. RobustBench's `imagenet_test_image_ids.txt`, the
5,000-image list the ImageNet-C benchmarks use). The pool is then ordered by one of the five
settings (pipeline.benchmarks.settings) and written with the setting in the Parquet metadata.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.benchmarks.settings import apply_setting
from pipeline.manifest import write_manifest

# The 15 benchmark corruptions in the order of the continual benchmarks (CoTTA, mariodoebler's
# CORRUPTION.TYPE), then the 4 held-out validation corruptions of ImageNet-C / CIFAR-10-C.
BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
HELD_OUT_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = BENCHMARK_CORRUPTIONS + HELD_OUT_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
# torchvision.datasets.folder.IMG_EXTENSIONS, compared case-insensitively as ImageFolder does
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUTS: tuple[str, ...] = ("cifar-c", "imagenet-c", "folder")


class LayoutError(ValueError):
    """A data directory that does not match its layout, phrased as one line naming the file."""


def _check_severities(severities: Sequence[int]) -> list[int]:
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise LayoutError(f"severities must be a non-empty subset of {list(SEVERITIES)}, got {list(severities)}")
    return list(severities)


def choose_subset(keys: Sequence[str], per_domain: int | None, subset: str, seed: int,
                  listed: Sequence[str] | None = None) -> list[int]:
    """Positions into `keys` of the samples a domain keeps, in stream order.

    subset `first`: the first `per_domain`; `seeded`: `per_domain` drawn by `seed` in a seeded
    random order (independent of the domain, so every domain keeps the same images); `file`: the
    keys `listed`, in listed order (each must exist), cut to `per_domain` when given."""
    n = len(keys)
    if per_domain is not None and per_domain < 1:
        raise LayoutError(f"samples per domain must be >= 1, got {per_domain}")
    if subset == "file":
        if listed is None:
            raise LayoutError("subset 'file' needs a subset file")
        where = {k: i for i, k in enumerate(keys)}
        missing = [k for k in listed if k not in where]
        if missing:
            raise LayoutError(f"subset file names {len(missing)} sample(s) not in the data, e.g. {missing[0]!r}")
        picked = [where[k] for k in listed]
        return picked[:per_domain] if per_domain is not None else picked
    k = n if per_domain is None else per_domain
    if k > n:
        raise LayoutError(f"asked for {k} samples per domain, the data hold {n}")
    if subset == "first":
        return list(range(k))
    if subset == "seeded":
        return np.random.default_rng(seed).permutation(n)[:k].tolist()
    raise LayoutError(f"subset must be first, seeded or file, got {subset!r}")


# ------------------------------------------------------------------------------------- CIFAR-C

def _cifar_block_severities(root: Path) -> list[int]:
    info = root / "corrupt.json"
    if not info.is_file():
        return list(SEVERITIES)
    try:
        blocks = json.loads(info.read_text(encoding="utf-8"))["severities"]
        if not isinstance(blocks, list) or not blocks or any(type(b) is not int or b not in SEVERITIES for b in blocks) \
                or len(set(blocks)) != len(blocks):
            raise ValueError(f"severities must be distinct values of {list(SEVERITIES)}, got {blocks!r:.60}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise LayoutError(f"{info} is malformed (it must be JSON with a 'severities' list): "
                          f"{type(exc).__name__}: {str(exc)[:100]}") from None
    return blocks


def integer_labels(values: Any, where: str) -> np.ndarray:
    """N labels as int64: a 1-D array of integers >= 0 (integral floats pass); a fractional,
    negative, non-numeric or multi-dimensional label array is refused, never truncated."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise LayoutError(f"{where}: labels must be one per image (shape (N,)), got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))][0]
            raise LayoutError(f"{where}: labels must be whole numbers, found {bad!r}")
    elif arr.dtype.kind not in "iub":
        raise LayoutError(f"{where}: labels must be integers, got {arr.dtype}")
    labels = arr.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise LayoutError(f"{where}: labels must be >= 0, found {int(labels.min())}")
    return labels


def _open_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise LayoutError(f"missing file {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise LayoutError(f"{path} is not a readable .npy array: {exc}") from None


def cifar_c_pool(root: str | Path, corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS,
                 severities: Sequence[int] = (5,), per_domain: int | None = None, subset: str = "first",
                 seed: int = 0, subset_keys: Sequence[str] | None = None) -> pa.Table:
    """One row per kept sample of each corruption x severity, corruption-major. Rows point into
    the arrays (`path`, `index`); `sample_id` is `<corruption>-<severity>-<i>`, i the sample's
    place within its severity block (the same clean image in every domain)."""
    root = Path(root).resolve()
    severities = _check_severities(severities)
    blocks = _cifar_block_severities(root)
    labels = integer_labels(_open_array(root / "labels.npy"), str(root / "labels.npy"))
    cols: dict[str, list] = {k: [] for k in ("sample_id", "path", "index", "label", "domain", "corruption", "severity")}
    for corruption in corruptions:
        path = root / f"{corruption}.npy"
        arr = _open_array(path)
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3)):
            raise LayoutError(f"{path}: expected N x H x W [x C] uint8, got {arr.shape} {arr.dtype}")
        if arr.shape[0] != len(labels) or arr.shape[0] % len(blocks):
            raise LayoutError(f"{path}: {arr.shape[0]} images, but labels.npy has {len(labels)} and "
                              f"{len(blocks)} severity blocks must divide them evenly")
        n = arr.shape[0] // len(blocks)
        keys = [str(i) for i in range(n)]
        picked = choose_subset(keys, per_domain, subset, seed, subset_keys)
        for severity in severities:
            if severity not in blocks:
                raise LayoutError(f"{root}: severity {severity} not in this data (holds {blocks})")
            start = blocks.index(severity) * n
            for i in picked:
                cols["sample_id"].append(f"{corruption}-{severity}-{i:05d}")
                cols["path"].append(str(path))
                cols["index"].append(start + i)
                cols["label"].append(int(labels[start + i]))
                cols["domain"].append(f"{corruption}-{severity}")
                cols["corruption"].append(corruption)
                cols["severity"].append(severity)
    return _pool_table(cols)


def _pool_table(cols: dict[str, list]) -> pa.Table:
    types = {"index": pa.int64(), "label": pa.int64(), "severity": pa.int32()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})


# ---------------------------------------------------------------------------------- ImageNet-C

def class_folders(directory: Path) -> list[str]:
    """Sorted class folder names, as torchvision's ImageFolder.find_classes."""
    if not directory.is_dir():
        raise LayoutError(f"missing directory {directory}")
    try:
        return sorted(e.name for e in directory.iterdir() if e.is_dir())
    except OSError as exc:
        raise LayoutError(f"cannot list {directory}: {exc.strerror}") from None


def list_images(directory: Path, classes: Sequence[str]) -> list[str]:
    """`<class>/<relative file>` of every image under the class folders, in ImageFolder's order
    (class by class, files sorted)."""
    keys: list[str] = []
    seen: dict[str, str] = {}  # real folder -> where it was first listed: a folder reached twice is refused

    def unreadable(exc: OSError) -> None:
        raise LayoutError(f"cannot read {exc.filename}: {exc.strerror} (a class folder is never dropped silently)")

    for c in classes:
        found: list[str] = []
        if not (directory / c).is_dir():
            raise LayoutError(f"missing class folder {directory / c}")
        # os.walk's directory entries carry their type: no stat per file (ImageNet-C has 3.75M files)
        for dirpath, _, files in os.walk(directory / c, followlinks=True, onerror=unreadable):
            rel = Path(dirpath).relative_to(directory).as_posix()
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink loop, or a link to another class's images: they would repeat, mislabelled
                raise LayoutError(f"{directory / rel} is {real}, already listed as {seen[real]} (a symlink loop or "
                                  "a link between class folders): every image must be reached once")
            seen[real] = rel
            found.extend(f"{rel}/{f}" for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        keys.extend(sorted(found))
    return keys


def imagenet_c_pool(root: str | Path, corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS,
                    severities: Sequence[int] = (5,), per_domain: int | None = None, subset: str = "first",
                    seed: int = 0, subset_keys: Sequence[str] | None = None,
                    classes: Sequence[str] | None = None) -> pa.Table:
    """One row per kept image of each corruption x severity, corruption-major; `sample_id` is
    `<corruption>-<severity>/<wnid>/<file>`. The subset is chosen once (on the first domain's
    listing) and kept in every domain, so domains hold the same underlying images."""
    root = Path(root).resolve()
    severities = _check_severities(severities)
    dirs = [(c, s, root / c / str(s)) for c in corruptions for s in severities]
    classes, class_index = class_indices(sorted(set().union(*(class_folders(d) for _, _, d in dirs))), classes)
    listings = [list_images(d, classes) for _, _, d in dirs]
    if not listings[0]:
        raise LayoutError(f"no images under {dirs[0][2]}")
    picked_keys = [listings[0][i] for i in choose_subset(listings[0], per_domain, subset, seed, subset_keys)]
    cols: dict[str, list] = {k: [] for k in ("sample_id", "path", "label", "domain", "corruption", "severity")}
    for (corruption, severity, d), listing in zip(dirs, listings):
        present = set(listing)
        missing = [k for k in picked_keys if k not in present]
        if missing:
            raise LayoutError(f"{d}: {len(missing)} image(s) of the subset missing, e.g. {missing[0]!r}")
        for key in picked_keys:
            cols["sample_id"].append(f"{corruption}-{severity}/{key}")
            cols["path"].append(str(d / key))
            cols["label"].append(class_index[key.split("/", 1)[0]])
            cols["domain"].append(f"{corruption}-{severity}")
            cols["corruption"].append(corruption)
            cols["severity"].append(severity)
    return _pool_table(cols)


def class_indices(found: Sequence[str], classes: Sequence[str] | str | None = None) -> tuple[list[str], dict[str, int]]:
    """(class folders to read, folder -> label). `classes`: None = ImageNet indices when every folder
    found is an ImageNet-1k wnid, else sorted found; "imagenet"; "found"; or a list in index order."""
    if classes is None or classes == "imagenet":
        from ttt.classes import imagenet_index

        index = imagenet_index()
        if all(c in index for c in found) and found:
            return list(found), {c: index[c] for c in found}
        if classes == "imagenet":
            bad = [c for c in found if c not in index]
            raise LayoutError(f"--classes imagenet: folder {bad[0]!r} is not an ImageNet-1k wnid" if bad
                              else "--classes imagenet: no class folders found")
        classes = "found"
    if classes == "found":
        classes = list(found)
    classes = list(classes)
    return classes, {c: i for i, c in enumerate(classes)}


def folder_pool(root: str | Path, per_domain: int | None = None, subset: str = "first", seed: int = 0,
                subset_keys: Sequence[str] | None = None, classes: Sequence[str] | None = None,
                domain: str | None = None, order: str = "shuffled", order_seed: int = 0) -> pa.Table:
    """A plain class-folder image set as one domain (named `domain`, default the folder's name);
    corruption is the domain name, severity 0. `order`: `shuffled` (default) puts the rows in a
    seeded random order (`order_seed`); `class-sorted` keeps ImageFolder's class-by-class order,
    where every batch holds one class (the worst case for BatchNorm statistics and Tent)."""
    if order not in ("shuffled", "class-sorted"):
        raise LayoutError(f"folder order must be shuffled or class-sorted, got {order!r}")
    root = Path(root).resolve()
    classes, class_index = class_indices(class_folders(root), classes)
    listing = list_images(root, classes)
    if not listing:
        raise LayoutError(f"no images in class folders under {root}")
    name = domain or root.name
    keys = [listing[i] for i in choose_subset(listing, per_domain, subset, seed, subset_keys)]
    if order == "shuffled":
        keys = [keys[i] for i in np.random.default_rng(order_seed).permutation(len(keys))]
    cols = {
        "sample_id": [f"{name}/{k}" for k in keys], "path": [str(root / k) for k in keys],
        "label": [class_index[k.split("/", 1)[0]] for k in keys], "domain": [name] * len(keys),
        "corruption": [name] * len(keys), "severity": [0] * len(keys),
    }
    return _pool_table(cols)


# ------------------------------------------------------------------------------------- command

def read_lines(path: str | Path) -> list[str]:
    """A list file's entries (one per line, blank lines skipped): UTF-8, each entry once."""
    p = Path(path)
    if not p.is_file():
        raise LayoutError(f"file not found: {p}")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise LayoutError(f"{p} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise LayoutError(f"cannot read {p}: {exc.strerror}") from None
    seen: set[str] = set()
    for line in lines:
        if line in seen:
            raise LayoutError(f"{p} lists {line!r} twice: each entry may appear once")
        seen.add(line)
    if not lines:
        raise LayoutError(f"{p} lists nothing")
    return lines


def build_pool(layout: str, root: str | Path, **options: Any) -> pa.Table:
    if layout == "cifar-c":
        options.pop("classes", None)
        return cifar_c_pool(root, **options)
    if layout == "imagenet-c":
        return imagenet_c_pool(root, **options)
    if layout == "folder":
        options.pop("corruptions", None)
        options.pop("severities", None)
        return folder_pool(root, **options)
    raise LayoutError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")


def build_manifest(layout: str, root: str | Path, out: str | Path, *, setting: str = "continual",
                   setting_params: dict[str, Any] | None = None, **options: Any) -> tuple[Path, dict[str, Any]]:
    """Pool the layout's samples, order them by `setting`, write the manifest; return (path, meta)."""
    check_out_file(out)
    pool = build_pool(layout, root, **options)
    table, meta = apply_setting(pool, setting, **(setting_params or {}))
    source = {k: v for k, v in options.items() if k != "subset_keys"}
    source.update(layout=layout, root=str(Path(root).resolve()), n_subset_keys=len(options.get("subset_keys") or []))
    if layout == "folder":
        source["order_note"] = ("rows in a seeded shuffle (--order-seed "
                                f"{options.get('order_seed', 0)}); --folder-order class-sorted for class by class"
                                if options.get("order", "shuffled") == "shuffled" else
                                "rows class by class (--folder-order class-sorted): every batch holds one class")
    meta["source"] = source
    meta["rows"] = table.num_rows
    try:
        return write_manifest(table, meta, out), meta
    except OSError as exc:
        Path(str(out) + ".tmp").unlink(missing_ok=True)
        raise LayoutError(f"cannot write {out}: {exc.strerror or exc}") from None


def check_out_file(out: str | Path) -> None:
    """--out must name a file that can be written: not a directory, in a writable directory."""
    p = Path(out).absolute()
    if p.is_dir():
        raise LayoutError(f"--out {out} is a directory; name the manifest file, e.g. {p / 'manifest.parquet'}")
    existing = next(q for q in p.parents if q.exists())
    if not existing.is_dir():
        raise LayoutError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LayoutError(f"--out {out}: {existing} is not writable")
