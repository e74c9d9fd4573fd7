"""Compare runs as a notebook would: find them by what they were, build the method x domain
error table (with n and a 95% interval per cell) from their results Parquet, and plot it; or
read a campaign's table (mean over seeds with 95% intervals, paired tests, selection).

    .venv/bin/python examples/compare_runs.py [--root runs] [--experiment mnistc] [--out compare.png]
    .venv/bin/python examples/compare_runs.py --campaign mnistc-tta

Each block below is one notebook cell.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.analysis.plots import heatmap
from pipeline.analysis.report import comparison_warnings, error_cell_texts, error_table, wide
from pipeline.analysis.runs import query_runs, run_labels
from pipeline.campaigns.campaign import Campaign


def method_domain_table(root: str, experiment: str | None):
    runs = query_runs(root, experiment=experiment, status="finished")
    if len(runs) == 0:
        raise SystemExit(f"no finished runs under {root!r} (experiment={experiment!r})")
    # labels name what differs between the runs (method, setting, seed, lr, ...), not run-id tails
    labels = run_labels(runs)
    for warning in comparison_warnings(list(runs), labels):  # different manifest, model or batch size
        print(f"warning: {warning}", file=sys.stderr)
    # one pyarrow scan over every selected run's results
    results = runs.results(columns=["run_id", "domain", "correct", "error"])
    errors = error_table(results, runs, labels)  # per (run, domain): n, scored, wrong, error, ci_low, ci_high
    return runs, errors, error_cell_texts(errors, labels)


def plot(errors, out: Path) -> None:
    labels = list(dict.fromkeys(errors["label"]))
    heatmap(wide(errors, "error", labels), "error per domain (%), 95% interval, n", True, out,
             texts=error_cell_texts(errors, labels, sep="\n"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="runs")
    parser.add_argument("--experiment")
    parser.add_argument("--campaign", help="print a campaign's table instead")
    parser.add_argument("--out", default="compare.png")
    args = parser.parse_args()

    if args.campaign:
        campaign = Campaign.of(query_runs(args.root, tag=args.campaign), args.campaign)
        table = campaign.table()
        print(table[table["domain"] == "mean"].drop(columns=["seeds"]).to_string(index=False))
        print()
        print(campaign.selection().to_string(index=False))
        print()
        print(campaign.pairs().to_string(index=False))
        return
    runs, errors, texts = method_domain_table(args.root, args.experiment)
    print(runs.to_frame()[["run_id", "method", "status", "n", "error"]].to_string(index=False))
    print()
    print(texts.to_string())
    plot(errors, Path(args.out))
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
