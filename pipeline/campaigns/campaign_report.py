"""A campaign's report: table.csv, pairs.csv, selection.csv, wins.csv, table.png and report.md.

Every table states what `mean` is: the mean over domains (each domain weighs the same) of each
seed's error, then the mean over seeds; the same definition as `runs compare` and a run's report.
A cell's text carries its own grid point, so a method tuned per setting shows each setting's choice.
"""
from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.analysis.plots import heatmap, md_table
from pipeline.analysis.stats import format_p

MEAN_DEFINITION = ("`mean` = the mean over domains (each domain weighs the same) of a seed's error, then "
                   "the mean over seeds")
INTERVAL = ("95% interval from a bootstrap that resamples seeds, then samples within each seed and "
            "domain (it accounts for both; bounded to [0, 100])")


def write_report(campaign: Any, out: Path, baseline: str | None = None) -> Path:
    """`campaign`: a pipeline.campaigns.campaign.Campaign (its table, pairs, selection, wins, warnings)."""
    out.mkdir(parents=True, exist_ok=True)
    table, pairs, selection = campaign.table(), campaign.pairs(), campaign.selection()
    wins = campaign.wins(baseline)
    table.to_csv(out / "table.csv", index=False)
    pairs.to_csv(out / "pairs.csv", index=False)
    selection.to_csv(out / "selection.csv", index=False)
    wins.to_csv(out / "wins.csv", index=False)
    warnings = campaign.warnings()
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    cells = campaign.cells
    missing = [c["name"] for c in cells if not _finished(campaign.root / c["run_id"])]
    md = [f"# Campaign {campaign.name}", "",
          f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from {len(cells)} cells "
          f"({sum(c['role'] == 'validation' for c in cells)} on the validation stream).", ""]
    if missing:
        md += [f"**Note:** {len(missing)} cell(s) not finished: {', '.join(missing[:8])}"
               f"{' ...' if len(missing) > 8 else ''}; the table shows finished cells only.", ""]
    if warnings:
        md += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    md += ["## Test error (%), mean over domains", "",
           f"{MEAN_DEFINITION}; {INTERVAL}. `n` = seeds x scored samples per seed; `(<3 seeds)` marks a cell "
           "whose seed-to-seed spread rests on fewer than 3 seeds. A tuned method's cell names the grid point "
           "chosen on that setting's validation stream; `(oracle)` is the best on test, `(default)` the "
           "config's own values.", ""]
    if not table.empty:
        means = table[table["domain"] == "mean"]
        md += [md_table(wide_text(means)), ""]
        texts, values = heat_frames(table)
        models = ", ".join(sorted(set(table["model"].dropna()) - {""})) or "?"
        heatmap(values, f"campaign {campaign.name}: test error (%), 95% CI over seeds and samples\nmodel: {models}",
                True, out / "table.png", texts=texts)
        md += ["![test error per setting and domain](table.png)", "",
               "Every domain: [table.csv](table.csv) (columns `n_seeds`, `n_per_seed`, `ci_low`, `ci_high`, "
               "`few_seeds`, `seeds`).", ""]
    md += ["## Hyperparameter selection", "", "Chosen on the validation stream only (mean over domains, then "
           f"over {', '.join(campaign.over) or 'cells'}); the oracle is the best on test.", ""]
    md += [md_table(selection.assign(validation_error=100 * selection["validation_error"],
                                     test_error=100 * selection["test_error"])
                    .rename(columns={"validation_error": "validation error %", "test_error": "test error %"}))
           if not selection.empty else "No tuned methods.", ""]
    md += _pairs_md(pairs) + _wins_md(wins)
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _pairs_md(pairs: pd.DataFrame) -> list[str]:
    md = ["## Paired comparisons", "", "Same samples (paired on seed and sample_id, pooled over seeds and domains): "
          "difference in error (a - b, %) with a paired-bootstrap 95% interval, and McNemar's test (b: only a "
          f"right, c: only b right). `p holm`: adjusted for the campaign's {len(pairs)} comparisons (Holm).", ""]
    if pairs.empty:
        return md + ["No pairs (fewer than two methods finished).", ""]
    shown = pairs.assign(**{c: 100 * pairs[c] for c in ("error_a", "error_b", "diff", "ci_low", "ci_high")})
    for col in ("p_bootstrap", "p_holm", "p_mcnemar", "p_mcnemar_holm"):
        shown[col] = pairs[col].map(format_p)
    shown = shown.rename(columns={"p_holm": "p holm", "p_mcnemar_holm": "p mcnemar holm"})
    return md + [md_table(shown[["setting", "a", "b", "n", "error_a", "error_b", "diff", "ci_low", "ci_high",
                                 "p_bootstrap", "p holm", "mcnemar_b", "mcnemar_c", "p_mcnemar",
                                 "p mcnemar holm"]]), "",
                 "CSV: [pairs.csv](pairs.csv), [selection.csv](selection.csv)", ""]


def _wins_md(wins: pd.DataFrame) -> list[str]:
    if wins.empty:
        return []
    base = wins["baseline"].iloc[0]
    return ["## Win / tie / loss against " + base, "",
            f"Per (setting, domain) cell: a paired bootstrap of the method against {base} on the same samples, "
            f"Holm-adjusted over all {int(wins['cells'].sum())} cells; a win is a lower error at adjusted "
            "p < 0.05, a loss a higher one, anything else a tie. [wins.csv](wins.csv)", "", md_table(wins), ""]


def cell_text(row: Any) -> str:
    if pd.isna(row.error):
        return "-"
    few = ", <3 seeds" if row.n_seeds < 3 else ""
    grid = f" @{row.hp}" if isinstance(row.hp, str) and row.hp else ""
    n = f"(n={row.n_seeds}x{row.n_per_seed}{few})"
    if pd.isna(row.ci_low):
        return f"{100 * row.error:.1f} {n}{grid}"
    return f"{100 * row.error:.1f} [{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}] {n}{grid}"


def wide_text(means: pd.DataFrame) -> pd.DataFrame:
    """method rows x setting columns of 'mean [low, high] (n=seeds x samples) @grid point', plus the model;
    a (method, setting) without finished cells reads `-`."""
    frame = means.assign(text=[cell_text(r) for r in means.itertuples()])
    wide = frame.pivot_table(index="method", columns="setting", values="text", aggfunc="first", sort=False)
    wide = wide.reindex(columns=list(dict.fromkeys(means["setting"]))).fillna("-")
    wide.insert(0, "model", frame.groupby("method", sort=False)["model"].first())
    return wide.reset_index().astype(str)


def heat_frames(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(texts, values): method rows x (setting, domain) columns in stream order, each setting's `mean`
    last; a cell's text is the mean, the interval's half width and n (seeds x samples per seed)."""
    t = table.assign(col=table["setting"] + "\n" + table["domain"])
    order = []
    for setting in dict.fromkeys(t["setting"]):
        doms = [d for d in dict.fromkeys(t.loc[t["setting"] == setting, "domain"]) if d != "mean"] + ["mean"]
        order += [f"{setting}\n{d}" for d in doms]
    values = t.pivot_table(index="method", columns="col", values="error", sort=False).reindex(columns=order)
    half = (t["ci_high"] - t["ci_low"]) / 2
    t = t.assign(text=[("-" if pd.isna(e) else f"{100 * e:.1f}" + ("" if pd.isna(h) else f"\n±{100 * h:.1f}")
                        + f"\nn={k}x{m}") for e, h, k, m in zip(t["error"], half, t["n_seeds"], t["n_per_seed"])])
    texts = t.pivot_table(index="method", columns="col", values="text", aggfunc="first", sort=False)
    return texts.reindex(index=values.index, columns=order).fillna("-"), values
