"""Retrieval TTT (`nn`) against `source` and `tent`, and `nn` with the shared adapter cache at
several thresholds, run one after another through the real pipeline in one Ray instance on the
default MNIST-C stream (a subset: --n-test digits per domain).

    .venv/bin/python bench/nn_cache.py [--n-test 100] [--thresholds 0.95,0.98] [--shards 2]

Prints two markdown tables: error % per domain (domains as rows, variants as columns) and, per
variant, mean error, wall time, cache hit rate, hits, misses and evictions. With the cache, hits
depend on which worker offers an adapter first, so cached runs with several shards vary slightly
from run to run.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def variants(thresholds: list[float]) -> dict[str, tuple[str, list[str]]]:
    out = {"source": ("mnistc_source.yaml", []), "tent": ("mnistc_tent.yaml", []), "nn": ("mnistc_nn.yaml", [])}
    for t in thresholds:
        out[f"nn_cache@{t:g}"] = ("mnistc_nn_cache.yaml", [f"ttt.nn.cache_threshold={t}"])
    return out


def run_variant(config: str, overrides: list[str]) -> Path:
    from pipeline.config import load_config
    from pipeline.job.runner import run_job

    return run_job(load_config(Path("configs") / config, overrides))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-test", type=int, default=100, help="digits per domain")
    parser.add_argument("--thresholds", default="0.95,0.98", help="cache cosine thresholds to compare")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import ray

    out = tempfile.mkdtemp(prefix="bench-nn-")
    common = [f"output_root={out}", f"workers.num_shards={args.shards}", f"data.n_test={args.n_test}",
              "workers.num_cpus=0.5", *args.overrides]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    errors: dict[str, dict[str, float]] = {}
    costs = []
    for name, (config, extra) in variants([float(t) for t in args.thresholds.split(",")]).items():
        summary = json.loads((run_variant(config, common + extra) / "summary.json").read_text())
        errors[name] = {d: 100 * v["error"] for d, v in summary["per_domain"].items()}
        cache = summary["cache"] or {}
        costs.append({"variant": name, "mean error %": sum(errors[name].values()) / len(errors[name]),
                      "wall s": summary["throughput"]["wall_s"],
                      "hit rate": cache.get("hit_rate"), "hits": cache.get("hits"),
                      "misses": cache.get("misses"), "evictions": cache.get("evictions")})
    table = pd.DataFrame(errors)
    table.loc["mean"] = table.mean()
    print(f"\nerror % per domain, MNIST-C severity 3, {args.n_test} digits per domain, {args.shards} shards\n")
    print(table.to_markdown(floatfmt=".1f"))
    print()
    costs_table = pd.DataFrame(costs)
    costs_table = costs_table.astype(object).where(costs_table.notna(), None)  # tabulate shows None as "-"
    print(costs_table.to_markdown(index=False, floatfmt=("", ".1f", ".1f", ".3f", ".0f", ".0f", ".0f"), missingval="-"))


if __name__ == "__main__":
    main()
