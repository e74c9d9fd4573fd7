"""Loading a KB directory and searching it.

The index is memory-mapped read-only where faiss allows (faiss 1.15 maps flat, IVF and HNSW
alike), so several processes on a node share one copy of its pages and loading costs almost
no resident memory. A mapped index must never be modified: faiss aborts the whole process
(an assertion, not an exception) on `add`, so `KnowledgeBase` exposes no way to add.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from kb_index.vectors import l2_normalize

MISSING = -1  # faiss's label for "no neighbour" (k larger than what the index can return)


def set_threads(n: int) -> None:
    """faiss's OpenMP threads for this process. Ray sets OMP_NUM_THREADS=floor(num_cpus) in a
    worker (1 for a fractional-CPU actor), so an actor must call this to search wider."""
    if n < 1:
        raise ValueError(f"faiss threads must be >= 1, got {n}")
    faiss.omp_set_num_threads(int(n))


def get_threads() -> int:
    return int(faiss.omp_get_max_threads())


def _read_index(path: Path, mmap: bool) -> tuple[faiss.Index, str]:
    """(index, how it was read): 'mmap' or 'memory' (with the reason when mmap was asked for)."""
    if mmap:
        flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None) or getattr(faiss, "IO_FLAG_MMAP", None)
        if flag is not None:
            try:
                return faiss.read_index(str(path), flag | getattr(faiss, "IO_FLAG_READ_ONLY", 0)), "mmap"
            except RuntimeError as exc:  # an index type this faiss cannot map: read it whole
                return faiss.read_index(str(path)), f"memory (mmap failed: {str(exc).splitlines()[0]})"
        return faiss.read_index(str(path)), "memory (this faiss has no mmap flag)"
    return faiss.read_index(str(path)), "memory"


class KnowledgeBase:
    """A loaded KB: `search` for neighbours, `rows` for their payload, `meta` from kb.json."""

    def __init__(self, path: Path, meta: dict[str, Any], index: faiss.Index, load_mode: str):
        self.path = path
        self.meta = meta
        self.index = index
        self.load_mode = load_mode
        # memory-mapped too: the payload (pixels, text) can be larger than the index
        self._rows = pq.read_table(path / "rows.parquet", memory_map=True)
        if self._rows.num_rows != index.ntotal:
            raise ValueError(f"KB at {path}: rows.parquet has {self._rows.num_rows} rows "
                             f"but the index holds {index.ntotal}")

    @property
    def embedder(self) -> str:
        return self.meta["embedder"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def index_type(self) -> str:
        return self.meta["index"]["type"]

    @property
    def mmapped(self) -> bool:
        return self.load_mode == "mmap"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def check_embedder(self, name: str | None = None, dim: int | None = None) -> None:
        """Raise ValueError when queries come from another embedder or have another width."""
        if name is not None and name != self.embedder:
            raise ValueError(f"KB at {self.path} was built with embedder '{self.embedder}'; "
                             f"queries come from embedder '{name}'")
        if dim is not None and dim != self.dim:
            raise ValueError(f"query embeddings have dim {dim} but the KB at {self.path} "
                             f"(embedder '{self.embedder}') has dim {self.dim}")

    def search(self, embeddings: np.ndarray, k: int, *, embedder: str | None = None,
               nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine: (scores float32 [n, k], indices int64 [n, k]); a missing neighbour is
        index -1 with score -inf. Queries are re-normalised, so any scale gives cosine.
        `embedder` names the query's embedder (checked against the KB's); `nprobe` (ivf) and
        `ef_search` (hnsw) override the stored search params for this call only."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise ValueError(f"query embeddings must be [n, dim], got shape {x.shape}")
        self.check_embedder(embedder, x.shape[1])
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        params = self._search_params(nprobe, ef_search)
        if params is None:
            scores, indices = self.index.search(l2_normalize(x), k)
        else:
            scores, indices = self.index.search(l2_normalize(x), k, params=params)
        scores = scores.astype(np.float32, copy=False)
        scores[indices == MISSING] = -np.inf
        return scores, indices.astype(np.int64, copy=False)

    def _search_params(self, nprobe: int | None, ef_search: int | None) -> faiss.SearchParameters | None:
        # per-call parameter objects, not index attributes: concurrent callers cannot race
        if nprobe is not None:
            if self.index_type != "ivf":
                raise ValueError(f"nprobe applies to ivf indexes; this KB is {self.index_type}")
            return faiss.SearchParametersIVF(nprobe=int(nprobe))
        if ef_search is not None:
            if self.index_type != "hnsw":
                raise ValueError(f"ef_search applies to hnsw indexes; this KB is {self.index_type}")
            return faiss.SearchParametersHNSW(efSearch=int(ef_search))
        return None

    def rows(self, indices: Any, columns: list[str] | None = None) -> list[Any]:
        """Payload rows for KB indices, as dicts (None for -1). 1-D indices give a list of rows;
        2-D (what `search` returns) give one list per query. `columns` limits the payload."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim not in (1, 2):
            raise ValueError(f"indices must be 1-D or 2-D, got shape {idx.shape}")
        bad = idx[(idx >= len(self)) | (idx < MISSING)]
        if bad.size:
            raise ValueError(f"KB row index {int(bad[0])} is out of range [0, {len(self)})")
        table = self._rows if columns is None else self._rows.select(columns)
        flat = idx.reshape(-1)
        found = flat[flat != MISSING]
        fetched = iter(table.take(found).to_pylist())
        out = [next(fetched) if i != MISSING else None for i in flat]
        return out if idx.ndim == 1 else [out[r * idx.shape[1]:(r + 1) * idx.shape[1]] for r in range(idx.shape[0])]

    def vectors(self) -> np.ndarray:
        """The stored unit vectors [count, dim], memory-mapped read-only."""
        return np.load(self.path / "vectors.npy", mmap_mode="r")

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "embedder": self.embedder, "dim": self.dim, "count": len(self),
                "index": dict(self.meta["index"]), "load_mode": self.load_mode}


def load_kb(path: str | os.PathLike, mmap: bool = True) -> KnowledgeBase:
    """Open a KB directory written by `build_kb`; `mmap` maps the index read-only where faiss can."""
    root = Path(path)
    if not (root / "kb.json").is_file():
        raise ValueError(f"not a KB directory (no kb.json): {root}")
    meta = json.loads((root / "kb.json").read_text())
    for name in ("index.faiss", "rows.parquet"):
        if not (root / name).is_file():
            raise ValueError(f"KB at {root} is incomplete: {name} is missing")
    index, mode = _read_index(root / "index.faiss", mmap)
    if index.d != int(meta["dim"]) or index.ntotal != int(meta["count"]):
        raise ValueError(f"KB at {root}: index.faiss ({index.ntotal} x {index.d}) disagrees with kb.json "
                         f"({meta['count']} x {meta['dim']})")
    return KnowledgeBase(root, meta, index, mode)
