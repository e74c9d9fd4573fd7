"""summary.json's calibration, cost and protocol sections, read part by part from a run's
`results/` and `analysis/` (the few columns each needs):

- `overall` / `per_domain[d]`: `ece` (15 equal-width bins), `nll`, `brier` (ttt/calibration.py),
  from `probs` where a run saved full probabilities, else from `label_prob` / `brier` per row,
  else ECE alone from `confidence` (older runs).
- `cost`: adaptation seconds per sample (the method's `timing_fine_tuning` summed over the
  analysis, over the rows it covers), total worker seconds per sample (`timing_total`),
  forward / backward passes per sample, and each worker's peak memory (MiB: RSS of the process,
  and peak CUDA memory allocated when the worker used a GPU).
- `protocol`: the share of rows adapted on (online protocol) and the periodic resets (reset_every).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ttt.calibration import Accumulator

CALIBRATION_COLUMNS = ("domain", "correct", "confidence", "label", "label_prob", "brier", "probs", "adapted")
COST_COLUMNS = ("worker", "sample_ids", "timing_fine_tuning", "timing_total", "forward_passes", "backward_passes",
                "peak_rss_mb", "peak_gpu_mb", "periodic_reset")


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def calibration(run_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(overall calibration, per-domain calibration, adapted counts)."""
    overall, per_domain = Accumulator(), {}
    adapted = [0, 0]  # rows with `adapted` known, of which adapted on
    for part in _parts(run_dir / "results"):
        f = pq.ParquetFile(part)
        cols = [c for c in CALIBRATION_COLUMNS if c in f.schema_arrow.names]
        if "confidence" not in cols:
            continue
        for batch in f.iter_batches(columns=cols):
            df = batch.to_pandas()
            if "adapted" in df:
                known = df["adapted"].dropna()
                adapted[0] += len(known)
                adapted[1] += int(known.astype(bool).sum())
            rated = df[df["correct"].notna() & df["confidence"].notna()]
            overall.add_frame(rated)
            for domain, group in rated.groupby("domain", sort=False):
                per_domain.setdefault(str(domain), Accumulator()).add_frame(group)
    return overall.result(), {d: a.result() for d, a in per_domain.items()}, \
        {"rows_known": adapted[0], "rows_adapted": adapted[1]}


def costs(run_dir: Path) -> dict[str, Any]:
    n = 0
    sums = {"timing_fine_tuning": 0.0, "timing_total": 0.0, "forward_passes": 0.0, "backward_passes": 0.0}
    seen = {k: False for k in sums}
    peaks: dict[str, dict[str, float | None]] = {}
    resets = 0
    for part in _parts(run_dir / "analysis"):
        f = pq.ParquetFile(part)
        cols = [c for c in COST_COLUMNS if c in f.schema_arrow.names]
        df = f.read(columns=cols).to_pandas()
        if df.empty:
            continue
        rows = df["sample_ids"].map(len) if "sample_ids" in df else 1
        n += int(rows.sum())
        for key in sums:
            if key in df and df[key].notna().any():
                seen[key] = True
                weight = rows if key.endswith("passes") else 1  # passes are per sample of their batch
                sums[key] += float((df[key].fillna(0.0) * weight).sum())
        if "periodic_reset" in df:
            resets += int(df["periodic_reset"].fillna(False).astype(bool).sum())
        for worker, group in df.groupby("worker", sort=True) if "worker" in df else []:
            peak = peaks.setdefault(str(worker), {"rss_mb": None, "gpu_mb": None})
            for key, col in (("rss_mb", "peak_rss_mb"), ("gpu_mb", "peak_gpu_mb")):
                if col in group and group[col].notna().any():
                    peak[key] = max(peak[key] or 0.0, float(group[col].max()))
    per_sample = (lambda key: sums[key] / n if n and seen[key] else None)  # noqa: E731
    return {"samples": n, "adapt_s_per_sample": per_sample("timing_fine_tuning"),
            "worker_s_per_sample": per_sample("timing_total"), "worker_s": sums["timing_total"],
            "forward_passes_per_sample": per_sample("forward_passes"),
            "backward_passes_per_sample": per_sample("backward_passes"),
            "peak_memory_mb": peaks, "periodic_resets": resets}


def add_metrics(run_dir: Path, summary: dict[str, Any], stream_protocol: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill calibration into `summary`'s overall / per-domain entries and add `cost` and `protocol`:
    the run's stream protocol (`stream_protocol`, run.json's) with what the rows measured of it, in
    one dict, so neither half replaces the other (a summary once lost the measured half)."""
    overall, per_domain, adapted = calibration(run_dir)
    summary["overall"].update(overall)
    for domain, values in per_domain.items():
        summary["per_domain"].setdefault(domain, {"n": 0, "error": None}).update(values)
    cost = costs(run_dir)
    summary["cost"] = {k: v for k, v in cost.items() if k != "periodic_resets"}
    summary["protocol"] = {
        **(stream_protocol or {}),
        "adapted_fraction": adapted["rows_adapted"] / adapted["rows_known"] if adapted["rows_known"] else None,
        "rows_not_adapted": adapted["rows_known"] - adapted["rows_adapted"], "periodic_resets": cost["periodic_resets"]}
    return summary
