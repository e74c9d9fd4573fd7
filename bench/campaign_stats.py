"""A synthetic campaign on fixed cells (no jobs): the table, paired tests and win/tie/loss as
`report --campaign` draws them, so the statistics can be compared before/after on the same cells.

Cells: source and tent (lr tuned on validation: 0.001 wins under continual, 0.01 under
reset_each_shift) x 2 settings x 2 seeds, 2 domains of 150 samples. source is deterministic (the
same errors for every seed), tent varies by seed. Usage: python bench/campaign_stats.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_sweep import write_run  # noqa: E402  (a finished run directory of a cell)

from pipeline.campaigns.campaign import Campaign  # noqa: E402
from pipeline.campaigns.spec import expand, parse_sweep  # noqa: E402
from pipeline.campaigns.sweep import write_campaign  # noqa: E402


def main(out: Path) -> None:
    raw = {"name": "stats", "config": {"output_root": str(out), "ttt": {"lr": 1e-4}},
           "axes": {"method": {"source": {"ttt.method": "source"}, "tent": {"ttt.method": "tent"}},
                    "setting": {"continual": {"ttt.reset_on_domain_change": False},
                                "reset_each_shift": {"ttt.reset_on_domain_change": True}},
                    "seed": {"fields": ["ttt.seed"], "values": [0, 1]}},
           "select": {"tent": {"ttt.lr": [0.001, 0.01]}}, "select_over": ["seed"],
           "validation": {"data.corruptions": ["spatter", "saturate"]}}
    spec = parse_sweep(raw)
    cells = expand(spec)
    write_campaign(spec, cells)
    val = {("continual", "lr0.001"): 0.20, ("continual", "lr0.01"): 0.30,
           ("reset_each_shift", "lr0.001"): 0.30, ("reset_each_shift", "lr0.01"): 0.20}
    for c in cells:
        setting = c.labels["setting"]
        if c.hp_name is None:
            error = 0.653  # deterministic: every seed the same
        elif c.role == "validation":
            error = val.get((setting, c.hp_name), 0.35)
        else:
            error = {"lr0.001": 0.60, "lr0.01": 0.62, "lr0.0001": 0.64}[c.hp_name] + 0.04 * c.config.ttt.seed
        write_run(out, c, error, n=150)
    path = Campaign(out, "stats").report(out / "report")
    print(path.read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
