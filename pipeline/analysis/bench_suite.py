"""`python -m pipeline bench-suite`: the performance analyzer (issue 6).

Runs the same stream through named ablations (a config plus overrides) across batch sizes and
worker counts, through the real job (`run_job`) in one Ray instance, and fits how wall time grows
with stream length. Writes into `--out` (default `runs/bench-suite/<timestamp>`):

- `performance_summary.csv`: one row per (variant, batch_size, workers), medians over repeats
  after discarded warm-up runs;
- `scaling_fit.json`: wall time vs stream length for one variant, least-squares fits of
  linear / n log n / quadratic / constant + linear models, the best one chosen by AIC;
- `measurements.csv`: every timed run (the medians' inputs), `suite.json`: arguments, skipped
  variants and the cluster's resources.

What the metrics mean (so numbers from different machines compare):
- `samples_per_s`: manifest rows / wall seconds around `run_job`, so it includes preparing the
  config, starting the worker actors and writing Parquet: what a user waits for.
- `p50/p95_batch_latency_s`: percentiles of the analysis `timing_total` column, one value per
  adapted batch (not normalised per sample; a shard's last batch may be smaller).
- `overhead_pct`: extra wall time per sample against `source` at the same batch size and workers,
  `100 * (source samples/s / variant samples/s - 1)`; empty when `source` was not run.
- `peak_rss_mb`: the largest sum of resident memory over the driver process and its descendant
  Ray worker processes (`ray::...`: actors, Ray Data tasks and idle pooled workers; raylet, GCS and
  the per-node agents excluded; shared library pages count once per process), sampled
  with psutil every 50 ms while the run lasts. Against a remote cluster (`RAY_ADDRESS`) the
  workers are not descendants, so only the driver counts.
- `cache_hit_rate`, `evictions`: from summary.json["cache"] when the run used the adapter cache.
- `error`: classification error rate over scored rows; `error_rows`: rows that failed.
"""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.analysis.measure import Measurement, aggregate, fit_scaling, measure, median_of
from pipeline.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

CSV_COLUMNS = ["method", "variant", "batch_size", "workers", "samples_per_s", "p50_batch_latency_s",
               "p95_batch_latency_s", "overhead_pct", "peak_rss_mb", "cache_hit_rate", "evictions", "error",
               "error_rows", "rows", "wall_s", "repeats"]


@dataclass(frozen=True)
class Variant:
    """An ablation: a config file (relative to configs/) plus overrides."""

    config: str
    overrides: tuple[str, ...] = ()
    about: str = ""


VARIANTS: dict[str, Variant] = {
    "source": Variant("mnistc_source.yaml", (), "no adaptation"),
    "ttt_no_cache": Variant("mnistc_nn.yaml", (), "retrieval TTT, no adapter cache"),
    "ttt_cache": Variant("mnistc_nn_cache.yaml", (), "retrieval TTT with the adapter cache"),
    "retrieval_only": Variant("mnistc_nn.yaml", ("ttt.steps=0",), "retrieval and prediction, no fine-tuning"),
}


def resolve_variant(name: str) -> Variant:
    """A named ablation, else `configs/mnistc_<name>.yaml` as is (the tta_table convention)."""
    return VARIANTS.get(name, Variant(f"mnistc_{name}.yaml"))


def variant_config(variant: Variant, overrides: list[str], configs_dir: Path = CONFIGS) -> RunConfig | str:
    """The variant's config, or the reason it must be skipped (missing config or method).

    Skipping is the expected state while a method is being written, so it is a value, not an error.
    (TTTConfig already accepts `nn`, so a config for it loads before the method is registered.)
    """
    from ttt.methods import METHODS

    path = configs_dir / variant.config
    if not path.is_file():
        return f"config {path} does not exist"
    cfg = load_config(path, [*variant.overrides, *overrides])  # a bad --set is the user's error: raise
    if cfg.ttt.method not in METHODS:
        return f"method {cfg.ttt.method!r} is not implemented yet (ttt.methods.METHODS)"
    return cfg


# Per-node helper daemons that also retitle themselves `ray::...`; they are not workers.
# --- the suite ------------------------------------------------------------------------------

@dataclass
class SuiteSpec:
    variants: list[str]
    batch_sizes: list[int]
    workers: list[int]
    rows: int | None
    repeats: int = 3
    warmup: int = 1
    overrides: list[str] = field(default_factory=list)
    scaling_variant: str | None = "ttt_no_cache"  # None = no scaling runs
    scaling_rows: list[int] = field(default_factory=list)


def _cell_config(base: RunConfig, batch_size: int, workers: int, rows: int | None) -> RunConfig:
    data = base.data.model_copy(update={"limit": rows}) if rows is not None else base.data
    return base.model_copy(update={
        "data": data,
        "ttt": base.ttt.model_copy(update={"batch_size": batch_size}),
        "workers": base.workers.model_copy(update={"num_workers": workers}),
    })


def _timed(cfg: RunConfig, variant: str, spec: SuiteSpec,
           done: dict[tuple[str, int, int, int | None], list[Measurement]]) -> list[Measurement]:
    """Warm-up runs (discarded), then `spec.repeats` timed runs; a cell already timed is reused
    (the scaling runs at the grid's stream length are the grid's first cell)."""
    key = (variant, cfg.ttt.batch_size, int(cfg.workers.num_workers or 0), cfg.data.limit)
    if key not in done:
        for _ in range(spec.warmup):
            measure(cfg, variant, repeat=-1)  # first-run costs: page cache, imports, model build
        done[key] = [measure(cfg, variant, repeat=i) for i in range(spec.repeats)]
    return done[key]


def run_suite(spec: SuiteSpec, out: Path) -> dict[str, Any]:
    """Run every (variant, batch size, workers) cell and the scaling runs; write the outputs.

    Ray must be initialised by the caller (one instance for the whole suite). Every run shards
    the stream into max(workers) shards, so all worker counts process identical shards and only
    the parallelism differs (a `--set workers.num_shards=...` still wins).
    """
    from pipeline.job.checks import prepare

    out.mkdir(parents=True, exist_ok=True)
    common = [f"output_root={out / 'runs'}", f"workers.num_shards={max(spec.workers)}", *spec.overrides]
    skipped: dict[str, str] = {}
    configs: dict[str, RunConfig] = {}
    for name in dict.fromkeys([*spec.variants, *([spec.scaling_variant] if spec.scaling_variant else [])]):
        got = variant_config(resolve_variant(name), common)
        if isinstance(got, str):
            skipped[name] = got
            print(f"[bench-suite] skipping variant {name}: {got}", flush=True)
        else:
            configs[name] = prepare(got)  # build data / model once, before any timing

    done: dict[tuple[str, int, int, int | None], list[Measurement]] = {}
    for name in spec.variants:
        if name not in configs:
            continue
        for batch in spec.batch_sizes:
            for workers in spec.workers:
                taken = _timed(_cell_config(configs[name], batch, workers, spec.rows), name, spec, done)
                print(f"[bench-suite] {name} batch={batch} workers={workers}: "
                      f"{median_of([m.samples_per_s for m in taken]):.0f} samples/s", flush=True)
    measurements = [m for ms in done.values() for m in ms]
    summary_rows = aggregate(measurements)

    scaling = None
    if spec.scaling_variant and spec.scaling_variant in configs and len(spec.scaling_rows) >= 2:
        batch, workers = spec.batch_sizes[0], spec.workers[0]
        points = []
        for n in spec.scaling_rows:
            taken = _timed(_cell_config(configs[spec.scaling_variant], batch, workers, n),
                           spec.scaling_variant, spec, done)
            points.append({"rows": min(m.rows for m in taken), "wall_s": median_of([m.wall_s for m in taken])})
        scaling = {"variant": spec.scaling_variant, "batch_size": batch, "workers": workers,
                   "repeats": spec.repeats, "points": points,
                   **fit_scaling([p["rows"] for p in points], [p["wall_s"] for p in points])}

    measurements = [m for ms in done.values() for m in ms]  # with the scaling runs
    write_outputs(out, summary_rows, measurements, scaling, skipped, spec)
    return {"rows": summary_rows, "scaling": scaling, "skipped": skipped, "out": out}


def write_outputs(out: Path, rows: list[dict[str, Any]], measurements: list[Measurement],
                  scaling: dict[str, Any] | None, skipped: dict[str, str], spec: SuiteSpec) -> None:
    import ray

    with open(out / "performance_summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in CSV_COLUMNS} for r in rows)
    with open(out / "measurements.csv", "w", newline="") as fh:
        names = list(Measurement.__dataclass_fields__)
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows(asdict(m) for m in measurements)
    (out / "scaling_fit.json").write_text(json.dumps(scaling, indent=2))
    resources = {k: v for k, v in ray.cluster_resources().items() if "node:" not in k} if ray.is_initialized() else {}
    (out / "suite.json").write_text(json.dumps({"spec": asdict(spec), "skipped": skipped,
                                                "cluster_resources": resources}, indent=2, default=str))


def format_tables(result: dict[str, Any]) -> str:
    import pandas as pd

    lines = []
    if result["rows"]:
        table = pd.DataFrame(result["rows"])[CSV_COLUMNS].drop(columns=["rows", "wall_s"])
        lines += ["performance summary (medians over repeats)", table.round(4).to_string(index=False)]
    else:
        lines.append("performance summary: no variant ran")
    for name, why in result["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    scaling = result["scaling"]
    if scaling:
        lines += ["", f"wall time vs stream length: {scaling['variant']}, batch {scaling['batch_size']}, "
                      f"{scaling['workers']} worker(s), median of {scaling['repeats']}",
                  "  ".join(f"n={p['rows']}: {p['wall_s']:.2f}s" for p in scaling["points"]),
                  f"{'model':<16}{'coefficients':<40}{'rss':>12}{'aic':>10}"]
        for name, m in scaling["models"].items():
            coefs = ", ".join(f"{k}={v:.4g}" for k, v in m["coefficients"].items())
            mark = "  <- best" if name == scaling["best"] else ""
            lines.append(f"{name:<16}{coefs:<40}{m['rss']:>12.4g}{m['aic']:>10.2f}{mark}")
    lines.append(f"\nwritten to {result['out']}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> tuple[SuiteSpec, Path]:
    parser = argparse.ArgumentParser(prog="python -m pipeline bench-suite",
                                     description="Ablations x batch sizes x workers through the real pipeline.")
    named = "; ".join(f"{k}: {v.about}" for k, v in VARIANTS.items())
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list ({named}); any other name runs configs/mnistc_<name>.yaml")
    parser.add_argument("--batch-sizes", default="200", help="comma list, e.g. 50,200")
    parser.add_argument("--workers", default="1", help="comma list of worker counts, e.g. 1,2")
    parser.add_argument("--rows", type=int, default=2000, help="stream length (data.limit) of the grid runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs before each cell's repeats")
    parser.add_argument("--scaling-variant", default="ttt_no_cache", help="variant timed against stream length")
    parser.add_argument("--scaling-rows", default="500,1000,2000,4000",
                        help="stream lengths for the scaling fit; empty = no scaling runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant (repeatable)")
    parser.add_argument("--out", help="output folder (default runs/bench-suite/<UTC timestamp>)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    spec = SuiteSpec(variants=[v for v in args.variants.split(",") if v], batch_sizes=_ints(args.batch_sizes),
                     workers=_ints(args.workers), rows=args.rows, repeats=args.repeats, warmup=args.warmup,
                     overrides=args.overrides, scaling_variant=args.scaling_variant or None,
                     scaling_rows=_ints(args.scaling_rows))
    if not spec.batch_sizes or not spec.workers:
        parser.error("--batch-sizes and --workers need at least one value")
    if len(spec.scaling_rows) == 1:
        parser.error("--scaling-rows needs at least two stream lengths to fit (or none)")
    out = Path(args.out or Path("runs") / "bench-suite" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S"))
    return spec, out


def main(argv: list[str]) -> int:
    spec, out = parse_args(argv)
    import ray

    from pipeline.job.ray_start import init_ray

    started_ray = not ray.is_initialized()
    init_ray()
    try:
        result = run_suite(spec, out)
    finally:
        if started_ray:
            ray.shutdown()
    print(format_tables(result), flush=True)
    return 0
