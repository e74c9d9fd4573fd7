"""Building a knowledge base: corpus rows -> embeddings -> faiss index -> a directory of files.

A KB directory is self-describing, so a retrieval actor anywhere can load it without the
builder's arguments:

    vectors.npy     float32 [count, dim], L2-normalised, in index order
    rows.parquet    the corpus rows (id, label, text/pixels, other payload), in index order
    index.faiss     flat / ivf / hnsw over inner product (= cosine on unit vectors)
    kb.json         embedder name, dim, count, index type and params, build time, created

kb.json is written last and removed first, so a directory with kb.json is a complete KB.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:  # type hints only: building from precomputed vectors needs no torch
    from kb_index.embedders import Embedder

INDEX_TYPES = ("flat", "ivf", "hnsw")
ITEM_COLUMNS = ("text", "pixels", "vector")  # what the embedder may read when no column is named
FORMAT_VERSION = 1


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index to build. Params that do not apply to `type` are ignored and not recorded.

    ivf: `nlist` lists (None = about 4*sqrt(count), at least 39 training points per list),
    `nprobe` lists searched. hnsw: `m` links per node, `ef_search`, `ef_construction`."""

    type: str = "flat"
    nlist: int | None = None
    nprobe: int = 8
    m: int = 32
    ef_search: int = 64
    ef_construction: int = 80

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise ValueError(f"unknown index type '{self.type}': expected one of {', '.join(INDEX_TYPES)}")
        for field in ("nprobe", "m", "ef_search", "ef_construction"):
            if getattr(self, field) < 1:
                raise ValueError(f"index param {field} must be >= 1, got {getattr(self, field)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"index param nlist must be >= 1, got {self.nlist}")

    def params(self, count: int) -> dict[str, Any]:
        """The params that apply to this type, resolved for `count` vectors (as kb.json records them)."""
        if self.type == "ivf":
            nlist = self.nlist or max(1, min(int(4 * math.sqrt(count)), count // 39))
            return {"nlist": nlist, "nprobe": min(self.nprobe, nlist)}
        if self.type == "hnsw":
            return {"M": self.m, "efSearch": self.ef_search, "efConstruction": self.ef_construction}
        return {}


def make_index(vectors: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """A trained, filled faiss index over unit vectors, inner-product metric."""
    n, dim = vectors.shape
    params = spec.params(n)
    if spec.type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.type == "ivf":
        if params["nlist"] > n:
            raise ValueError(f"ivf nlist {params['nlist']} exceeds the {n} vectors to train on")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # centroids on the unit sphere: k-means for cosine
        index.train(vectors)
        index.nprobe = params["nprobe"]  # persisted by write_index
    else:
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]  # persisted by write_index
    index.add(vectors)
    return index


def _as_table(corpus: Any) -> pa.Table:
    if isinstance(corpus, pa.Table):
        return corpus
    if isinstance(corpus, list):
        return pa.Table.from_pylist(corpus)
    if hasattr(corpus, "to_dict") and hasattr(corpus, "columns"):  # a pandas DataFrame
        return pa.Table.from_pandas(corpus, preserve_index=False)
    raise ValueError(f"corpus must be a pyarrow Table, pandas DataFrame or list of dicts, got {type(corpus).__name__}")


def pick_item_column(table: pa.Table, item_column: str | None = None) -> str:
    """The column the embedder reads: the one named, else the only one of text/pixels/vector
    present (several present is ambiguous and must be named)."""
    if "id" not in table.column_names:
        raise ValueError(f"corpus has no 'id' column (columns: {', '.join(table.column_names)})")
    if item_column is not None:
        if item_column not in table.column_names:
            raise ValueError(f"corpus has no '{item_column}' column (columns: {', '.join(table.column_names)})")
        return item_column
    present = [name for name in ITEM_COLUMNS if name in table.column_names]
    if len(present) == 1:
        return present[0]
    if present:
        raise ValueError(f"corpus has several columns to embed ({', '.join(present)}): "
                         "name one (item_column / --column)")
    raise ValueError(f"corpus has none of the columns {', '.join(ITEM_COLUMNS)} to embed "
                     f"(columns: {', '.join(table.column_names)})")


def column_items(table: pa.Table, column: str, start: int, stop: int) -> list[Any] | np.ndarray:
    """Rows [start, stop) of `column` as embedder items: strings, or a float32 [n, L] array when
    every row is a list of the same length (the fast path for pixels and vectors)."""
    col = table.column(column).slice(start, stop - start).combine_chunks()
    if col.null_count:
        first = start + int(pc.index(pc.is_null(col), True).as_py())
        raise ValueError(f"corpus row {first} (id {table.column('id')[first].as_py()!r}) has no '{column}'")
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col).to_numpy()
        if len(lengths) and (lengths == lengths[0]).all():
            return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), int(lengths[0]))
    return col.to_pylist()


class _Progress:
    """Rate-limited progress lines: the first batch, then every `every` seconds, then the last."""

    def __init__(self, total: int, emit: Callable[[str], None] | None, every: float = 2.0):
        self.total, self.emit, self.every = total, emit, every
        self.t0 = time.perf_counter()
        self.last: float | None = None

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        due = self.last is None or done == self.total or now - self.last >= self.every
        if self.emit is None or not due:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        self.emit(f"[build-kb] embedded {done}/{self.total} rows ({rate:.0f} rows/s, eta {eta:.0f}s)")


def embed_table(table: pa.Table, column: str, embedder: Embedder, *, batch_size: int = 256,
                progress: Callable[[str], None] | None = print) -> np.ndarray:
    """Embed every row's `column` in batches into one float32 [n, dim] array of unit rows."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    n = table.num_rows
    out = np.empty((n, embedder.dim), dtype=np.float32)
    report = _Progress(n, progress)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        vecs = embedder.embed(column_items(table, column, start, stop))
        if vecs.shape != (stop - start, embedder.dim):
            raise ValueError(f"embedder '{embedder.name}' returned shape {vecs.shape} "
                             f"for {stop - start} items of dim {embedder.dim}")
        out[start:stop] = vecs
        report(stop)
    return out


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def build_kb(corpus: Any, out_dir: str | os.PathLike, embedder: Embedder, spec: IndexSpec | None = None, *,
             batch_size: int = 256, item_column: str | None = None, keep_columns: list[str] | None = None,
             progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Embed `corpus` (rows with `id` and text/pixels/vector, optional label and payload), build
    the index and write the KB directory. `keep_columns` limits what rows.parquet keeps (None =
    every column; `id` is always kept). Returns the kb.json metadata."""
    spec = spec or IndexSpec()
    table = _as_table(corpus)
    column = pick_item_column(table, item_column)
    if table.num_rows == 0:
        raise ValueError("corpus has no rows")
    if pc.count_distinct(table.column("id")).as_py() != table.num_rows:
        raise ValueError("corpus 'id' column has duplicate values")
    if keep_columns is not None:
        missing = [c for c in keep_columns if c not in table.column_names]
        if missing:
            raise ValueError(f"keep_columns names columns the corpus lacks: {', '.join(missing)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kb.json").unlink(missing_ok=True)  # from here on the directory is not a complete KB

    t0 = time.perf_counter()
    vectors = embed_table(table, column, embedder, batch_size=batch_size, progress=progress)
    t_embed = time.perf_counter() - t0
    if progress:
        progress(f"[build-kb] building {spec.type} index over {len(vectors)} x {embedder.dim}")
    t1 = time.perf_counter()
    index = make_index(vectors, spec)
    t_index = time.perf_counter() - t1

    keep = table.column_names if keep_columns is None else ["id", *[c for c in keep_columns if c != "id"]]
    def save_vectors(path: Path) -> None:
        with open(path, "wb") as fh:  # a file object: np.save would append .npy to a temp name
            np.save(fh, vectors)

    _replace_atomically(out / "vectors.npy", save_vectors)
    _replace_atomically(out / "rows.parquet", lambda p: pq.write_table(table.select(keep), p))
    _replace_atomically(out / "index.faiss", lambda p: faiss.write_index(index, str(p)))
    meta = {
        "format": FORMAT_VERSION,
        "embedder": embedder.name,
        "dim": int(embedder.dim),
        "count": int(len(vectors)),
        "index": {"type": spec.type, **spec.params(len(vectors))},
        "metric": "inner_product",  # on L2-normalised vectors, i.e. cosine similarity
        "item_column": column,
        "columns": keep,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "embed_seconds": round(t_embed, 3),
        "index_seconds": round(t_index, 3),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "faiss_version": faiss.__version__,
    }
    _replace_atomically(out / "kb.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    if progress:
        progress(f"[build-kb] wrote {out} ({meta['count']} rows, {spec.type}, {meta['build_seconds']:.1f}s)")
    return meta


