"""A campaign's selection and table, read from its record (`.campaigns/<name>/campaign.json`,
written by `pipeline.campaigns.sweep`) and its runs' results Parquet alone: no Ray, no torch.

- `selection()`: per tuned method and group (every axis but the `select_over` ones, e.g. per
  setting), the grid point with the lowest validation error (mean over domains, then over the
  `select_over` cells, e.g. seeds; ties go to the earlier grid point), the oracle (the same on the
  test runs) and the default point, each with its validation and test error. The choice reads
  validation runs only.
- `table()`: method x setting x domain (and `mean`, the mean over domains) test error: mean over
  seeds with a 95% Student-t interval, n seeds and samples per seed, and the model. A tuned method
  appears three times: selected, `(oracle)` and `(default)`.
- `pairs()`: per setting, every pair of methods (selected choices) on the same samples, pooled
  over seeds (paired on seed and sample_id): the error difference with a paired-bootstrap
  interval and p-value, and McNemar's test.
- `report()`: table.csv, pairs.csv, selection.csv, table.png (heat map, numbers in cells) and
  report.md into `.campaigns/<name>/report/` or `out`.
"""
from __future__ import annotations

import itertools
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.analysis.plots import heatmap, md_table, model_label
from pipeline.analysis.report import comparison_warnings
from pipeline.analysis.runs import RunSet
from pipeline.analysis.stats import mcnemar, mean_ci, paired_bootstrap

METHOD_AXIS, SETTING_AXIS = "method", "setting"
CAMPAIGNS_DIR = ".campaigns"  # under output_root; the dot keeps query_runs from reading it as a run


def campaign_dir(output_root: str | Path, name: str) -> Path:
    return Path(output_root) / CAMPAIGNS_DIR / name


class Campaign:
    """One campaign under an output root; everything is computed from its run directories."""

    def __init__(self, root: str | Path, name: str):
        self.root, self.name = Path(root), name
        path = campaign_dir(root, name) / "campaign.json"
        if not path.is_file():
            raise ValueError(f"no campaign {name!r} under {root} (no {path})")
        self.record: dict[str, Any] = json.loads(path.read_text())
        self.cells: list[dict[str, Any]] = self.record["cells"]
        self.over: list[str] = list(self.record.get("select_over") or [])
        self._errors: pd.DataFrame | None = None

    @classmethod
    def of(cls, runs: RunSet, name: str) -> "Campaign":
        """The campaign `name` whose runs `runs` holds (e.g. `Campaign.of(query_runs("runs"), "camp")`)."""
        roots = {runs.path(i).parent for i, meta in enumerate(runs) if meta.get("tag") == name}
        if len(roots) != 1:
            raise ValueError(f"campaign {name!r}: {'no run in this set is tagged with it' if not roots else f'runs under {len(roots)} roots'}")
        return cls(roots.pop(), name)

    def __repr__(self) -> str:
        return f"Campaign({self.name!r}, {len(self.cells)} cells under {self.root})"

    # ------------------------------------------------------------------ per-cell errors
    def _row_label(self, cell: dict[str, Any]) -> str:
        """The table row: the cell's labels on every axis but setting and the averaged-over ones."""
        parts = [lab for ax, lab in cell["labels"].items() if ax != SETTING_AXIS and ax not in self.over]
        return "-".join(parts) or cell["method"]

    def _seed(self, cell: dict[str, Any]) -> str:
        return "-".join(cell["labels"][ax] for ax in self.over) or "-"

    def runs(self, role: str | None = None) -> RunSet:
        """The campaign's run directories that exist, in cell order (test and validation, or one role)."""
        dirs = [self.root / c["run_id"] for c in self.cells if role in (None, c["role"])]
        return RunSet.from_dirs([d for d in dirs if (d / "run.json").is_file()])

    def cell_errors(self) -> pd.DataFrame:
        """One row per (cell, domain) plus a `mean` row per cell (the mean over domains)."""
        if self._errors is not None:
            return self._errors
        runs = self.runs()
        results = runs.results(["run_id", "domain", "correct"])
        by_run = {m["run_id"]: m for m in runs}
        rows = []
        grouped = {k: g for k, g in results.groupby("run_id", sort=False)}
        for cell in self.cells:
            meta = by_run.get(cell["run_id"])
            base = {"cell": cell["name"], "run_id": cell["run_id"], "role": cell["role"], "method": cell["method"],
                    "row": self._row_label(cell), "setting": cell["labels"].get(SETTING_AXIS, "-"),
                    "seed": self._seed(cell), "hp": cell.get("hp_name"), "default_hp": cell.get("default_hp", False),
                    "status": None if meta is None else meta.get("status"),
                    "model": None if meta is None else model_label(meta)}
            group = grouped.get(cell["run_id"])
            if group is None or meta is None or meta.get("status") != "finished":
                continue
            scored = group[group["correct"].notna()]
            per = []
            for domain, g in scored.groupby("domain", sort=False):
                err = 1.0 - g["correct"].astype(bool).mean()
                per.append(err)
                rows.append({**base, "domain": domain, "n": len(g), "error": err})
            rows.append({**base, "domain": "mean", "n": len(scored), "error": float(np.mean(per)) if per else np.nan})
        cols = ["cell", "run_id", "role", "method", "row", "setting", "seed", "hp", "default_hp", "status", "model",
                "domain", "n", "error"]
        self._errors = pd.DataFrame(rows, columns=cols)
        return self._errors

    # ---------------------------------------------------------------------- selection
    def selection(self) -> pd.DataFrame:
        """Per tuned (row, setting): selected / oracle / default grid point and their errors."""
        errs = self.cell_errors()
        means = errs[(errs["domain"] == "mean") & errs["hp"].notna()]
        rows = []
        for (row, setting), group in means.groupby(["row", "setting"], sort=False):
            order = list(dict.fromkeys(group["hp"]))  # grid order, as the sweep expanded it
            val = group[group["role"] == "validation"].groupby("hp")["error"].mean().reindex(order)
            test = group[group["role"] == "test"].groupby("hp")["error"].mean().reindex(order)
            default = group.loc[group["default_hp"].astype(bool), "hp"]
            # the choice reads validation errors only; NaN (a grid point not yet run) never wins
            selected = val.idxmin() if val.notna().any() else None
            oracle = test.idxmin() if test.notna().any() else None
            for choice, hp in (("selected", selected), ("oracle", oracle),
                               ("default", default.iloc[0] if len(default) else None)):
                rows.append({"row": row, "setting": setting, "choice": choice, "hp": hp,
                             "validation_error": val.get(hp, np.nan) if hp else np.nan,
                             "test_error": test.get(hp, np.nan) if hp else np.nan,
                             "n_grid": len(order)})
        return pd.DataFrame(rows, columns=["row", "setting", "choice", "hp", "validation_error", "test_error", "n_grid"])

    def _chosen_tests(self) -> pd.DataFrame:
        """Test (cell, domain) rows that enter the table, with `label` = row (+ choice)."""
        errs = self.cell_errors()
        test = errs[errs["role"] == "test"]
        plain = test[test["hp"].isna()].assign(label=lambda f: f["row"], choice="-")
        parts = [plain]
        for sel in self.selection().itertuples():
            if sel.hp is None:
                continue
            pick = test[(test["row"] == sel.row) & (test["setting"] == sel.setting) & (test["hp"] == sel.hp)]
            label = sel.row if sel.choice == "selected" else f"{sel.row} ({sel.choice})"
            parts.append(pick.assign(label=label, choice=sel.choice))
        return pd.concat(parts, ignore_index=True) if parts else test.iloc[:0]

    # -------------------------------------------------------------------------- table
    def table(self) -> pd.DataFrame:
        """Long table: label x setting x domain: mean test error over seeds and its 95% interval."""
        chosen = self._chosen_tests()
        rows = []
        for (label, setting, domain), g in chosen.groupby(["label", "setting", "domain"], sort=False):
            mean, low, high, n = mean_ci(g["error"].tolist())
            rows.append({"method": label, "choice": g["choice"].iloc[0], "hp": g["hp"].iloc[0],
                         "setting": setting, "domain": domain, "model": ", ".join(sorted(set(g["model"].dropna()))),
                         "n_seeds": n, "n_per_seed": int(g["n"].median()), "error": mean, "ci_low": low,
                         "ci_high": high, "seeds": ";".join(f"{s}:{e:.4f}" for s, e in zip(g["seed"], g["error"]))})
        return pd.DataFrame(rows, columns=["method", "choice", "hp", "setting", "domain", "model", "n_seeds",
                                           "n_per_seed", "error", "ci_low", "ci_high", "seeds"])

    def pairs(self, n_resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
        """Paired tests between the table's methods (selected choices) per setting, pooled over seeds."""
        chosen = self._chosen_tests()
        chosen = chosen[(chosen["domain"] == "mean") & chosen["choice"].isin(["-", "selected"])]
        if chosen.empty:
            return pd.DataFrame()
        results = self.runs("test").results(["run_id", "sample_id", "correct"])
        results = results[results["run_id"].isin(set(chosen["run_id"]))]
        results = results.merge(chosen[["run_id", "label", "setting", "seed"]], on="run_id")
        rows = []
        for setting, g in results.groupby("setting", sort=False):
            labels = list(dict.fromkeys(chosen.loc[chosen["setting"] == setting, "label"]))
            wide = g.pivot_table(index=["seed", "sample_id"], columns="label", values="correct", aggfunc="first")
            for a, b in itertools.combinations(labels, 2):
                both = wide[[a, b]].dropna()  # error rows (null correct) drop out of the pair
                if both.empty:
                    continue
                ca, cb = both[a].astype(bool).to_numpy(), both[b].astype(bool).to_numpy()
                boot = paired_bootstrap(ca, cb, n_resamples=n_resamples, seed=seed)
                mc = mcnemar(ca, cb)
                rows.append({"setting": setting, "a": a, "b": b, "n": boot["n"], "error_a": float((~ca).mean()),
                             "error_b": float((~cb).mean()), "diff": boot["diff"], "ci_low": boot["low"],
                             "ci_high": boot["high"], "p_bootstrap": boot["p_value"], "mcnemar_b": mc["b"],
                             "mcnemar_c": mc["c"], "p_mcnemar": mc["p_value"], "mcnemar_exact": mc["exact"]})
        return pd.DataFrame(rows)

    def warnings(self) -> list[str]:
        """Compared test runs (same setting and seed) that differ in manifest, model or batch size."""
        chosen = self._chosen_tests()
        chosen = chosen[chosen["domain"] == "mean"]
        runs = {m["run_id"]: m for m in self.runs("test")}
        out = []
        for (setting, seed), g in chosen.groupby(["setting", "seed"], sort=False):
            metas = [runs[r] for r in dict.fromkeys(g["run_id"]) if r in runs]
            labels = [g.loc[g["run_id"] == m["run_id"], "label"].iloc[0] for m in metas]
            out += [f"setting {setting}, seed {seed}: {w}" for w in comparison_warnings(metas, labels)]
        return out

    # ------------------------------------------------------------------------- report
    def report(self, out: str | Path | None = None) -> Path:
        """Write the campaign's CSVs, heat map and report.md; returns report.md's path."""
        out = Path(out) if out is not None else campaign_dir(self.root, self.name) / "report"
        out.mkdir(parents=True, exist_ok=True)
        table, pairs, selection = self.table(), self.pairs(), self.selection()
        table.to_csv(out / "table.csv", index=False)
        pairs.to_csv(out / "pairs.csv", index=False)
        selection.to_csv(out / "selection.csv", index=False)
        warnings = self.warnings()
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        missing = [c["name"] for c in self.cells if not _finished(self.root / c["run_id"])]
        md = [f"# Campaign {self.name}", "",
              f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from {len(self.cells)} cells "
              f"({sum(c['role'] == 'validation' for c in self.cells)} on the validation stream).", ""]
        if missing:
            md += [f"**Note:** {len(missing)} cell(s) not finished: {', '.join(missing[:8])}"
                   f"{' ...' if len(missing) > 8 else ''}; the table shows finished cells only.", ""]
        if warnings:
            md += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
        md += ["## Test error (%), mean over domains", "",
               "Mean over seeds with a 95% Student-t interval; `n` = seeds x scored samples per seed. "
               "A tuned method's row is the grid point chosen on the validation stream; `(oracle)` is the "
               "best on test, `(default)` the config's own values.", ""]
        if not table.empty:
            means = table[table["domain"] == "mean"]
            md += [md_table(_wide_text(means)), ""]
            texts, values = _heat_frames(table)
            heatmap(values, f"campaign {self.name}: test error (%), mean over seeds, 95% CI", True,
                     out / "table.png", texts=texts)
            md += ["![test error per setting and domain](table.png)", "",
                   "Every domain: [table.csv](table.csv) (columns `n_seeds`, `n_per_seed`, `ci_low`, `ci_high`, "
                   "`seeds`).", ""]
        md += ["## Hyperparameter selection", "", "Chosen on the validation stream only (mean over "
               f"{', '.join(self.over) or 'cells'}); the oracle is the best on test.", ""]
        md += [md_table(selection.assign(validation_error=100 * selection["validation_error"],
                                          test_error=100 * selection["test_error"])
                         .rename(columns={"validation_error": "validation error %", "test_error": "test error %"}))
               if not selection.empty else "No tuned methods.", ""]
        md += ["## Paired comparisons", "", "Same samples (paired on seed and sample_id, pooled over seeds): "
               "difference in error (a - b, %) with a paired-bootstrap 95% interval, and McNemar's test "
               "(b: only a right, c: only b right).", ""]
        if not pairs.empty:
            shown = pairs.assign(**{c: 100 * pairs[c] for c in ("error_a", "error_b", "diff", "ci_low", "ci_high")})
            md += [md_table(shown[["setting", "a", "b", "n", "error_a", "error_b", "diff", "ci_low", "ci_high",
                                    "p_bootstrap", "mcnemar_b", "mcnemar_c", "p_mcnemar"]]), ""]
        else:
            md += ["No pairs (fewer than two methods finished).", ""]
        md += ["CSV: [pairs.csv](pairs.csv), [selection.csv](selection.csv)", ""]
        path = out / "report.md"
        path.write_text("\n".join(md))
        return path


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _cell_text(row: Any) -> str:
    if pd.isna(row.error):
        return "-"
    if pd.isna(row.ci_low):
        return f"{100 * row.error:.1f} (n={row.n_seeds}x{row.n_per_seed})"
    return f"{100 * row.error:.1f} [{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}] (n={row.n_seeds}x{row.n_per_seed})"


def _wide_text(means: pd.DataFrame) -> pd.DataFrame:
    """method rows x setting columns of 'mean [low, high] (n=seeds x samples)', plus the model."""
    frame = means.assign(text=[_cell_text(r) for r in means.itertuples()])
    wide = frame.pivot_table(index="method", columns="setting", values="text", aggfunc="first", sort=False)
    wide.insert(0, "model", frame.groupby("method", sort=False)["model"].first())
    wide.insert(1, "grid point", frame.groupby("method", sort=False)["hp"].first().fillna("-"))
    return wide.reset_index().rename(columns={"method": "method"}).astype(str)


def _heat_frames(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(texts, values): method rows x (setting, domain) columns, each setting's `mean` last; a cell's
    text is the mean, the interval's half width and n (seeds x samples per seed)."""
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
    return texts.reindex(index=values.index, columns=order), values
