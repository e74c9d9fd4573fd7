"""The job at scale (issue 15), three measurements, each side by side in one run:

    .venv/bin/python bench/job_scale.py throughput [--rows 15000] [--repeats 3]
    .venv/bin/python bench/job_scale.py growth [--rows 15000,150000]
    .venv/bin/python bench/job_scale.py lost [--every 1000,20,5] [--rows 3000]
    .venv/bin/python bench/job_scale.py command [--rows 15000] [--repeats 3]
    .venv/bin/python bench/job_scale.py ceiling [--rows 15000] [--repeats 3]
    .venv/bin/python bench/job_scale.py decode [--rows 15000]
    .venv/bin/python bench/job_scale.py boot [--repeats 5]

throughput: Tent on the default stream, the pipeline (1 and 2 workers) against what a user would
  write instead: a plain PyTorch loop with `DataLoader(num_workers=2)` reading the same rows as PNG
  files (the bench writes them), and a plain in-process loop on the inline pixels. Same Tent
  updates, same shards, one torch thread per model. Prints samples/s and the ratios, and where the
  pipeline's time before the first adapted batch goes. The pipeline runs on fresh workers (what one
  `pipeline run` does) and on warm ones (a driver's later runs inside `warm_workers()`). Beyond the
  stream's 15,000 rows, the stream is repeated with fresh sample ids.
growth: `source` over a manifest of N rows that point into one .npy of the default stream's digits
  (tiled with fresh sample ids: the CIFAR-C row layout), each size in its own process: wall, rows/s,
  the driver's peak RSS and the workers' peak RSS and USS (private memory).
lost: kill the worker at a random batch of a 1-shard Tent run, for several `checkpoint_every`
  values: the row the shard went on from (run.json `resumes`), the rows recomputed, and whether the results equal an
  undisturbed run.
command: the throughput comparison as whole commands timed from outside (`python -m pipeline run`
  on a running local cluster against the plain loop as its own process).
ceiling: what two processes get on this machine: the plain loop on all rows in one process against
  half the rows in each of two at once (each times its own loop, imports excluded).
decode: wall and CPU per row of one decode task, inline pixels and PNG files, with and without the read timeout.
boot: what a fresh worker process does before its first Tent step, each part timed in a new
  process as Ray starts one (Ray imported): torch, the rest of the worker module, the model, the
  method (its first optimiser imports torch._dynamo), the first step. The floor under any run that
  starts new worker processes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.job.checks import prepare  # noqa: E402
from pipeline.job.inputs import InputSpec, prepare_block  # noqa: E402
from pipeline.job.pool import warm_workers  # noqa: E402
from pipeline.job.ray_start import init_ray  # noqa: E402
from pipeline.job.record import shard_bounds  # noqa: E402
from pipeline.job.runner import run_job  # noqa: E402
from pipeline.manifest import ROW_GROUP_ROWS  # noqa: E402
from ttt import build_method  # noqa: E402
from ttt.images import ImageSpec, normalise, read_row  # noqa: E402
from workers.ttt_worker import build_adapter  # noqa: E402


# -- throughput --------------------------------------------------------------------------------
class PngRows(Dataset):
    """The plain loop's dataset: one PNG per row, read with the pipeline's own preprocessing."""

    def __init__(self, paths: list[str], spec: ImageSpec):
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(read_row({"path": self.paths[i]}, self.spec))


def stream_rows(manifest: str, n_rows: int, out: Path) -> Path:
    """The default stream's first `n_rows`, the whole stream repeated (fresh sample ids) beyond it."""
    table = pq.read_table(manifest)
    idx = np.arange(n_rows) % table.num_rows
    tiled = table.take(pa.array(idx))
    tiled = tiled.set_column(tiled.column_names.index("sample_id"), "sample_id",
                             pa.array([f"r{i:08d}-{s}" for i, s in enumerate(tiled.column("sample_id").to_pylist())]))
    tiled = tiled.set_column(tiled.column_names.index("position"), "position", pa.array(np.arange(n_rows)))
    path = out / f"stream-{n_rows}.parquet"
    pq.write_table(tiled, path, row_group_size=ROW_GROUP_ROWS)
    return path


def write_pngs(manifest: Path, out: Path) -> Path:
    """One PNG per distinct image of `manifest` (a repeated row reads the same file)."""
    table = pq.read_table(manifest)
    (out / "png").mkdir(parents=True, exist_ok=True)
    rows, written = [], {}
    for r in table.to_pylist():
        key = r["sample_id"].split("-", 1)[1]
        if key not in written:
            written[key] = out / "png" / f"{key}.png"
            Image.fromarray(np.asarray(r["pixels"], dtype=np.uint8).reshape(28, 28)).save(written[key])
        rows.append({"sample_id": r["sample_id"], "path": str(written[key]), "label": r["label"], "domain": r["domain"]})
    pq.write_table(pa.Table.from_pylist(rows), out / "png_manifest.parquet", row_group_size=ROW_GROUP_ROWS)
    return out / "png_manifest.parquet"


def plain_loop(cfg, png_manifest: Path | None) -> float:
    """Per shard: reset to source, Tent over contiguous batches, predictions taken (argmax)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    adapter = build_adapter(cfg.model.model_dump(), "cpu")
    method = build_method(adapter, cfg.ttt)
    spec = adapter.spec
    if png_manifest is not None:
        paths = pq.read_table(png_manifest, columns=["path"]).column("path").to_pylist()
        bounds = shard_bounds(len(paths), cfg.workers.num_shards or 1)
        for start, end in bounds:
            method.reset()
            loader = DataLoader(PngRows(paths[start:end], spec), batch_size=cfg.ttt.batch_size, num_workers=2)
            for x in loader:
                method.step(normalise(x, spec)).logits.argmax(1)
    else:
        table = pq.read_table(cfg.data.manifest)
        pixels = np.stack(table.column("pixels").to_numpy(zero_copy_only=False)).astype(np.float32)
        x_all = normalise(torch.from_numpy(pixels).view(-1, *spec.shape) / 255.0, spec)
        for start, end in shard_bounds(len(x_all), cfg.workers.num_shards or 1):
            method.reset()
            for i in range(start, end, cfg.ttt.batch_size):
                method.step(x_all[i:min(i + cfg.ttt.batch_size, end)]).logits.argmax(1)
    return time.perf_counter() - t0


def pipeline_run(cfg, workers: int, manifest: str | None = None, warm: bool = False) -> tuple[float, dict]:
    """One pipeline run's wall and summary throughput. `warm`: inside `warm_workers()`, a first
    run starts the pool (not measured) and the measured run starts on its warm workers."""
    update = {"workers": cfg.workers.model_copy(update={"num_workers": workers})}
    if manifest:
        update["data"] = cfg.data.model_copy(update={"manifest": manifest, "limit": None})
    run_cfg = cfg.model_copy(update=update)
    with warm_workers() if warm else contextlib.nullcontext():
        if warm:
            run_job(run_cfg)
        t0 = time.perf_counter()
        run_dir = run_job(run_cfg)
        wall = time.perf_counter() - t0
    return wall, json.loads((run_dir / "summary.json").read_text())["throughput"]


def throughput(args) -> None:
    out = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    cfg = prepare(load_config(ROOT / "configs/mnistc_tent.yaml", [f"output_root={out}"]))
    stream = stream_rows(cfg.data.manifest, args.rows, out)
    # Two shards, pinned: the mnistc configs run one stream since issue 23, and a one-shard run cannot
    # use a second worker (this table compares 1 and 2 workers on the same two shards).
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": str(stream), "limit": None}),
                                 "workers": cfg.workers.model_copy(update={"num_shards": 2})})
    png = write_pngs(stream, out)
    init_ray(num_cpus=2)  # as `pipeline run` starts a local instance
    cells = {
        "plain loop, PNG files, DataLoader(num_workers=2)": lambda: (plain_loop(cfg, png), None),
        "pipeline, PNG files, 1 worker": lambda: pipeline_run(cfg, 1, str(png)),
        "pipeline, PNG files, 2 workers": lambda: pipeline_run(cfg, 2, str(png)),
        "pipeline, PNG files, 1 warm worker": lambda: pipeline_run(cfg, 1, str(png), warm=True),
        "pipeline, PNG files, 2 warm workers": lambda: pipeline_run(cfg, 2, str(png), warm=True),
        "plain loop, inline pixels": lambda: (plain_loop(cfg, None), None),
        "pipeline, inline pixels, 1 worker": lambda: pipeline_run(cfg, 1),
        "pipeline, inline pixels, 2 workers": lambda: pipeline_run(cfg, 2),
        "pipeline, inline pixels, 1 warm worker": lambda: pipeline_run(cfg, 1, warm=True),
        "pipeline, inline pixels, 2 warm workers": lambda: pipeline_run(cfg, 2, warm=True),
    }
    walls: dict[str, list[float]] = {k: [] for k in cells}
    phases: dict[str, list[dict]] = {k: [] for k in cells}
    for rep in range(args.repeats):
        for name in (list(cells) if rep % 2 == 0 else list(reversed(cells))):
            wall, info = cells[name]()
            walls[name].append(wall)
            if info:
                phases[name].append(info)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"\nTent, {args.rows} rows, batch {cfg.ttt.batch_size}, {cfg.workers.num_shards or 1} shards, "
          f"median of {args.repeats} (alternating order; pipeline walls include prepare, Parquet writes, summary)\n")
    print("| configuration | wall s | samples/s | first step after s |")
    print("| --- | --: | --: | --: |")
    for name, wall in med.items():
        first = [p["first_step_s"] for p in phases[name] if p.get("first_step_s") is not None]
        print(f"| {name} | {wall:.2f} | {args.rows / wall:.0f} | {statistics.median(first):.2f} |" if first else
              f"| {name} | {wall:.2f} | {args.rows / wall:.0f} | - |")
    plain = {"PNG files": med["plain loop, PNG files, DataLoader(num_workers=2)"],
             "inline pixels": med["plain loop, inline pixels"]}
    print()
    for data, loop in plain.items():
        for kind in ("worker", "warm worker"):
            one, two = med[f"pipeline, {data}, 1 {kind}"], med[f"pipeline, {data}, 2 {kind}s"]
            print(f"{data}, {kind}s: pipeline (1) / plain loop samples/s {loop / one:.2f}; 2 vs 1: {one / two:.2f}x")
    print("\nbefore the first adapted batch (s from the job's start; the worker's process may predate the job: "
          "Ray keeps idle ones):")
    for name in (n for n in cells if n.startswith("pipeline")):
        p = phases[name][-1]
        steps = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in (p.get("startup") or {}).items())
        print(f"{name}: prepare {p['prepare_s']:.2f}, Ray ready {p['ray_ready_s']:.2f}; worker: {steps}")


# -- growth ------------------------------------------------------------------------------------
GROWTH_CHILD = """
import json, resource, sys, threading, time
import psutil, ray
sys.path.insert(0, sys.argv[1])
from pipeline.config import load_config
from pipeline.job.runner import run_job
ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
peak = {"worker": 0, "worker_uss": 0}
stop = threading.Event()
def watch():
    # RSS counts the object store's shared pages a worker has mapped (they grow towards the store's
    # size as blocks pass through); USS is the worker's private memory, what would leak
    while not stop.is_set():
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any("TTTWorker" in c for c in (p.info["cmdline"] or [])):
                    m = p.memory_full_info()
                    peak["worker"] = max(peak["worker"], m.rss)
                    peak["worker_uss"] = max(peak["worker_uss"], m.uss)
            except psutil.Error:
                pass
        time.sleep(1.0)
threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
run_dir = run_job(load_config(sys.argv[2], sys.argv[3:]))
wall = time.perf_counter() - t0
stop.set()
rows = json.loads((run_dir / "run.json").read_text())["counts"]["rows"]
print("GROWTH", json.dumps({"rows": rows, "wall_s": wall, "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "worker_peak_mb": peak["worker"] / 2**20, "worker_uss_mb": peak["worker_uss"] / 2**20}), flush=True)
"""


def tiled_manifest(cfg, out: Path, n_rows: int) -> Path:
    table = pq.read_table(cfg.data.manifest)
    pixels = np.stack(table.column("pixels").to_numpy(zero_copy_only=False)).astype(np.uint8).reshape(-1, 28, 28)
    np.save(out / "digits.npy", pixels)
    base = len(pixels)
    idx = np.arange(n_rows) % base
    labels = np.asarray(table.column("label").to_numpy())[idx]
    domains = np.asarray(table.column("domain").to_numpy(zero_copy_only=False))[idx]
    manifest = out / f"tiled-{n_rows}.parquet"
    pq.write_table(pa.table({"sample_id": [f"t{i:08d}" for i in range(n_rows)], "path": [str(out / "digits.npy")] * n_rows,
                             "index": idx.astype(np.int64), "label": labels.astype(np.int64), "domain": domains}),
                   manifest, row_group_size=65536)
    return manifest


def growth(args) -> None:
    out = Path(tempfile.mkdtemp(prefix="bench-growth-"))
    cfg = prepare(load_config(ROOT / "configs/mnistc_tent.yaml", [f"output_root={out}"]))
    (out / "child.py").write_text(GROWTH_CHILD)
    print("| rows | wall s | rows/s | driver peak RSS MB | worker peak RSS MB | worker peak USS MB |")
    print("| --: | --: | --: | --: | --: | --: |")
    for n in [int(v) for v in args.rows.split(",")]:
        manifest = tiled_manifest(cfg, out, n)
        proc = subprocess.run([sys.executable, str(out / "child.py"), str(ROOT), str(ROOT / "configs/mnistc_source.yaml"),
                               f"data.manifest={manifest}", f"model.checkpoint={cfg.model.checkpoint}",
                               f"output_root={out / 'runs'}", "workers.progress_interval_s=30"],
                              capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("GROWTH")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:])
            raise SystemExit(f"growth run of {n} rows failed")
        g = json.loads(line[0].split(" ", 1)[1])
        print(f"| {g['rows']:,} | {g['wall_s']:.1f} | {g['rows'] / g['wall_s']:.0f} | {g['driver_peak_mb']:.0f} | "
              f"{g['worker_peak_mb']:.0f} | {g['worker_uss_mb']:.0f} |", flush=True)


# -- work lost to a failure --------------------------------------------------------------------
def kill_at(run_id: str, target_rows: int, box: dict) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and "killed" not in box:
        for name in [n for n in ray.util.list_named_actors() if n.startswith(f"ttt-{run_id}-w0-g1")]:
            try:
                actor = ray.get_actor(name)
                if ray.get(actor.progress.remote(), timeout=5)["rows_done"] >= target_rows:
                    os.kill(ray.get(actor.info.remote(), timeout=5)["pid"], signal.SIGKILL)
                    box["killed"] = target_rows
            except Exception:
                pass
        time.sleep(0.02)


def lost(args) -> None:
    out = Path(tempfile.mkdtemp(prefix="bench-lost-"))
    base = [f"data.limit={args.rows}", f"output_root={out}", "workers.num_shards=1", "ttt.batch_size=50"]
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    reference = None
    rng = random.Random(args.seed)
    print("| checkpoint_every (batches) | killed after rows | went on from row | rows recomputed | results equal undisturbed |")
    print("| --: | --: | --: | --: | --- |")
    for every in [int(v) for v in args.every.split(",")]:
        cfg = load_config(ROOT / "configs/mnistc_tent.yaml", base + [f"workers.checkpoint_every={every}"])
        if reference is None:
            ref_dir = run_job(cfg.model_copy(update={"run_id": "undisturbed"}))
            reference = pd.read_parquet(ref_dir / "results").sort_values("position").drop(columns="run_id")
        run_id = f"killed-{every}"
        box: dict = {}
        target = rng.randrange(args.rows // 4, 3 * args.rows // 4)
        killer = threading.Thread(target=kill_at, args=(run_id, target, box))
        killer.start()
        run_dir = run_job(cfg.model_copy(update={"run_id": run_id}))
        killer.join()
        got = pd.read_parquet(run_dir / "results").sort_values("position").drop(columns="run_id")
        resumes = json.loads((run_dir / "run.json").read_text())["resumes"]
        same = got.reset_index(drop=True).equals(reference.reset_index(drop=True))
        # rows the dead worker had done that the replacement did again (the kill lands at or just past `killed`)
        redone = box["killed"] - resumes[0]["from_row"] if resumes and "killed" in box else None
        print(f"| {every} | {box.get('killed', 'not killed')} | {resumes[0]['from_row'] if resumes else '-'} | "
              f"{redone} | {same} |", flush=True)
    ray.shutdown()


# -- whole commands ----------------------------------------------------------------------------
def command(args) -> None:
    """Each side as the command a user types, timed from outside: `python -m pipeline run` joining a
    running 2-CPU cluster (RAY_ADDRESS; started as README "More than one node" says) against the plain
    loop as its own `python` process. Both pay their interpreter's imports; the pipeline also pays its
    driver's checks, fresh worker actors and the summary."""
    out = Path(tempfile.mkdtemp(prefix="bench-command-"))
    cfg = prepare(load_config(ROOT / "configs/mnistc_tent.yaml", [f"output_root={out}"]))
    stream = stream_rows(cfg.data.manifest, args.rows, out)
    png = write_pngs(stream, out)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_idle_worker_killing_time_threshold_ms": "30000"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    env["RAY_ADDRESS"] = "auto"
    data = {"PNG files": str(png), "inline pixels": str(stream)}
    cells = {}
    for name, manifest in data.items():
        cells[f"plain loop, {name}"] = [sys.executable, __file__, "plain", "--manifest", str(stream)] + (
            ["--png", manifest] if manifest == str(png) else [])
        for w in (1, 2):
            cells[f"pipeline run, {name}, {w} worker(s)"] = [
                sys.executable, "-m", "pipeline", "run", str(ROOT / "configs/mnistc_tent.yaml"),
                "--set", f"data.manifest={manifest}", "--set", "data.limit=null", "--set", f"output_root={out}",
                "--set", f"workers.num_workers={w}"]
    walls: dict[str, list[float]] = {k: [] for k in cells}
    try:
        for rep in range(args.repeats):
            for name in (list(cells) if rep % 2 == 0 else list(reversed(cells))):
                t0 = time.perf_counter()
                subprocess.run(cells[name], cwd=ROOT, env=env, check=True, capture_output=True)
                walls[name].append(time.perf_counter() - t0)
                print(f"{name}: {walls[name][-1]:.2f} s", flush=True)
    finally:
        subprocess.run([ray_bin, "stop"], env=env, capture_output=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"\nTent, {args.rows} rows, whole commands, median of {args.repeats} (alternating order)\n")
    print("| command | wall s | samples/s |\n| --- | --: | --: |")
    for name, wall in med.items():
        print(f"| {name} | {wall:.2f} | {args.rows / wall:.0f} |")
    for name in data:
        one, two = med[f"pipeline run, {name}, 1 worker(s)"], med[f"pipeline run, {name}, 2 worker(s)"]
        print(f"{name}: pipeline (1) / plain loop {med[f'plain loop, {name}'] / one:.2f}; 2 vs 1: {one / two:.2f}x")


def plain(args) -> None:
    """The plain loop as its own command (what `command` and `ceiling` time); `--half 0|1`: one of
    the stream's two shards, as its own one-shard run."""
    cfg = load_config(ROOT / "configs/mnistc_tent.yaml", [f"data.manifest={args.manifest}", "data.limit=null"])
    cfg = cfg.model_copy(update={"model": prepare(cfg).model})
    if args.half is not None:
        start, end = shard_bounds(pq.read_metadata(args.manifest).num_rows, 2)[args.half]
        half = Path(tempfile.mkdtemp(prefix="bench-half-")) / "half.parquet"
        pq.write_table(pq.read_table(args.manifest).slice(start, end - start), half)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": str(half)}),
                                     "workers": cfg.workers.model_copy(update={"num_shards": 1})})
    print(f"loop s {plain_loop(cfg, Path(args.png) if args.png else None):.3f}")


def ceiling(args) -> None:
    """What 2 processes can do on this machine: the plain inline loop over all rows in one process
    against half the rows in each of two processes at once (each its own `plain --half`)."""
    out = Path(tempfile.mkdtemp(prefix="bench-ceiling-"))
    cfg = prepare(load_config(ROOT / "configs/mnistc_tent.yaml", [f"output_root={out}"]))
    stream = stream_rows(cfg.data.manifest, args.rows, out)

    def wall(halves: list[str]) -> float:
        """The slowest process's loop (each prints its own; the processes start together)."""
        procs = [subprocess.Popen([sys.executable, __file__, "plain", "--manifest", str(stream), *h], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True) for h in halves]
        return max(float(p.communicate()[0].split()[-1]) for p in procs)

    for _ in range(args.repeats):
        one, two = wall([[]]), wall([["--half", "0"], ["--half", "1"]])
        print(f"Tent loop, one process, {args.rows} rows: {one:.2f} s; two processes, half each, at once: {two:.2f} s; "
              f"{one / two:.2f}x", flush=True)


def decode(args) -> None:
    """Wall and CPU per row of one decode task (`pipeline.job.inputs.prepare_block`, in this process, no Ray) on
    1,024-row blocks of the stream as inline pixels and as PNG files, with and without
    `data.read_timeout_s` (file rows read under the timeout go through the reader thread)."""
    out = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    cfg = prepare(load_config(ROOT / "configs/mnistc_tent.yaml", [f"output_root={out}"]))
    stream = stream_rows(cfg.data.manifest, args.rows, out)
    png = write_pngs(stream, out)
    blocks = [(lo, min(lo + 1024, args.rows)) for lo in range(1024, args.rows, 1024)]  # block 0 warms the caches
    for name, manifest in (("inline pixels", stream), ("PNG files", png)):
        for timeout in (None, 60.0):
            inputs = InputSpec(manifest=str(manifest), kind="image_classifier", model=cfg.model.model_dump(),
                               num_classes=10, read_timeout_s=timeout)
            prepare_block({"lo": np.array([0]), "hi": np.array([1024])}, inputs=inputs)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for lo, hi in blocks:
                prepare_block({"lo": np.array([lo]), "hi": np.array([hi])}, inputs=inputs)
            n = sum(hi - lo for lo, hi in blocks)
            print(f"{name}, read_timeout_s={timeout}: {(time.perf_counter() - wall0) / n * 1e6:.0f} us wall, "
                  f"{(time.process_time() - cpu0) / n * 1e6:.0f} us CPU per row", flush=True)


BOOT_CHILD = """
import json, sys, time
t = [time.perf_counter()]
import ray
t.append(time.perf_counter())
import torch
t.append(time.perf_counter())
sys.path.insert(0, sys.argv[1])
from ttt import TTTConfig, build_method
from workers.ttt_worker import build_adapter
t.append(time.perf_counter())
torch.set_num_threads(1)
model, ttt = json.loads(sys.argv[2]), TTTConfig.model_validate_json(sys.argv[3])
adapter = build_adapter(model, "cpu")
t.append(time.perf_counter())
method = build_method(adapter, ttt)
t.append(time.perf_counter())
method.step(torch.rand(ttt.batch_size, *adapter.spec.shape))
t.append(time.perf_counter())
print(" ".join(f"{b - a:.3f}" for a, b in zip(t, t[1:])))
"""
BOOT_PARTS = ("import ray", "import torch", "the rest of the worker module (ray.data, pandas, faiss, ...)",
              "load the model", "build the method (first optimiser: torch._dynamo)", "first Tent step (batch 200)")


def boot(args) -> None:
    """Each part of a fresh worker's boot, median over `--repeats` new processes (run one at a time)."""
    cfg = prepare(load_config(ROOT / "configs/mnistc_tent.yaml", []))
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", BOOT_CHILD, str(ROOT), json.dumps(cfg.model.model_dump(mode="json")),
                              cfg.ttt.model_dump_json()], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        runs.append([float(x) for x in out.split()[-len(BOOT_PARTS):]])
    print(f"a fresh worker process's boot, median of {args.repeats} processes (s):")
    for i, part in enumerate(BOOT_PARTS):
        print(f"  {part}: {statistics.median(r[i] for r in runs):.2f}")
    print(f"  after Ray's own import, to the first step: {statistics.median(sum(r[1:]) for r in runs):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--rows", type=int, default=15000)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("growth")
    p.add_argument("--rows", default="15000,150000")
    p = sub.add_parser("lost")
    p.add_argument("--every", default="1000,20,5")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("command")
    p.add_argument("--rows", type=int, default=15000)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("plain")
    p.add_argument("--manifest", required=True)
    p.add_argument("--png")
    p.add_argument("--half", type=int, choices=(0, 1))
    p = sub.add_parser("decode")
    p.add_argument("--rows", type=int, default=15000)
    p = sub.add_parser("boot")
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("ceiling")
    p.add_argument("--rows", type=int, default=15000)
    p.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    {"throughput": throughput, "growth": growth, "lost": lost, "command": command, "plain": plain,
     "ceiling": ceiling, "decode": decode, "boot": boot}[args.what](args)


if __name__ == "__main__":
    main()
