"""Error per corruption domain for several methods on the default MNIST-C stream, run one after
another through the real pipeline in one Ray instance, plus each method's cost relative to
`source` (seconds per 1,000 samples of worker time, from the analysis timings).

    .venv/bin/python bench/tta_table.py --variants source,norm,tent [--shards 1] [--n-test 1000]
        [--reset-each-shift]

A variant is a config in configs/ (`mnistc_<name>.yaml`) or one of VARIANTS below (a config plus
overrides). `--reset-each-shift` resets every method to the source model at each domain change
(the Tent paper's protocol); without it a shard is one continual stream. EATA's Fisher term reads
the clean training split of the stream being run (its train.npz). Prints a markdown table (plus,
per method, the share of samples its filters kept in the loss and SAR's recoveries); `--csv PATH`
also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# High-lr Tent collapses onto few classes; the same run with the guards on shows what they prevent.
GUARDS = ["ttt.guards.diversity_weight=1.0", "ttt.guards.diversity_gain=5.0", "ttt.guards.early_stop_entropy=0.5",
          "ttt.guards.collapse_patience=3", "ttt.guards.grad_clip=1.0"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    f"tent_lr{lr}_{kind}": ("mnistc_tent.yaml", [f"ttt.lr={lr}", *(GUARDS if kind == "guarded" else [])])
    for lr in ("5e-2", "2e-1", "1") for kind in ("unguarded", "guarded")
}
VARIANTS["eta"] = ("mnistc_eata.yaml", ["ttt.eata.fisher_data=null"])  # EATA without the Fisher term
VARIANTS["lame_rbf"] = ("mnistc_lame.yaml", ["ttt.lame.affinity=rbf"])  # the reference code's default affinity
VARIANTS["roid_no_prior"] = ("mnistc_roid.yaml", ["ttt.roid.use_prior_correction=false"])
VARIANTS["roid_no_consistency"] = ("mnistc_roid.yaml", ["ttt.roid.use_consistency=false"])
VARIANTS["rotta_bs64"] = ("mnistc_rotta.yaml", ["ttt.batch_size=64"])  # the RoTTA reference's batch size
VARIANTS["tent_lr1e-2"] = ("mnistc_tent.yaml", ["ttt.lr=1e-2"])
VARIANTS["eata_lr1e-2"] = ("mnistc_eata.yaml", ["ttt.lr=1e-2"])
VARIANTS["eta_lr1e-2"] = ("mnistc_eata.yaml", ["ttt.lr=1e-2", "ttt.eata.fisher_data=null"])
VARIANTS["sar_lr1e-2"] = ("mnistc_sar.yaml", ["ttt.lr=1e-2"])
VARIANTS["deyo_lr1e-2"] = ("mnistc_deyo.yaml", ["ttt.lr=1e-2"])
VARIANTS["roid_lr1e-2"] = ("mnistc_roid.yaml", ["ttt.lr=1e-2"])
VARIANTS["cotta_flips"] = ("mnistc_cotta.yaml", ["ttt.cotta.flips=true"])  # the reference's flips on digits


def run_variant(name: str, common: list[str]) -> Path:
    from pipeline.config import load_config
    from pipeline.job.runner import run_job

    config, extra = VARIANTS.get(name, (f"mnistc_{name}.yaml", []))
    cfg = load_config(Path("configs") / config, common + extra)
    if cfg.ttt.method == "eata" and cfg.ttt.eata.fisher_data is not None:
        cfg.ttt.eata.fisher_data = str(clean_split(cfg))  # the stream being run, whatever its n_test
    return run_job(cfg)


def clean_split(cfg) -> Path:  # noqa: ANN001 (a pipeline RunConfig)
    """The clean training split beside the run's MNIST-C manifest (built here if missing)."""
    from pipeline.embedded.mnistc import ensure_mnistc

    d = cfg.data
    return ensure_mnistc(d.cache_dir, d.corruptions, d.severity, d.n_test).parent / "train.npz"


def filter_summary(analysis: pd.DataFrame, n_rows: int) -> dict[str, float | int | None]:
    """Share of the stream's samples that entered a loss (the methods' filters), SAR's recoveries."""
    out: dict[str, float | int | None] = {"kept_pct": None, "recoveries": None}
    # RoTTA's loss samples are memory items, counted again at every update: not a filter's share
    filtered = "n_loss_samples" in analysis and analysis["n_loss_samples"].notna().any() \
        and not ("memory_size" in analysis and analysis["memory_size"].notna().any())
    if filtered:
        out["kept_pct"] = 100 * analysis["n_loss_samples"].fillna(0).sum() / n_rows
    if "recovered" in analysis and analysis["recovered"].notna().any():
        out["recoveries"] = int(analysis["recovered"].fillna(False).sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="source,norm,tent")
    parser.add_argument("--shards", type=int, default=1, help="1 = one continual stream over all domains")
    parser.add_argument("--n-test", type=int, default=1000, help="digits per domain")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--reset-each-shift", action="store_true",
                        help="reset to the source model at every domain change (Tent's protocol)")
    parser.add_argument("--csv")
    args = parser.parse_args()

    import ray

    out = tempfile.mkdtemp(prefix="bench-tta-")
    common = [f"output_root={out}", f"workers.num_shards={args.shards}", f"data.n_test={args.n_test}",
              "workers.num_cpus=0.5", *(["ttt.reset_on_domain_change=true"] if args.reset_each_shift else []),
              *args.overrides]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = []
    for name in args.variants.split(","):
        run_dir = run_variant(name, common)
        summary = json.loads((run_dir / "summary.json").read_text())
        analysis = pd.read_parquet(run_dir / "analysis")
        per = {d: 100 * v["error"] for d, v in summary["per_domain"].items()}
        worker_s = analysis["timing_total"].sum()
        rows.append({"method": name, **per, "mean": sum(per.values()) / len(per),
                     "s_per_1k": 1000 * worker_s / summary["overall"]["n"],
                     **filter_summary(analysis, summary["overall"]["n"]),
                     "stops": ",".join(f"{k}:{v}" for k, v in analysis["stop_reason"].value_counts().items())})
        print(f"[bench] {name}: mean error {rows[-1]['mean']:.2f}%  ({run_dir})", flush=True)
    ray.shutdown()
    table = pd.DataFrame(rows).set_index("method")
    if "source" in table.index:
        table["cost_vs_source"] = table["s_per_1k"] / table.loc["source", "s_per_1k"]
    if args.csv:
        table.to_csv(args.csv)
    protocol = "reset at each domain shift" if args.reset_each_shift else "continual"
    print(f"\nMNIST-C severity 3, {args.n_test} digits/domain, {args.shards} shard(s), {protocol}, error % per domain\n")
    print(table.round(2).to_markdown())


if __name__ == "__main__":
    main()
