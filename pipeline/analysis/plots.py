"""Plots and tables that reports draw: heat maps of error tables, the stream plot (loss and class
entropy along the stream), cache, timing and probe plots, markdown tables, the model label of a run.
Public, so a run's report and a campaign's table draw with the same helpers. Figures are drawn
on matplotlib `Figure` objects (the Agg canvas) rather than pyplot, so importing this module in a
notebook leaves its backend and global figure state alone.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

DPI = 110
STAGES = ["timing_embedding", "timing_cache_lookup", "timing_kb_retrieval", "timing_fine_tuning",
          "timing_forward_pass"]


def rolling(values: pd.Series) -> pd.Series:
    # A window of ~1/40 of the stream keeps the trend readable on streams of any length.
    return values.rolling(max(1, len(values) // 40), center=True, min_periods=1).mean()


def heatmap(table: pd.DataFrame, title: str, percent: bool, path: Path, texts: pd.DataFrame | None = None) -> None:
    """Values as colours with each cell's number written in it (or `texts`' cell, e.g. with its interval)."""
    data = table.to_numpy(dtype=float)
    rows, cols = data.shape
    lines = 1 if texts is None else max(1, max((str(t).count("\n") + 1 for t in texts.to_numpy().ravel()), default=1))
    fig = Figure(figsize=(max(6.0, (0.8 + 0.35 * (lines - 1)) * cols + 3), max(2.4, (0.35 + 0.2 * lines) * rows + 2)),
                 layout="constrained")
    ax = fig.add_subplot()
    finite = data[np.isfinite(data)]
    vmax = float(finite.max()) if finite.size else 1.0
    cmap = colormaps["YlOrRd"].with_extremes(bad="#dddddd")  # grey: no scored rows in that cell
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=vmax or 1.0, aspect="auto")
    for r in range(rows):
        for c in range(cols):
            value = data[r, c]
            text = "-" if not np.isfinite(value) else (f"{100 * value:.1f}" if percent else f"{value:.3f}")
            if texts is not None and isinstance(texts.iat[r, c], str):
                text = texts.iat[r, c]
            dark = np.isfinite(value) and value > 0.6 * vmax
            ax.text(c, r, text, ha="center", va="center", fontsize=8 if lines < 3 else 6.5,
                    color="white" if dark else "black")
    ax.set_xticks(range(cols), labels=list(table.columns), rotation=45, ha="right")
    ax.set_yticks(range(rows), labels=list(table.index))
    for c, name in enumerate(table.columns):  # a line before each `mean` column (one per setting in a campaign)
        if str(name).endswith("mean") and c > 0:
            ax.axvline(c - 0.5, color="black", linewidth=1.5)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.9, label="error" if percent else "bits per byte",
                 format=PercentFormatter(1.0) if percent else None)
    fig.savefig(path, dpi=DPI)


def mark_stream(ax: Any, frame: pd.DataFrame, domain_labels: bool) -> None:
    """One run: dashed lines where shards start, dotted lines (and top labels) where domains change."""
    starts = frame["x"] - frame["samples"]
    for start in starts[frame["shard"].ne(frame["shard"].shift())].iloc[1:]:
        ax.axvline(start, color="grey", linestyle="--", linewidth=1)
    domain = frame["domain"].fillna("(none)")
    change = domain.ne(domain.shift()) | frame["shard"].ne(frame["shard"].shift())
    seg_start = starts[change].to_numpy()
    seg_end = np.append(seg_start[1:], frame["x"].iloc[-1])
    names = domain[change].tolist()
    for s in seg_start[1:]:
        ax.axvline(s, color="lightgrey", linestyle=":", linewidth=0.8)
    if domain_labels and len(names) <= 60:
        top = ax.secondary_xaxis("top")
        top.set_xticks((seg_start + seg_end) / 2, labels=names)
        top.tick_params(labelrotation=90, labelsize=7, length=0)


def stream_plot(stream: pd.DataFrame, single: bool, path: Path, model: str = "") -> bool:
    has_loss = stream["loss_first"].notna().any()
    has_entropy = "class_entropy" in stream and stream["class_entropy"].notna().any()
    if not (has_loss or has_entropy):
        return False
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    ax_loss, ax_ent = fig.subplots(2, 1, sharex=True)
    multi_step = "steps" in stream and (stream["steps"].fillna(0) > 1).any()
    colors = [f"C{i % 10}" for i in range(stream["label"].nunique())]
    for color, (label, run) in zip(colors, stream.groupby("label", sort=False)):
        if run["loss_first"].notna().any():
            ax_loss.plot(run["x"], run["loss_first"], color=color, alpha=0.25, linewidth=0.8)
            ax_loss.plot(run["x"], rolling(run["loss_first"]), color=color, label=f"{label}: first step")
            if multi_step:
                ax_loss.plot(run["x"], rolling(run["loss_last"]), color=color, linestyle="--",
                             label=f"{label}: last step")
        if has_entropy and run["class_entropy"].notna().any():
            ax_ent.plot(run["x"], run["class_entropy"], color=color, alpha=0.25, linewidth=0.8)
            ax_ent.plot(run["x"], rolling(run["class_entropy"]), color=color, label=label)
    if has_loss:
        ax_loss.legend(fontsize=8, loc="upper right")
    else:
        ax_loss.text(0.5, 0.5, "no adaptation losses recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_ylabel("adaptation loss")
    ax_ent.set_ylabel("class entropy (normalised)")
    ax_ent.set_ylim(0, 1.05)
    if has_entropy:
        ax_ent.legend(fontsize=8, loc="lower right")
    ax_ent.set_xlabel("samples into the stream (shards in manifest order; faint: per batch, solid: rolling mean)")
    if single:
        mark_stream(ax_loss, stream, domain_labels=True)
        mark_stream(ax_ent, stream, domain_labels=False)
    _model_title(fig, model)
    fig.savefig(path, dpi=DPI)
    return True


def cache_plot(stream: pd.DataFrame, cache: pd.DataFrame, path: Path, model: str = "") -> None:
    over_time = "cache_evictions" in stream and stream["cache_evictions"].notna().any()
    fig = Figure(figsize=(11, 6.5 if over_time else 4), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True) if over_time else [fig.subplots()]
    for i, (label, run) in enumerate(stream[stream["label"].isin(cache["label"])].groupby("label", sort=False)):
        used = run["used_cache"].astype("float")
        cumulative = used.fillna(0).cumsum() / used.notna().cumsum().replace(0, np.nan)
        evictions = cache.loc[cache["label"] == label, "evictions"].iloc[0]
        suffix = "" if over_time or pd.isna(evictions) else f" ({int(evictions)} evictions in all)"
        axes[0].plot(run["x"], cumulative, color=f"C{i % 10}", linewidth=2, label=f"{label}: cumulative{suffix}")
        axes[0].plot(run["x"], rolling(used), color=f"C{i % 10}", alpha=0.5, linewidth=0.8,
                     label=f"{label}: rolling mean")
        if over_time:
            axes[1].plot(run["x"], run["cache_evictions"], color=f"C{i % 10}", label=label)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("cache hit rate")
    axes[0].legend(fontsize=8, loc="lower right")
    if over_time:
        axes[1].set_ylabel("evictions so far")
        axes[1].legend(fontsize=8)
    axes[-1].set_xlabel("samples into the stream (shards in manifest order)")
    _model_title(fig, model)
    fig.savefig(path, dpi=DPI)


def timing_plot(table: pd.DataFrame, by: str, path: Path, model: str = "") -> None:
    every = [s.removeprefix("timing_") for s in STAGES] + ["other"]
    parts = [p for p in every if table[p].fillna(0).gt(0).any()]
    fig = Figure(figsize=(max(5.0, 1.1 * len(table) + 3.5), 4.5), layout="constrained")
    ax = fig.subplots()
    names = [f"shard {v}" if by == "shard" else str(v) for v in table[by]]
    bottom = np.zeros(len(table))
    for part in parts:
        values = table[part].fillna(0).to_numpy()
        ax.bar(names, values, bottom=bottom, label=part, color=f"C{every.index(part)}")  # same colour in every report
        bottom += values
    for i, total in enumerate(table["total"]):
        if pd.isna(total):
            ax.text(i, 0, "no timing", ha="center", va="bottom", fontsize=8, color="grey")
    ax.set_ylabel("ms per sample")
    ax.set_title("time per stage")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", labelrotation=30 if len(names) > 4 else 0)
    _model_title(fig, model)
    fig.savefig(path, dpi=DPI)


def probes_plot(probes: pd.DataFrame, path: Path, model: str = "") -> None:
    """Forgetting and transfer: one panel per probe set (clean first, then each domain's sample),
    error against stream position, one line per run (and shard, where a run has several)."""
    sets = list(dict.fromkeys(["clean"] * ("clean" in set(probes["probe_set"])) + list(probes["probe_set"])))
    cols = min(4, len(sets))
    rows = math.ceil(len(sets) / cols)
    fig = Figure(figsize=(3.2 * cols + 1.5, 2.6 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    lines = list(dict.fromkeys(zip(probes["label"], probes["shard"])))
    several = probes.groupby("label")["shard"].nunique().gt(1).to_dict()
    for ax, name in zip(axes, sets):
        one = probes[probes["probe_set"] == name]
        for i, (label, shard) in enumerate(lines):
            line = one[(one["label"] == label) & (one["shard"] == shard)].sort_values("position")
            if len(line):
                ax.plot(line["position"], line["error"], marker=".", color=f"C{i % 10}",
                        label=f"{label} s{shard}" if several.get(label) else label)
        ax.set_title(name if name == "clean" else f"domain {name}", fontsize=9)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    for ax in axes[len(sets):]:
        ax.set_visible(False)
    axes[0].set_ylabel("error of the state at that point")
    axes[0].legend(fontsize=7)
    fig.supxlabel("rows of the shard's stream adapted on (0: the source model)", fontsize=9)
    _model_title(fig, model)
    fig.savefig(path, dpi=DPI)


def _model_title(fig: Figure, model: str) -> None:
    """Every figure names the model its numbers come from."""
    if model:
        fig.suptitle(f"model: {model}", fontsize=9)


def models_text(metas: Any) -> str:
    """The model label of the runs drawn in one figure (distinct labels, in run order)."""
    return ", ".join(dict.fromkeys(model_label(m) for m in metas)) or "?"


def md_table(frame: pd.DataFrame, index: bool = False) -> str:
    # Cells become text first: tabulate would otherwise print integer columns with the float format.
    text = frame.apply(lambda col: col.map(lambda v: "-" if pd.isna(v) else f"{v:.2f}")
                       if pd.api.types.is_float_dtype(col) else col.map(lambda v: "-" if v is None else str(v)))
    align = ["right" if pd.api.types.is_numeric_dtype(frame[c]) else "left" for c in frame.columns]
    return text.to_markdown(index=index, disable_numparse=True, colalign=(["left"] if index else []) + align)


def model_label(meta: dict[str, Any]) -> str:
    """The model column: the factory's function (or LM folder) and the checkpoint's file name."""
    model = (meta.get("config") or {}).get("model") or {}
    name = str(meta.get("model") or model.get("factory") or "?").rstrip("/").rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    ckpt = model.get("checkpoint")
    return f"{name} ({Path(ckpt).name})" if ckpt else name
