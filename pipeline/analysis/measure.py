"""Measuring one run for the performance analyzer (pipeline/analysis/bench_suite.py): wall time
around `run_job`, peak resident memory of the driver and its Ray worker processes, batch
latencies from the analysis Parquet, and least-squares fits of cost against stream length.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import RunConfig

_RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


class RssSampler:
    """Peak of (driver RSS + RSS of its descendant `ray::` worker processes), sampled in a thread."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def current_bytes() -> int:
        import psutil

        driver = psutil.Process(os.getpid())
        total = driver.memory_info().rss
        for proc in driver.children(recursive=True):
            try:
                cmd = proc.cmdline()
                if cmd and cmd[0].startswith("ray::") and cmd[0] not in _RAY_AGENTS:
                    total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # workers come and go during a run
        return total

    def _loop(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self.current_bytes())
            if self._stop.wait(self.interval_s):
                break


@dataclass
class Measurement:
    """One timed run."""

    variant: str
    method: str
    batch_size: int
    workers: int
    rows: int
    repeat: int
    wall_s: float
    samples_per_s: float
    p50_batch_latency_s: float | None
    p95_batch_latency_s: float | None
    peak_rss_mb: float
    cache_hit_rate: float | None
    evictions: int | None
    error: float | None
    error_rows: int
    run_dir: str


def _cache_stats(summary: dict[str, Any]) -> tuple[float | None, int | None]:
    cache = summary.get("cache")
    if not cache:
        return None, None
    lookups = cache.get("hits", 0) + cache.get("misses", 0)
    rate = cache.get("hit_rate", cache.get("hits", 0) / lookups if lookups else None)
    return rate, cache.get("evictions")


def measure(cfg: RunConfig, variant: str, repeat: int) -> Measurement:
    """Run the job once (a fresh run id, so nothing resumes) and read its outputs back."""
    import pandas as pd

    from pipeline.job.runner import run_job

    cfg = cfg.model_copy(update={"run_id": None})
    with RssSampler() as rss:
        t0 = time.perf_counter()
        run_dir = run_job(cfg)
        wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    latency = pd.read_parquet(run_dir / "analysis", columns=["timing_total"])["timing_total"].dropna()
    rows = int(summary["overall"]["n"])
    hit_rate, evictions = _cache_stats(summary)
    return Measurement(
        variant=variant, method=cfg.ttt.method, batch_size=cfg.ttt.batch_size,
        workers=int(cfg.workers.num_workers or 0), rows=rows, repeat=repeat, wall_s=wall,
        samples_per_s=rows / wall, peak_rss_mb=rss.peak_bytes / 2**20,
        p50_batch_latency_s=float(latency.quantile(0.5)) if len(latency) else None,
        p95_batch_latency_s=float(latency.quantile(0.95)) if len(latency) else None,
        cache_hit_rate=hit_rate, evictions=evictions, error=summary["overall"]["error"],
        error_rows=int(summary["overall"]["errors_rows"]), run_dir=str(run_dir),
    )


def median_of(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """Medians per (variant, batch_size, workers), then overhead against `source` at the same cell."""
    groups: dict[tuple[str, int, int], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.variant, m.batch_size, m.workers), []).append(m)
    rows = []
    for (variant, batch, workers), ms in groups.items():
        row = {"method": ms[0].method, "variant": variant, "batch_size": batch, "workers": workers,
               "repeats": len(ms), "overhead_pct": None}
        for key in ("samples_per_s", "p50_batch_latency_s", "p95_batch_latency_s", "peak_rss_mb",
                    "cache_hit_rate", "evictions", "error", "error_rows", "rows", "wall_s"):
            row[key] = median_of([getattr(m, key) for m in ms])
        rows.append(row)
    source = {(r["batch_size"], r["workers"]): r["samples_per_s"] for r in rows if r["variant"] == "source"}
    for row in rows:
        base = source.get((row["batch_size"], row["workers"]))
        if base is not None and row["samples_per_s"]:
            row["overhead_pct"] = 100.0 * (base / row["samples_per_s"] - 1.0)
    return rows


# --- cost against stream length -------------------------------------------------------------

# name -> (coefficient names, design-matrix columns as functions of n)
SCALING_MODELS: dict[str, tuple[tuple[str, ...], Any]] = {
    "linear": (("a",), lambda n: [n]),
    "n_log_n": (("a",), lambda n: [n * np.log(n)]),
    "quadratic": (("a",), lambda n: [n**2]),
    "constant_linear": (("c", "a"), lambda n: [np.ones_like(n), n]),
}


def fit_scaling(ns: list[float], ts: list[float]) -> dict[str, Any]:
    """Least-squares fits of t(n) for each model in SCALING_MODELS; best = lowest AIC.

    AIC = m log(RSS / m) + 2k for m points and k coefficients, so an extra coefficient must buy a
    real drop in residual. RSS is floored at a tiny fraction of sum(t^2): an exact fit would give
    log(0), and two exact fits should then differ by their parameter counts only.
    """
    n = np.asarray(ns, dtype=float)
    t = np.asarray(ts, dtype=float)
    if len(n) < 2 or np.any(n <= 0):
        raise ValueError("fit_scaling needs at least two stream lengths, all positive")
    floor = 1e-12 * float(np.sum(t**2)) + 1e-300
    models = {}
    for name, (coef_names, columns) in SCALING_MODELS.items():
        design = np.column_stack(columns(n))
        coef, *_ = np.linalg.lstsq(design, t, rcond=None)
        rss = max(float(np.sum((design @ coef - t) ** 2)), floor)
        models[name] = {"coefficients": dict(zip(coef_names, map(float, coef))), "rss": rss,
                        "aic": len(n) * math.log(rss / len(n)) + 2 * len(coef_names)}
    best = min(models, key=lambda k: models[k]["aic"])
    return {"best": best, "best_coefficients": models[best]["coefficients"], "models": models}
