"""Samples per second of the Tent pipeline with 1 and 2 workers, against a plain in-process
PyTorch loop doing the same Tent updates on the same shards, measured side by side in one run.

    .venv/bin/python bench/pipeline_throughput.py [--rows N] [--repeats R]

Each configuration runs R times in alternating order; the median wall time is reported. The
plain loop uses one torch thread, like each worker; the Ray timings include worker start-up,
sharding and Parquet writes (what a user waits for).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def plain_loop(cfg) -> float:
    """The same work without Ray: per shard, reset to source, Tent over contiguous batches."""
    from pipeline.job.record import shard_bounds
    from ttt import build_method
    from workers.ttt_worker import build_adapter

    torch.set_num_threads(1)
    table = pq.read_table(cfg.data.manifest).slice(0, cfg.data.limit)
    pixels = np.stack(table.column("pixels").to_numpy(zero_copy_only=False)).astype(np.float32)
    t0 = time.perf_counter()
    adapter = build_adapter(cfg.model.model_dump(), "cpu")
    method = build_method(adapter, cfg.ttt)
    x_all = (torch.from_numpy(pixels).view(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    for start, end in shard_bounds(len(x_all), cfg.workers.num_shards or 1):
        method.reset()
        for i in range(start, end, cfg.ttt.batch_size):
            method.step(x_all[i:min(i + cfg.ttt.batch_size, end)]).logits.argmax(1)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from pipeline.config import load_config
    from pipeline.job.checks import prepare
    from pipeline.job.runner import run_job

    out = tempfile.mkdtemp(prefix="bench-throughput-")
    cfg = prepare(load_config("configs/mnistc_tent.yaml", [f"data.limit={args.rows}", f"output_root={out}",
                                                           "workers.num_cpus=0.5"]))
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    timings: dict[str, list[float]] = {"plain loop (1 thread)": [], "ray, 1 worker": [], "ray, 2 workers": []}
    for rep in range(args.repeats):
        order = list(timings) if rep % 2 == 0 else list(reversed(timings))
        for name in order:
            if name.startswith("plain"):
                timings[name].append(plain_loop(cfg))
            else:
                workers = 1 if "1 worker" in name else 2
                t0 = time.perf_counter()
                run_job(cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"num_workers": workers})}))
                timings[name].append(time.perf_counter() - t0)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in timings.items()}
    plain = med["plain loop (1 thread)"]
    print(f"\nTent, {args.rows} rows, batch {cfg.ttt.batch_size}, {cfg.workers.num_shards or 1} shards, "
          f"median of {args.repeats} (alternating order)\n")
    print("| configuration | wall s | samples/s | time vs plain loop |")
    print("| --- | --- | --- | --- |")
    for name, wall in med.items():
        print(f"| {name} | {wall:.2f} | {args.rows / wall:.0f} | {wall / plain:.2f}x |")
    print(f"\n2 workers vs 1 worker: {med['ray, 1 worker'] / med['ray, 2 workers']:.2f}x samples/s")


if __name__ == "__main__":
    main()
