"""`python -m pipeline report RUN_DIR [RUN_DIR ...] [--out DIR]`: CSV tables, PNG plots and a
report.md for runs, read from their run directories alone.

Why a module of its own: a report needs only the run directory (DESIGN.md, Outputs), so it
works on finished, failed and half-written runs alike, without Ray or torch. Figures are drawn
on matplotlib `Figure` objects (the Agg canvas) rather than pyplot, so importing this module in
a notebook leaves the notebook's backend and global figure state alone.

Where files go: every RUN_DIR gets its own RUN_DIR/report/. Given several RUN_DIRs, a
comparison report (the same files, with one row, line or bar per run) goes to --out, or to
FIRST_RUN_DIR/report/compare/ without --out, so it never overwrites the first run's own report.

What is written (each plot is skipped, with a note in report.md, when its data is absent):
- error_by_domain.csv / .png: rows, scored rows, wrong, error rows and error (and bits per
  byte for LM runs) per run and domain, computed from results; a row is scored when `correct`
  is not null, as in summary.json.
- stream.png: first-step adaptation loss and normalised class entropy along the stream
  (analysis ordered by shard, then batch_index; x counts samples, so runs with different batch
  sizes line up).
- cache.png / cache.csv: cumulative adapter-cache hit rate along the stream and evictions
  (over time from an analysis column `cache_evictions` when a run records it, else the
  run's total from summary.json).
- timing.csv / .png: milliseconds per sample in each timing_* stage, stacked (per shard for
  one run, per run for a comparison).
- probes.csv / .png (runs with `probes.every`): error of the adapting state on the clean set
  (forgetting) and on each domain's sample (transfer) against stream position.
"""
from __future__ import annotations

import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.analysis.compare import comparison_warnings
from pipeline.analysis.plots import (
    STAGES,
    cache_plot,
    heatmap,
    md_table,
    model_label,
    models_text,
    probes_plot,
    stream_plot,
    timing_plot,
)
from pipeline.analysis.runs import RunSet, run_labels
from pipeline.analysis.stats import hierarchical_bootstrap, wilson_ci

REPORT_DIR = "report"
RESULT_COLUMNS = ["run_id", "domain", "position", "correct", "error", "adapter_source", "nll", "n_bytes"]
ANALYSIS_COLUMNS = ["run_id", "shard", "batch_index", "domain", "sample_ids", "losses", "steps", "class_entropy",
                    "used_cache", "cache_evictions", *STAGES, "timing_total"]
OUTPUTS = ("report.md", "error_by_domain.csv", "error_by_domain.png", "stream.png", "cache.csv", "cache.png",
           "timing.csv", "timing.png", "probes.csv", "probes.png")


# ------------------------------------------------------------------------------- tables

def error_table(results: pd.DataFrame, runs: RunSet, labels: list[str]) -> pd.DataFrame:
    """Long table: one row per (run, domain) with counts, error and, for LM runs, bits per byte."""
    meta = {m["run_id"]: (label, m.get("method")) for m, label in zip(runs, labels)}
    lm = "nll" in results.columns and results["nll"].notna().any()
    rows = []
    for (run_id, domain), group in results.groupby(["run_id", "domain"], sort=False, dropna=False):
        label, method = meta.get(run_id, (run_id, None))
        scored = int(group["correct"].notna().sum())
        wrong = int(group["correct"].eq(False).sum())
        row = {"run_id": run_id, "label": label, "method": method,
               "domain": "(none)" if pd.isna(domain) else domain, "n": len(group), "scored": scored,
               "wrong": wrong, "error_rows": int(group["error"].notna().sum()),
               "error": wrong / scored if scored else np.nan}
        row["ci_low"], row["ci_high"] = wilson_ci(wrong, scored)  # 95% over this run's samples
        row["first_position"] = group["position"].min() if "position" in group else np.nan
        if lm:
            ok = group[group["error"].isna() & group["nll"].notna() & (group["n_bytes"] > 0)]
            row["bits_per_byte"] = (ok["nll"].sum() / (ok["n_bytes"].sum() * math.log(2))) if len(ok) else np.nan
        rows.append(row)
    columns = ["run_id", "label", "method", "domain", "n", "scored", "wrong", "error_rows", "error", "ci_low", "ci_high",
               "first_position"]
    counts = {"n": "int64", "scored": "int64", "wrong": "int64", "error_rows": "int64", "error": "float64",
              "ci_low": "float64", "ci_high": "float64"}
    # Typed even when empty (a run with no parts yet), so sums and ratios downstream stay numeric.
    return pd.DataFrame(rows, columns=columns + (["bits_per_byte"] if lm else [])).astype(counts)


MEAN_DEFINITION = "`mean` = the mean over domains of the run's per-domain error (each domain weighs the same)"


def domain_order(table: pd.DataFrame) -> list[str]:
    """Domains in stream order: by the first stream position where any run meets them (the order of
    appearance when positions are unknown)."""
    if "first_position" in table and table["first_position"].notna().any():
        first = table.groupby("domain", sort=False)["first_position"].min()
        return list(first.sort_values(kind="stable").index)
    return list(dict.fromkeys(table["domain"]))


def wide(table: pd.DataFrame, value: str, labels: list[str]) -> pd.DataFrame:
    """Runs as rows, domains as columns (in stream order), plus the mean over domains."""
    out = table.pivot_table(index="label", columns="domain", values=value, sort=False, dropna=False)
    out = out.reindex(index=[lab for lab in labels if lab in out.index], columns=domain_order(table))
    out["mean"] = out.mean(axis=1)
    return out


def error_cell_texts(errors: pd.DataFrame, labels: list[str], sep: str = " ") -> pd.DataFrame:
    """Runs x domains of 'error % [low, high] n=scored' (Wilson 95%); `mean` is the mean over the
    run's domains (MEAN_DEFINITION) with a bootstrap interval over each domain's samples, so every
    cell carries its n and interval; a domain a run does not have reads `-`."""
    rows = []
    for label, g in errors.groupby("label", sort=False):
        for r in g.itertuples():
            rows.append((label, r.domain, _wilson_text(r.wrong, r.scored, sep)))
        g = g[g["scored"] > 0]
        err, low, high = hierarchical_bootstrap(g["wrong"].to_numpy()[None, :], g["scored"].to_numpy()[None, :])
        text = "-" if np.isnan(err) else \
            f"{100 * err:.1f}{sep}[{100 * low:.1f}, {100 * high:.1f}]{sep}n={int(g['scored'].sum())}"
        rows.append((label, "mean", text))
    frame = pd.DataFrame(rows, columns=["label", "domain", "text"])
    out = frame.pivot_table(index="label", columns="domain", values="text", aggfunc="first", sort=False)
    order = domain_order(errors) + ["mean"]
    return out.reindex(index=[lab for lab in labels if lab in out.index], columns=order).fillna("-")


def _wilson_text(wrong: int, scored: int, sep: str) -> str:
    if not scored:
        return "-"
    low, high = wilson_ci(wrong, scored)
    return f"{100 * wrong / scored:.1f}{sep}[{100 * low:.1f}, {100 * high:.1f}]{sep}n={scored}"


def stream_frame(analysis: pd.DataFrame, runs: RunSet, labels: list[str]) -> pd.DataFrame:
    """Analysis rows in stream order with `x` = samples seen so far within each run."""
    order = {rid: i for i, rid in enumerate(runs.run_ids)}
    label_of = dict(zip(runs.run_ids, labels))
    frame = analysis.assign(_run=analysis["run_id"].map(order).fillna(len(order)))
    frame = frame.sort_values(["_run", "shard", "batch_index"], kind="stable").reset_index(drop=True)
    # astype: on an empty frame `map` yields object columns, which cumsum and plotting reject.
    sizes = frame["sample_ids"].map(lambda ids: 1 if ids is None else max(len(ids), 1)).astype("int64")
    frame["samples"] = sizes
    frame["x"] = sizes.groupby(frame["_run"]).cumsum()
    frame["label"] = frame["run_id"].map(label_of).fillna(frame["run_id"])
    frame["loss_first"] = frame["losses"].map(lambda v: v[0] if v is not None and len(v) else np.nan).astype(float)
    frame["loss_last"] = frame["losses"].map(lambda v: v[-1] if v is not None and len(v) else np.nan).astype(float)
    return frame


def timing_table(stream: pd.DataFrame, by: str) -> pd.DataFrame:
    """Milliseconds per sample in each stage, per group; `other` is total minus the stages."""
    rows = []
    for key, group in stream.groupby(by, sort=False):
        samples = group["samples"].sum()
        row = {by: key, "batches": len(group), "samples": int(samples)}
        stage_sum = 0.0
        for stage in STAGES:
            value = group[stage].sum(min_count=1) if stage in group else np.nan
            row[stage.removeprefix("timing_")] = 1000 * value / samples if pd.notna(value) else np.nan
            stage_sum += 0.0 if pd.isna(value) else value
        total = group["timing_total"].sum(min_count=1) if "timing_total" in group else np.nan
        row["other"] = 1000 * max(total - stage_sum, 0.0) / samples if pd.notna(total) else np.nan
        row["total"] = 1000 * total / samples if pd.notna(total) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- report

def _cache_table(runs: RunSet, labels: list[str], stream: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Runs that used the adapter cache: summary.json counters and what the rows recorded."""
    rows = []
    for i, (meta, label) in enumerate(zip(runs, labels)):
        counters = (runs.summary(i) or {}).get("cache") or {}
        run_stream = stream[stream["run_id"] == meta["run_id"]]
        used = run_stream["used_cache"].dropna().astype(bool) if "used_cache" in run_stream else pd.Series(dtype=bool)
        if not counters and not used.any():
            continue
        sources = results.loc[results["run_id"] == meta["run_id"], "adapter_source"].value_counts()
        rows.append({"label": label, "hits": counters.get("hits"), "misses": counters.get("misses"),
                     "evictions": counters.get("evictions"), "hit_rate": counters.get("hit_rate"),
                     "queries_from_cache": float(used.mean()) if len(used) else np.nan,
                     "rows_cache": int(sources.get("cache", 0)), "rows_fresh": int(sources.get("fresh", 0)),
                     "rows_none": int(sources.get("none", 0))})
    return pd.DataFrame(rows, columns=["label", "hits", "misses", "evictions", "hit_rate", "queries_from_cache",
                                       "rows_cache", "rows_fresh", "rows_none"])


def _error_rows_md(results: pd.DataFrame, runs: RunSet, labels: list[str]) -> list[str]:
    bad = results[results["error"].notna()]
    if bad.empty:
        return []
    lines = ["## Rows with errors", "", "Rows whose `error` is set are counted in `error_rows` and left out of the error rate.", ""]
    label_of = dict(zip(runs.run_ids, labels))
    for run_id, group in bad.groupby("run_id", sort=False):
        lines.append(f"- {label_of.get(run_id, run_id)}: {len(group)} row(s); most frequent:")
        for message, count in group["error"].value_counts().head(5).items():
            lines.append(f"  - {count} x `{str(message)[:160]}`")
    return lines + [""]


def render(runs: RunSet, out_dir: str | Path, title: str) -> Path:
    """Write the CSVs, PNGs and report.md for `runs` into `out_dir`; returns report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a plot skipped this time must not leave last time's file behind
        (out_dir / name).unlink(missing_ok=True)
    single = len(runs) == 1
    labels = run_labels(runs)
    have_r, have_a = runs.schema("results").names, runs.schema("analysis").names
    results = runs.results([c for c in RESULT_COLUMNS if c in have_r])
    analysis = runs.analysis([c for c in ANALYSIS_COLUMNS if c in have_a])
    stream = stream_frame(analysis, runs, labels)
    errors = error_table(results, runs, labels)
    errors.to_csv(out_dir / "error_by_domain.csv", index=False)

    md = [f"# Report: {title}", "",
          f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from {len(runs)} run(s).", ""]
    md += _runs_section(runs, labels, errors)
    md += _error_section(runs, labels, errors, results, out_dir)
    md += _stream_section(stream, single, out_dir, models_text(runs))
    md += _cache_section(runs, labels, stream, results, out_dir)
    md += _timing_section(stream, single, out_dir, models_text(runs))
    md += _probes_section(runs, labels, out_dir)
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def _runs_section(runs: RunSet, labels: list[str], errors: pd.DataFrame) -> list[str]:
    """The runs compared, what differs between their protocols, which are unfinished."""
    md: list[str] = []
    per_run = errors.groupby("run_id", sort=False)[["n", "scored", "wrong", "error_rows"]].sum()
    per_run = per_run.reindex(runs.run_ids).fillna(0)
    per_run["error"] = per_run["wrong"] / per_run["scored"].replace(0, np.nan)
    overview = pd.DataFrame([{
        "label": label, "run_id": meta["run_id"], "model": model_label(meta), "experiment": meta.get("experiment"),
        "streams": _streams(meta),
        "tag": meta.get("tag") or "-",
        "status": meta.get("status"), "predict_from": meta.get("predict_from"), "rows": int(counts["n"]),
        "error rows": int(counts["error_rows"]), "error %": 100 * counts["error"],
    } for meta, label, (_, counts) in zip(runs, labels, per_run.iterrows())])
    md += ["## Runs", "", md_table(overview), ""]
    domains = {rid: set(g["domain"]) for rid, g in errors[errors["scored"] > 0].groupby("run_id", sort=False)}
    warnings = comparison_warnings(list(runs), labels, [domains.get(m["run_id"], set()) for m in runs]) \
        if len(runs) > 1 else []
    if warnings:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        md += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    unfinished = [f"{label} is {meta.get('status')}" for meta, label in zip(runs, labels) if meta.get("status") != "finished"]
    if unfinished:
        md += [f"**Note:** {'; '.join(unfinished)}: figures show the parts written so far.", ""]
    return md


def _streams(meta: dict[str, Any]) -> str:
    """How many independent streams a run's numbers are made of (run.json `protocol`, issue 23)."""
    proto = meta.get("protocol")
    if not proto:
        return f"{(meta.get('counts') or {}).get('shards', '?')} shard(s)?"
    return f"{proto.get('independent_streams')}" + ("" if proto.get("order_matters") else " (order-free)")


def _error_section(runs: RunSet, labels: list[str], errors: pd.DataFrame, results: pd.DataFrame, out_dir: Path) -> list[str]:
    """Error (or bits per byte) per domain: heat map, table, rows with errors."""
    md = ["## Error per domain", ""]
    value = "error" if errors["scored"].sum() else ("bits_per_byte" if "bits_per_byte" in errors else None)
    if value is None:
        md += ["No scored rows (no results yet, or every `correct` is null): plot skipped.", ""]
    else:
        table = wide(errors, value, labels)
        percent = value == "error"
        cells = error_cell_texts(errors, labels, sep="\n") if percent else None
        heatmap(table, ("error per domain (%), 95% interval, n" if percent else "bits per byte per domain")
                + f"\nmodel: {models_text(runs)}", percent, out_dir / "error_by_domain.png", texts=cells)
        md += ["![error per domain](error_by_domain.png)", "",
               ("Error % per domain with its 95% Wilson interval over the run's samples and n (scored rows); "
                f"{MEAN_DEFINITION}, with a bootstrap interval over each domain's samples; domains in stream order."
                if percent else "Bits per byte per domain."), "",
               md_table(error_cell_texts(errors, labels).reset_index()) if percent else md_table(table, index=True), ""]
        if percent and "bits_per_byte" in errors:
            md += ["Bits per byte:", "", md_table(wide(errors, "bits_per_byte", labels), index=True), ""]
    md += ["Full table: [error_by_domain.csv](error_by_domain.csv)", ""]
    md += _error_rows_md(results, runs, labels)
    return md


def _stream_section(stream: pd.DataFrame, single: bool, out_dir: Path, model: str) -> list[str]:
    """Adaptation loss and class entropy along the stream."""
    md = ["## Along the stream", ""]
    if stream_plot(stream, single, out_dir / "stream.png", model):
        md += ["![loss and class entropy along the stream](stream.png)", "",
               "Top: adaptation loss at the first step of each batch (the loss before that batch's update"
               + ("; dashed: last step" if "steps" in stream and (stream["steps"].fillna(0) > 1).any() else "")
               + "). Bottom: normalised entropy of the predicted class distribution of each batch."
               + (" Dashed vertical lines: shard starts; top labels: domains." if single else ""), ""]
    else:
        md += ["No losses or class entropy recorded (e.g. `source` or `norm`, or no analysis rows): plot skipped.", ""]
    return md


def _cache_section(runs: RunSet, labels: list[str], stream: pd.DataFrame, results: pd.DataFrame, out_dir: Path) -> list[str]:
    """The adapter cache's counters and hit rate along the stream."""
    md = ["## Adapter cache", ""]
    cache = _cache_table(runs, labels, stream, results)
    if cache.empty:
        md += ["No run used the adapter cache (`used_cache` is null throughout and summary.json has no cache "
               "counters): plot skipped.", ""]
    else:
        cache.to_csv(out_dir / "cache.csv", index=False)
        cache_plot(stream, cache, out_dir / "cache.png", models_text(runs))
        md += ["![cache hit rate along the stream](cache.png)", "", md_table(cache), "",
               "Counters come from summary.json; `queries_from_cache` from analysis `used_cache`; `rows_*` count "
               "results by `adapter_source`.", ""]
    return md


def _timing_section(stream: pd.DataFrame, single: bool, out_dir: Path, model: str) -> list[str]:
    """Milliseconds per sample in each stage."""
    md = ["## Time per stage", ""]
    by = "shard" if single else "label"
    timing = timing_table(stream, by) if len(stream) else pd.DataFrame()
    parts = [s.removeprefix("timing_") for s in STAGES] + ["other"]
    if timing.empty or not timing[parts].fillna(0).gt(0).any().any():
        md += ["No timing recorded: plot skipped.", ""]
    else:
        timing.to_csv(out_dir / "timing.csv", index=False)
        timing_plot(timing, by, out_dir / "timing.png", model)
        md += ["![time per stage](timing.png)", "", "Milliseconds per sample, summed over batches"
               + (" per shard." if single else " per run.") + " `other` is `timing_total` minus the stages.", "",
               md_table(timing), "", "CSV: [timing.csv](timing.csv)", ""]
    return md


def _probes_section(runs: RunSet, labels: list[str], out_dir: Path) -> list[str]:
    """Forgetting (clean set) and transfer (each domain's sample) of the adapting state along the stream."""
    probes = runs.probes(["run_id", "shard", "position", "probe_set", "n", "error", "ece"])
    if probes.empty:
        return []
    probes["label"] = probes["run_id"].map(dict(zip(runs.run_ids, labels)))
    probes = probes.sort_values(["label", "shard", "position", "probe_set"], kind="stable")
    probes[["label", "shard", "position", "probe_set", "n", "error", "ece"]].to_csv(out_dir / "probes.csv", index=False)
    probes_plot(probes, out_dir / "probes.png", models_text(runs))
    last = probes.sort_values("position").groupby(["label", "probe_set"], sort=False).tail(1)
    end = last.pivot_table(index="label", columns="probe_set", values="error", sort=False) * 100
    return ["## Forgetting and transfer (probes)", "", "![probe error along the stream](probes.png)", "",
            "Each point scores the adaptation state committed at that stream position, without adapting, on "
            "a fixed clean source set (`clean`: forgetting) and a fixed sample of each domain (transfer); "
            "position 0 is the source model. Error % of the last probed state:", "",
            md_table(end.round(1).reset_index()), ""]


def write_reports(run_dirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Without `out`: a report in each RUN_DIR/report/, plus a comparison in the first run's
    report/compare/. With `out`, nothing is written into the run directories read: one run's report
    goes to `out`, several runs' comparison to `out` and each run's own report to `out/<run_id>/`."""
    runs = RunSet.from_dirs(run_dirs)
    if out is not None and len(runs) == 1:
        return [render(runs, Path(out), runs[0]["run_id"])]

    def own(i: int) -> Path:
        return Path(out) / runs[i]["run_id"] if out is not None else runs.path(i) / REPORT_DIR

    written = [render(runs[i:i + 1], own(i), runs[i]["run_id"]) for i in range(len(runs))]
    if len(runs) > 1:
        target = Path(out) if out is not None else runs.path(0) / REPORT_DIR / "compare"
        written.append(render(runs, target, f"comparison of {len(runs)} runs"))
    return written
