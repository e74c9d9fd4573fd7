"""KB search: throughput and recall@10 of IVF and HNSW against exact flat search, and the
latency a worker sees through the shared KB actor against the same index in-process,
measured side by side in one run.

    .venv/bin/python bench/kb_search.py                 # 200,000 x 384 (builds take a few minutes)
    .venv/bin/python bench/kb_search.py --n 20000       # quick run

Data (`--data`): `gaussian` (default) draws unit-normalised isotropic Gaussian vectors (seeded),
queries held out from the same distribution: the hard case for approximate search, nothing
to exploit, so its recall is a floor. `clustered` draws from a Gaussian mixture (n/100
centres, within-cluster cosine about 0.2), closer to how real embeddings sit. KBs are built
with `kb_index.build_kb` into a temporary directory that is deleted afterwards, and loaded
memory-mapped as the actor loads them.
Each timing is the median of `--repeats` runs taken in alternating order.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from kb_index.build import IndexSpec, build_kb  # noqa: E402
from kb_index.embedders import VectorEmbedder  # noqa: E402
from kb_index.index import load_kb, set_threads  # noqa: E402
from kb_index.vectors import l2_normalize  # noqa: E402

K = 10


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="KB vectors (default 200000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--data", choices=["gaussian", "clustered"], default="gaussian")
    p.add_argument("--queries", type=int, default=1000, help="queries for throughput and recall")
    p.add_argument("--threads", type=int, default=2, help="faiss threads, in-process and in the actor")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=_ints, default=[8, 32], help="comma-separated")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=_ints, default=[64, 128], help="comma-separated")
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--actor-index", choices=["flat", "ivf", "hnsw"], default="hnsw",
                   help="index the actor-latency comparison uses")
    p.add_argument("--calls", type=int, default=200,
                   help="calls per batch-1 latency measurement (batch 64: a quarter)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synthetic(args: argparse.Namespace, n: int, seed: int) -> np.ndarray:
    """n unit vectors; every call with the same args draws from the same distribution."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, args.dim), dtype=np.float32)
    if args.data == "clustered":
        centres = 0.5 * np.random.default_rng(args.seed + 1000).standard_normal((max(1, args.n // 100), args.dim),
                                                                          dtype=np.float32)
        x += centres[rng.integers(0, len(centres), n)]
    return l2_normalize(x)


def build_all(args: argparse.Namespace, root: Path) -> dict[str, dict]:
    x = synthetic(args, args.n, args.seed)
    table = pa.table({"id": pa.array(np.arange(args.n)),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), args.dim)})
    del x
    embedder = VectorEmbedder(f"synthetic-{args.data}", args.dim)
    specs = {
        "flat": IndexSpec(type="flat"),
        "ivf": IndexSpec(type="ivf", nlist=args.nlist, nprobe=args.nprobe[0]),
        "hnsw": IndexSpec(type="hnsw", m=args.hnsw_m, ef_search=args.ef_search[0],
                          ef_construction=args.ef_construction),
    }
    metas = {}
    for name, spec in specs.items():
        print(f"building {name} over {args.n} x {args.dim} ...", flush=True)
        metas[name] = build_kb(table, root / name, embedder, spec, batch_size=50_000, progress=None)
        print(f"  {metas[name]['index_seconds']:.1f}s", flush=True)
    return metas


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput_table(args: argparse.Namespace, root: Path, metas: dict[str, dict]) -> list[str]:
    queries = synthetic(args, args.queries, args.seed + 1)
    kbs = {name: load_kb(root / name) for name in metas}
    truth = kbs["flat"].search(queries, K)[1]
    configs = [("flat", "exact", {})]
    configs += [("ivf", f"nlist {args.nlist}, nprobe {p}", {"nprobe": p}) for p in args.nprobe]
    configs += [("hnsw", f"M {args.hnsw_m}, efSearch {e}", {"ef_search": e}) for e in args.ef_search]
    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    for r in range(args.repeats):
        order = range(len(configs)) if r % 2 == 0 else reversed(range(len(configs)))
        for i in order:
            name, _, params = configs[i]
            times[i].append(_once(lambda name=name, params=params: kbs[name].search(queries, K, **params)))
    flat_qps = args.queries / statistics.median(times[0])
    lines = [f"| index | params | build s | recall@{K} | queries/s | vs flat |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for i, (name, label, params) in enumerate(configs):
        found = kbs[name].search(queries, K, **params)[1]
        rec = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)])
        qps = args.queries / statistics.median(times[i])
        build = metas[name]["index_seconds"]
        lines.append(f"| {name} | {label} | {build:.1f} | {rec:.3f} | {qps:,.0f} | {qps / flat_qps:.1f}x |")
    return lines


def latency_table(args: argparse.Namespace, root: Path) -> list[str]:
    import ray

    from workers.kb_actor import get_or_create_kb_actor

    kb_dir = root / args.actor_index
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             log_to_driver=False)
    try:
        actor = get_or_create_kb_actor(kb_dir, name="bench-kb", threads=args.threads)
        kb = load_kb(kb_dir)
        queries = synthetic(args, max(64, args.calls), args.seed + 2)
        lines = ["| batch | payload | calls | in-process ms/call | actor ms/call | actor / in-process |",
                 "| ---: | --- | ---: | ---: | ---: | ---: |"]
        for batch in (1, 64):
            calls = args.calls if batch == 1 else max(10, args.calls // 4)  # a 64-batch call is ~50x longer
            for payload in (False, ["id"]):
                batches = [queries[(i * batch) % len(queries):][:batch] for i in range(calls)]
                batches = [b if len(b) == batch else queries[:batch] for b in batches]

                def local(batches=batches, payload=payload):
                    for b in batches:
                        _, idx = kb.search(b, K)
                        if payload:
                            kb.rows(idx, columns=payload)

                def remote(batches=batches, payload=payload):
                    for b in batches:
                        ray.get(actor.search.remote(b, K, payload=payload))

                remote()  # warm the actor's worker and its page cache
                t_local, t_remote = [], []
                for r in range(args.repeats):
                    pair = [(local, t_local), (remote, t_remote)]
                    for fn, sink in (pair if r % 2 == 0 else pair[::-1]):
                        sink.append(_once(fn))
                ms_local = statistics.median(t_local) / calls * 1e3
                ms_remote = statistics.median(t_remote) / calls * 1e3
                label = "id" if payload else "none"
                ratio = ms_remote / ms_local
                lines.append(f"| {batch} | {label} | {calls} | {ms_local:.3f} | {ms_remote:.3f} | {ratio:.1f}x |")
        info = ray.get(actor.info.remote())
        lines.append("")
        lines.append(f"actor: {info['index']}, load_mode {info['load_mode']}, faiss threads {info['faiss_threads']} "
                     f"(OMP_NUM_THREADS in the actor {info['omp_num_threads_env']})")
    finally:
        ray.shutdown()
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="kb_search_bench_"))
    try:
        metas = build_all(args, root)
        search = throughput_table(args, root, metas)
        latency = latency_table(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n## KB search: {args.n:,} x {args.dim} unit vectors ({args.data}), {args.queries} queries, "
          f"k={K}, {args.threads} faiss threads\n")
    print("\n".join(search))
    print(f"\n## Shared KB actor vs in-process search ({args.actor_index}, same KB directory, both mmap)\n")
    print("\n".join(latency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
