"""Compare runs as a notebook would: find them by what they were, build the method x domain
error table from their results Parquet, and plot it.

    .venv/bin/python examples/compare_runs.py [--root runs] [--experiment mnistc] [--out compare.png]

Each block below is one notebook cell.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.runs import query_runs  # noqa: E402


def method_domain_table(root: str, experiment: str | None):
    runs = query_runs(root, experiment=experiment, status="finished")
    if len(runs) == 0:
        raise SystemExit(f"no finished runs under {root!r} (experiment={experiment!r})")
    # one pyarrow scan over every selected run's results
    results = runs.results(columns=["run_id", "domain", "correct"])
    scored = results[results["correct"].notna()]
    methods = {r["run_id"]: f"{r['method']}:{r['run_id'][-6:]}" for r in runs}
    table = (1.0 - scored.assign(correct=scored["correct"].astype(bool))
             .groupby(["run_id", "domain"], sort=False)["correct"].mean()).unstack("domain") * 100
    table.index = [methods[i] for i in table.index]
    table["mean"] = table.mean(axis=1)
    return runs, table


def plot(table, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * table.shape[1]), 1 + 0.5 * len(table)))
    im = ax.imshow(table.to_numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=60, ha="right")
    ax.set_yticks(range(len(table)), table.index)
    fig.colorbar(im, ax=ax, label="error %")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="runs")
    parser.add_argument("--experiment")
    parser.add_argument("--out", default="compare.png")
    args = parser.parse_args()

    runs, table = method_domain_table(args.root, args.experiment)
    print(runs.to_frame()[["run_id", "method", "status", "n", "error"]].to_string(index=False))
    print()
    print(table.round(2).to_string())
    plot(table, Path(args.out))
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
