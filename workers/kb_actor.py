"""The shared KB-retrieval actor: one named actor per KB serves every worker's neighbour search.

Why an actor: workers share one loaded index (and one process's faiss threads) instead of
each loading a copy. The index is loaded from the KB directory inside the actor, never
pickled into it (pickling copies the whole index through the object store); faiss maps it
read-only, so even a second actor on the node shares the pages.

Threads: Ray sets OMP_NUM_THREADS=floor(num_cpus) in an actor (1 for fractional CPUs, as
measured with Ray 2.60), so faiss would search single-threaded unless told otherwise; the
actor always calls `faiss.omp_set_num_threads(threads)` with the number it was given.

The actor reserves a fraction of a CPU by default, so it never takes a core away from Ray
Data read tasks or workers on a small machine; its calls are served one at a time (a plain
Ray actor), so callers batch their queries.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from kb_index.index import get_threads, load_kb, set_threads

DEFAULT_NUM_CPUS = 0.1


class KBRetrievalActor:
    """Use through `get_or_create_kb_actor`; plain class so its logic also runs in-process."""

    def __init__(self, kb_dir: str, threads: int = 1, mmap: bool = True):
        self.kb = load_kb(kb_dir, mmap=mmap)
        set_threads(threads)
        self.calls = 0
        self.queries = 0
        self.search_seconds = 0.0

    def search(self, embeddings: np.ndarray, k: int, *, embedder: str | None = None,
               payload: bool | list[str] = True, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray, list[list[dict | None]] | None]:
        """Batched top-k: (scores [n, k], indices [n, k], payload rows per query or None).
        `payload`: True = every stored column, a list = those columns, False = no rows.
        `embedder` names the queries' embedder; a KB built by another one raises ValueError."""
        t0 = time.perf_counter()
        scores, indices = self.kb.search(embeddings, k, embedder=embedder, nprobe=nprobe, ef_search=ef_search)
        rows = None
        if payload is not False:
            rows = self.kb.rows(indices, columns=None if payload is True else list(payload))
        self.calls += 1
        self.queries += len(indices)
        self.search_seconds += time.perf_counter() - t0
        return scores, indices, rows

    def info(self) -> dict[str, Any]:
        """What is loaded and how: embedder, dim, count, index type/params, mmap, threads."""
        return {**self.kb.info(), "faiss_threads": get_threads(),
                "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "queries": self.queries, "search_seconds": round(self.search_seconds, 6)}


def get_or_create_named_actor(cls: type, name: str, args: tuple, *, num_cpus: float,
                              lifetime: str | None = None, namespace: str | None = None,
                              max_restarts: int = 0) -> ray.actor.ActorHandle:
    """The actor called `name` in `namespace`, created with `args` if it does not exist yet.
    When it exists, its original arguments stand: callers compare with `info()` to be sure."""
    if lifetime not in (None, "detached", "non_detached"):
        raise ValueError(f"actor lifetime must be None, 'detached' or 'non_detached', got {lifetime!r}")
    if num_cpus < 0:
        raise ValueError(f"actor num_cpus must be >= 0, got {num_cpus}")
    options: dict[str, Any] = {"name": name, "get_if_exists": True, "num_cpus": num_cpus,
                               "max_restarts": max_restarts}
    if lifetime is not None:
        options["lifetime"] = lifetime
    if namespace is not None:
        options["namespace"] = namespace
    return ray.remote(cls).options(**options).remote(*args)


def get_or_create_kb_actor(kb_dir: str | os.PathLike, *, name: str = "kb-retrieval",
                           num_cpus: float = DEFAULT_NUM_CPUS, threads: int | None = None,
                           mmap: bool = True, lifetime: str | None = None,
                           namespace: str | None = None) -> ray.actor.ActorHandle:
    """The shared KB actor for `kb_dir`, created on first use. `threads` = faiss threads in the
    actor (default: the CPUs it reserves, at least 1). Raises ValueError when `kb_dir` is not a
    KB or when an actor of that name already serves another KB."""
    path = Path(kb_dir).resolve()
    if not (path / "kb.json").is_file():
        raise ValueError(f"not a KB directory (no kb.json): {path}")
    threads = threads if threads is not None else max(1, math.floor(num_cpus))
    # stateless apart from counters, so a restart after a crash is safe
    handle = get_or_create_named_actor(KBRetrievalActor, name, (str(path), threads, mmap), num_cpus=num_cpus,
                                       lifetime=lifetime, namespace=namespace, max_restarts=3)
    served = ray.get(handle.info.remote())["path"]
    if served != str(path):
        raise ValueError(f"actor '{name}' already serves the KB at {served}, not {path}")
    return handle
