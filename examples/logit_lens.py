"""Read a causal-LM `nn` run's logit lens: what each layer predicts for one query, before and
after test-time training (the notebook view, as a script).

    .venv/bin/python examples/logit_lens.py runs/<run_id> [--sample q-00003]

Prints, per layer, the top token and the probability of the true next token before and after
adaptation, then the full top-k of the last layer. Needs a run with `ttt.nn.logit_lens_top_k > 0`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def lens_table(lens: pd.DataFrame, sample_id: str) -> pd.DataFrame:
    """One row per layer: top-1 token and its probability, and the target's probability, per stage."""
    one = lens[(lens["sample_id"] == sample_id) & (lens["rank"] == 0)]
    table = one.pivot_table(index="layer", columns="stage", values=["token", "prob", "target_prob"],
                            aggfunc="first")
    table.columns = [f"{value} {stage}" for value, stage in table.columns]
    return table[[c for c in ("token before", "prob before", "token after", "prob after",
                              "target_prob before", "target_prob after") if c in table.columns]]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sample", default=None, help="sample_id (default: the query whose target gained most)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "lens").is_dir():
        print(f"error: {args.run_dir} has no lens/ (run with --set ttt.nn.logit_lens_top_k=5)", file=sys.stderr)
        return 2
    lens = pd.read_parquet(args.run_dir / "lens")
    sample = args.sample
    if sample is None:
        last = lens[(lens["layer"] == lens["layer"].max()) & (lens["rank"] == 0)]
        gain = last.pivot_table(index="sample_id", columns="stage", values="target_prob")
        sample = (gain["after"] - gain["before"]).idxmax()
    if sample not in set(lens["sample_id"]):
        print(f"error: no lens rows for sample_id {sample!r}", file=sys.stderr)
        return 2
    pd.set_option("display.width", 160)
    print(f"sample {sample}: per layer, top-1 token and the true next token's probability\n")
    print(lens_table(lens, sample).to_string(float_format=lambda v: f"{v:.4f}"))
    last = lens[(lens["sample_id"] == sample) & (lens["layer"] == lens["layer"].max())]
    print("\nlast layer, top-k:")
    print(last.pivot_table(index="rank", columns="stage", values=["token", "prob"], aggfunc="first")
          .to_string(float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
