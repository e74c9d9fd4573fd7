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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.analysis.compare import comparison_warnings
from pipeline.analysis.plots import model_label
from pipeline.analysis.runs import RunSet
from pipeline.analysis.stats import hierarchical_bootstrap, holm, mcnemar, paired_bootstrap, win_tie_loss
from pipeline.campaigns.campaign_report import write_report

METHOD_AXIS, SETTING_AXIS = "method", "setting"
TABLE_COLUMNS = ["method", "choice", "hp", "setting", "domain", "model", "n_seeds", "n_per_seed", "error", "ci_low",
                 "ci_high", "few_seeds", "seeds"]
WIN_COLUMNS = ["method", "baseline", "cells", "wins", "ties", "losses"]
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
    def table(self, n_resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
        """Long table: label x setting x domain test error: the mean over seeds (of each seed's error;
        for `mean`, of each seed's mean over domains) with a 95% interval from a bootstrap that
        resamples seeds, then samples within them (stats.hierarchical_bootstrap), so it is never
        zero-width for a deterministic method and never leaves [0, 100]; `few_seeds` flags n_seeds < 3."""
        chosen = self._chosen_tests()
        rows = []
        for (label, setting), group in chosen.groupby(["label", "setting"], sort=False):
            per = group[group["domain"] != "mean"]
            domains = list(dict.fromkeys(per["domain"]))
            wide_n = per.pivot_table(index="seed", columns="domain", values="n", sort=False).reindex(columns=domains)
            wide_w = (per.assign(w=per["error"] * per["n"])
                      .pivot_table(index="seed", columns="domain", values="w", sort=False).reindex(columns=domains))
            for domain in [*domains, "mean"]:
                cols = domains if domain == "mean" else [domain]
                n, w = wide_n[cols].dropna(), wide_w[cols].dropna()
                err, low, high = hierarchical_bootstrap(w.round().to_numpy(), n.to_numpy(),
                                                        n_resamples=n_resamples, seed=seed)
                g = group[group["domain"] == domain]
                n_seeds = len(n)
                rows.append({"method": label, "choice": g["choice"].iloc[0], "hp": g["hp"].iloc[0],
                             "setting": setting, "domain": domain,
                             "model": ", ".join(sorted(set(g["model"].dropna()))), "n_seeds": n_seeds,
                             "n_per_seed": int(g["n"].median()), "error": err, "ci_low": low, "ci_high": high,
                             "few_seeds": n_seeds < 3,
                             "seeds": ";".join(f"{s}:{e:.4f}" for s, e in zip(g["seed"], g["error"]))})
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)

    def pairs(self, n_resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
        """Paired tests between the table's methods (selected choices) per setting, pooled over seeds;
        `p_holm` / `p_mcnemar_holm` are Holm-adjusted over every pair of the campaign."""
        chosen = self._chosen_tests()
        chosen = chosen[(chosen["domain"] == "mean") & chosen["choice"].isin(["-", "selected"])]
        if chosen.empty:
            return pd.DataFrame()
        rows = []
        for setting, wide, labels in self._paired(chosen):
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
        frame = pd.DataFrame(rows)
        if not frame.empty:
            frame["p_holm"] = holm(frame["p_bootstrap"].tolist())
            frame["p_mcnemar_holm"] = holm(frame["p_mcnemar"].tolist())
        return frame

    def _paired(self, chosen: pd.DataFrame):
        """Per setting: (setting, samples x labels of `correct`, labels in table order)."""
        results = self.runs("test").results(["run_id", "sample_id", "domain", "correct"])
        results = results[results["run_id"].isin(set(chosen["run_id"]))]
        results = results.merge(chosen[["run_id", "label", "setting", "seed"]], on="run_id")
        for setting, g in results.groupby("setting", sort=False):
            labels = list(dict.fromkeys(chosen.loc[chosen["setting"] == setting, "label"]))
            yield setting, g.pivot_table(index=["seed", "domain", "sample_id"], columns="label", values="correct",
                                         aggfunc="first", sort=False), labels

    def wins(self, baseline: str | None = None, n_resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
        """Win / tie / loss of every method against `baseline` (default `source` when the campaign has
        it, else the first row) over the (setting, domain) cells: a paired bootstrap per cell, Holm
        over all of the campaign's cells, a win when the method's error is lower at adjusted p < 0.05."""
        chosen = self._chosen_tests()
        chosen = chosen[(chosen["domain"] == "mean") & chosen["choice"].isin(["-", "selected"])]
        if chosen.empty:
            return pd.DataFrame(columns=WIN_COLUMNS)
        labels = list(dict.fromkeys(chosen["label"]))
        baseline = baseline or ("source" if "source" in labels else labels[0])
        if baseline not in labels:
            raise ValueError(f"baseline {baseline!r} is not a row of campaign {self.name}: {labels}")
        cells = []
        for _setting, wide, _ in self._paired(chosen):
            if baseline not in wide:
                continue
            for method in [m for m in labels if m != baseline and m in wide]:
                for _domain, g in wide[[method, baseline]].dropna().groupby(level="domain", sort=False):
                    boot = paired_bootstrap(g[method].astype(bool).to_numpy(), g[baseline].astype(bool).to_numpy(),
                                            n_resamples=n_resamples, seed=seed)
                    cells.append((method, boot["diff"], boot["p_value"]))
        adjusted = holm([p for _, _, p in cells])
        rows = []
        for method in [m for m in labels if m != baseline]:
            mine = [(d, p) for (m, d, _), p in zip(cells, adjusted) if m == method]
            w, t, lose = win_tie_loss([d for d, _ in mine], [p for _, p in mine])
            rows.append({"method": method, "baseline": baseline, "cells": len(mine), "wins": w, "ties": t,
                         "losses": lose})
        return pd.DataFrame(rows, columns=WIN_COLUMNS)

    def warnings(self) -> list[str]:
        """Compared test runs (same setting and seed) whose protocols differ (pipeline.analysis.compare):
        manifest, model, batch size, setting, independent streams, predict_from, domain set."""
        chosen = self._chosen_tests()
        domains = {r: set(g["domain"]) for r, g in chosen[chosen["domain"] != "mean"].groupby("run_id", sort=False)}
        chosen = chosen[chosen["domain"] == "mean"]
        runs = {m["run_id"]: m for m in self.runs("test")}
        out = []
        for (setting, seed), g in chosen.groupby(["setting", "seed"], sort=False):
            metas = [runs[r] for r in dict.fromkeys(g["run_id"]) if r in runs]
            labels = [g.loc[g["run_id"] == m["run_id"], "label"].iloc[0] for m in metas]
            sets = [domains.get(m["run_id"], set()) for m in metas]
            out += [f"setting {setting}, seed {seed}: {w}" for w in comparison_warnings(metas, labels, sets)]
        return out

    def report(self, out: str | Path | None = None, baseline: str | None = None) -> Path:
        """Write the campaign's CSVs, heat map and report.md (pipeline/campaigns/campaign_report.py)."""
        return write_report(self, Path(out) if out is not None else campaign_dir(self.root, self.name) / "report",
                            baseline)
