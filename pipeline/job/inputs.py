"""A shard's input stream: manifest rows read, decoded and preprocessed by Ray Data operators
(CPU tasks, parallel, anywhere in the cluster), delivered to the shard's worker in stream order.

The worker then only adapts and predicts: on a GPU node the accelerator does not wait on one
core's JPEG decoding. The stream for rows [start, end) of the manifest is a
dataset of row ranges (`block_rows` each), each mapped by `prepare_block`, which reads its
rows straight from the manifest's Parquet row groups (nothing is materialised on the driver) and
turns each into `_image` (float32 C x H x W bytes, already validated, resized and cropped by
`ttt.images`) or `_error` (why the row cannot be used, naming its file or column). With
`preserve_order` the worker sees the rows in manifest order, so a resumed shard is just a stream
that starts at its last committed row.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.manifest import manifest_files, utf8_errors
from ttt.images import ImageSpec
from workers.adapters import ImageRowReader

IMAGE_COL, ERROR_COL = "_image", "_error"
HEAVY_COLS = ("pixels",)  # replaced by `_image` once decoded


@dataclass(frozen=True)
class InputSpec:
    """What `prepare_block` needs, all plain data (it travels to Ray Data tasks)."""

    manifest: str
    kind: str  # image_classifier rows are decoded; causal_lm rows pass through (the adapter tokenises)
    model: dict[str, Any]  # the `model` config section (image preprocessing fields)
    num_classes: int | None
    read_timeout_s: float | None
    rows_per_block: int | None = None  # None = `block_rows`
    prefetch_blocks: int = 4
    cpus_per_task: float = 0.5


BLOCK_BYTES = 32 * 2**20  # decoded bytes a block aims at when `rows_per_block` is unset
MAX_BLOCK_ROWS = 1024


def block_rows(inputs: InputSpec) -> int:
    """Rows per decode block: `rows_per_block` when set, else as many decoded images as fill
    BLOCK_BYTES (at most MAX_BLOCK_ROWS). Ray Data's cost per block at the consuming worker is tens
    of milliseconds, so 256-row blocks of digits slowed a Tent worker by a third; 32 MiB blocks of
    224 px RGB images still keep the first block (what the worker waits for) small."""
    if inputs.rows_per_block is not None:
        return inputs.rows_per_block
    if inputs.kind != "image_classifier":
        return 256  # text rows pass through undecoded; each is a long adaptation
    row_bytes = 4 * int(np.prod(ImageSpec.from_model_config(inputs.model).shape))
    return max(1, min(MAX_BLOCK_ROWS, BLOCK_BYTES // row_bytes))


class ManifestRows:
    """Random access to a manifest's rows by global row number, through Parquet row groups."""

    def __init__(self, files: tuple[tuple[str, int, int], ...]):
        self.files = files  # (path, mtime_ns, size): a file rewritten in place is a new file
        self.groups: list[tuple[int, int, int]] = []  # (global first row, file index, row group)
        first = 0
        for fi, (path, _, _) in enumerate(files):
            meta = pq.read_metadata(path)
            for g in range(meta.num_row_groups):
                self.groups.append((first, fi, g))
                first += meta.row_group(g).num_rows
        self.num_rows = first
        self._starts = np.array([g[0] for g in self.groups] + [first], dtype=np.int64)

    def read(self, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) as one table, in manifest order."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) outside the manifest's {self.num_rows}")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces, at = [], start
        while at < stop:
            g0, fi, g = self.groups[first]
            group = _row_group(self.files[fi], g)
            lo = at - g0
            hi = min(stop - g0, group.num_rows)
            pieces.append(group.slice(lo, hi - lo))
            at = g0 + hi
            first += 1
        return pa.concat_tables(pieces, promote_options="permissive") if len(pieces) > 1 else pieces[0]


def manifest_rows(manifest: str) -> ManifestRows:
    """The manifest's rows, cached per process by file identity (path, modification time, size):
    decode processes live on between runs, and a manifest rewritten at the same path must not be
    read from a stale cache."""
    files = []
    for f in manifest_files(manifest):
        st = os.stat(f)
        files.append((str(f), st.st_mtime_ns, st.st_size))
    return _manifest_rows(tuple(files))


@functools.lru_cache(maxsize=8)
def _manifest_rows(files: tuple[tuple[str, int, int], ...]) -> ManifestRows:
    return ManifestRows(files)


@functools.lru_cache(maxsize=2)
def _row_group(file: tuple[str, int, int], group: int) -> pa.Table:
    """One Parquet row group, kept for the next blocks: a decode task reads a block of rows, but
    Parquet reads whole row groups, and a manifest written as one 15k-row group was otherwise read
    once per block (quadratic: 59 reads of 0.2 s for the default stream). Ray reuses task
    processes, so each process reads each group about once; two groups bound what it holds."""
    return pq.ParquetFile(file[0]).read_row_group(group)


@functools.lru_cache(maxsize=8)
def _reader(spec: ImageSpec, num_classes: int | None, timeout: float | None) -> ImageRowReader:
    return ImageRowReader(spec, num_classes=num_classes, read_timeout_s=timeout)


def prepare_block(batch: dict[str, np.ndarray], *, inputs: InputSpec) -> pa.Table:
    """One Ray Data block: manifest rows [lo, hi) -> pass-through columns + `_image` / `_error`."""
    rows = manifest_rows(inputs.manifest)
    table = pa.concat_tables([rows.read(int(lo), int(hi))
                              for lo, hi in zip(batch["lo"], batch["hi"])])
    table, text_errors = utf8_checked(table)
    if inputs.kind != "image_classifier":
        return table.append_column(ERROR_COL, pa.array(text_errors, pa.string())) if any(text_errors) else table
    spec = ImageSpec.from_model_config(inputs.model)
    reader = _reader(spec, inputs.num_classes, inputs.read_timeout_s)
    decoded: list[Any] = _inline_pixels(table, spec) or _array_rows(table, spec, reader) or [None] * table.num_rows
    decoded = [err or d for err, d in zip(text_errors, decoded)]
    if "label" in table.column_names:  # rows decoded in bulk still get their label checked
        for i, err in enumerate(reader.read_labels(table.column("label").to_pylist())):
            if err is not None and decoded[i] is not None:
                decoded[i] = err
    slow = [i for i, d in enumerate(decoded) if d is None]
    if slow:  # files, and inline rows the vectorised checks did not clear: one at a time, exact messages
        rows = table.take(pa.array(slow, pa.int64())).to_pylist()
        for i, got in zip(slow, reader.read(rows)):
            decoded[i] = got
    images = [None if isinstance(d, str) else d.tobytes() for d in decoded]
    errors = [d if isinstance(d, str) else None for d in decoded]
    keep = [c for c in table.column_names if c not in HEAVY_COLS]
    return table.select(keep).append_column(IMAGE_COL, pa.array(images, pa.binary())) \
                             .append_column(ERROR_COL, pa.array(errors, pa.string()))


def utf8_checked(table: pa.Table) -> tuple[pa.Table, list[str | None]]:
    """A block whose `text`, `path`, `domain` (any string column) holds invalid UTF-8, which
    Parquet does not check on write: those values become null and the row's error names the column,
    so each such row is an error row rather than a `UnicodeDecodeError` that fails the block, and
    the run, on every attempt. (sample_id is checked for the whole manifest at start-up.)"""
    errors: list[str | None] = [None] * table.num_rows
    for i, name in enumerate(table.column_names):
        column = table.column(name).combine_chunks()
        bad = utf8_errors(column) if pa.types.is_string(column.type) else None
        if bad is None:
            continue
        for row, why in enumerate(bad):
            if why:
                errors[row] = errors[row] or f"row {name!r} is not valid UTF-8 ({why})"
        keep = pa.array([why is None for why in bad])
        table = table.set_column(i, name, pc.if_else(keep, column.view(pa.binary()), None).cast(pa.string()))
    return table, errors


def _inline_pixels(table: pa.Table, spec: ImageSpec) -> list[np.ndarray | None] | None:
    """The block's `pixels` column decoded at once (whole column to NumPy, the finite / range /
    scale rules of `ttt.images` applied per row, vectorised): each row's [C, H, W] array, or None
    for a row that needs the one-at-a-time path. None when the block is not plain inline pixels."""
    if "pixels" not in table.column_names or "path" in table.column_names or spec.resize or spec.center_crop:
        return None
    col = table.column("pixels").combine_chunks()
    size = int(np.prod(spec.shape))
    if not pa.types.is_list(col.type) or col.null_count:
        return None
    if not (pa.types.is_integer(col.type.value_type) or pa.types.is_floating(col.type.value_type)):
        return None
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    if (lengths != size).any():
        return None
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), size)
    ok = np.isfinite(x).all(axis=1)
    lo = np.where(ok, x.min(axis=1, initial=np.inf), 0.0)
    hi = np.where(ok, x.max(axis=1, initial=-np.inf), 0.0)
    ok &= (lo >= 0.0) & (hi <= 255.0)
    scaled = np.where((hi > 1.0)[:, None], x / 255.0, x).astype(np.float32)
    return [scaled[i].reshape(spec.shape) if ok[i] else None for i in range(len(col))]


def _array_rows(table: pa.Table, spec: ImageSpec, reader: ImageRowReader) -> list[np.ndarray | None] | None:
    """Rows that point into 8-bit `.npy` arrays (`path` + `index`, the CIFAR-C layout) read in bulk:
    one memory-mapped gather per file, scaled and put channels-first at once. None (the row-by-row
    path) for anything else: other dtypes or sizes, resizing, missing or out-of-range indices."""
    if not {"path", "index"} <= set(table.column_names) or "pixels" in table.column_names:
        return None
    if spec.resize or spec.center_crop or table.column("index").null_count or table.column("path").null_count:
        return None
    paths = table.column("path").to_pylist()
    index = table.column("index").to_numpy(zero_copy_only=False).astype(np.int64)
    out: list[np.ndarray | None] = [None] * len(paths)
    for path in set(paths):
        if not path.endswith(".npy"):
            return None
        try:
            arr = reader.arrays.open(path)
        except ValueError:
            return None
        rows = np.array([i for i, p in enumerate(paths) if p == path])
        idx = index[rows]
        if arr.dtype != np.uint8 or idx.min() < 0 or idx.max() >= len(arr):
            return None
        images = np.asarray(arr[idx]).astype(np.float32) / 255.0
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = np.moveaxis(images, -1, 1)
        if tuple(images.shape[1:]) != tuple(spec.shape):
            return None
        for i, image in zip(rows, images):
            out[i] = np.ascontiguousarray(image)
    return out


def block_sizes(full: int) -> Iterator[int]:
    """Block sizes along a stream: 1/8, 1/4, 1/2 of `full`, then `full` from there on. The worker
    starts on a small first block (what it waits for before its first batch) while the larger
    blocks that keep the per-row cost low decode behind it."""
    for div in (8, 4, 2):
        yield max(1, full // div)
    while True:
        yield full


def block_ranges(start: int, end: int, full: int) -> list[dict[str, int]]:
    """Rows [start, end) cut into consecutive blocks of `block_sizes(full)`."""
    ranges, lo, sizes = [], start, block_sizes(full)
    while lo < end:
        size = next(sizes)
        ranges.append({"lo": lo, "hi": min(lo + size, end)})
        lo += size
    return ranges


def shard_dataset(inputs: InputSpec, start: int, end: int) -> "ray.data.Dataset":
    """The ordered, preprocessed stream of manifest rows [start, end)."""
    # The block ranges are the source (no read task, so nothing asks for a whole CPU: with 1-CPU
    # nodes a whole-CPU read could never be placed beside the workers); one decode task per range.
    ranges = block_ranges(start, end, block_rows(inputs))
    ds = ray.data.from_items(ranges, override_num_blocks=len(ranges))
    ds = ds.map_batches(prepare_block, batch_size=1, batch_format="numpy",
                        num_cpus=inputs.cpus_per_task, fn_kwargs={"inputs": inputs})
    ds.context.execution_options.preserve_order = True
    return ds


def warm_up(inputs: InputSpec) -> None:
    """Decode the manifest's first row through the same operators and throw it away. A cluster's
    first Ray Data execution starts its stats actor and decode processes (~3.5 s on the dev box);
    the job runs this on the driver while the workers start, so their first block does not wait for
    it. Best effort: a failure here is the real stream's to report."""
    try:
        for _ in shard_dataset(inputs, 0, min(1, count_rows(inputs.manifest))).iter_batches(batch_size=None):
            pass
    except Exception:
        pass


def count_rows(manifest: str | Path, limit: int | None = None) -> int:
    n = sum(pq.read_metadata(f).num_rows for f in manifest_files(manifest))
    return n if limit is None else min(n, limit)
