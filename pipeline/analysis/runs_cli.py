"""`python -m pipeline runs list|show|compare`: the run registry (pipeline/analysis/runs.py) as
tables on a terminal."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import pandas as pd
from pydantic import BaseModel

from pipeline.analysis.runs import SUMMARY_FILE, RunSet, query_runs, run_labels
from ttt.config import TTTConfig


def _config_filter(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)  # 0.001 -> float, true -> bool, null -> None
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="runs", help="output root holding run directories (default: runs)")
    for name in ("experiment", "model", "method", "status", "tag"):
        parser.add_argument(f"--{name}", action="append", help=f"keep runs with this {name} (repeatable)")
    parser.add_argument("--since", help="keep runs started at or after this ISO time (UTC if no zone)")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs whose resolved config has KEY (dotted) = VALUE (repeatable)")


def _query(args: argparse.Namespace) -> RunSet:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = query_runs(args.root, experiment=args.experiment, model=args.model, method=args.method,
                          tag=args.tag, status=args.status, since=args.since, config=_config_filter(args.config))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return runs


def _percent(value: Any) -> str:
    return "-" if value is None or pd.isna(value) else f"{100 * value:.2f}"


# Fields that tell compared runs apart, in the order a label names them (only those that vary).

def _cmd_list(args: argparse.Namespace) -> int:
    runs = _query(args)
    if not len(runs):
        print(f"no runs under {args.root} match")
        return 0
    frame = runs.to_frame()[["run_id", "experiment", "tag", "method", "status", "started_at", "n", "error"]]
    frame = frame.assign(started_at=frame["started_at"].dt.strftime("%Y-%m-%d %H:%M:%S"),
                         n=frame["n"].map(lambda v: "-" if pd.isna(v) else str(int(v))),
                         error=frame["error"].map(_percent), tag=frame["tag"].fillna("-"))
    print(frame.rename(columns={"error": "error %"}).to_string(index=False))
    return 0


def _select(runs: RunSet, wanted: list[str]) -> RunSet:
    """Runs named by id or unique id prefix, in the order named."""
    chosen = []
    ids = runs.run_ids
    for name in wanted:
        hits = [i for i, rid in enumerate(ids) if rid == name] or [i for i, rid in enumerate(ids) if rid.startswith(name)]
        if len(hits) != 1:
            raise ValueError(f"run {name!r} {'matches no' if not hits else f'is ambiguous among {len(hits)}'} "
                             f"run(s) under the selected root and filters")
        chosen.append(runs._runs[hits[0]])
    return RunSet(chosen)


# A method's knobs live in the ttt block named after it (ttt.cotta.*); read from the config's fields,
# not the method registry, so `runs show` imports no torch. `guards` is shared by every method.
_METHOD_SECTIONS = [name for name, f in TTTConfig.model_fields.items() if name != "guards"
                    and isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]


def _cmd_show(args: argparse.Namespace) -> int:
    runs = _select(_query(args), [args.run])
    meta, summary = runs[0], runs.summary(0) or {}
    lines = [f"run_dir      {runs.path(0)}"]
    for key in ("run_id", "experiment", "tag", "status", "method", "model", "dataset", "predict_from",
                "config_hash", "git_commit", "source_hash", "started_at", "ended_at", "error"):
        lines.append(f"{key:<13}{meta.get(key)}")
    lines.append(f"{'counts':<13}{json.dumps(meta.get('counts'))}")
    lines.append(f"{'versions':<13}{json.dumps(meta.get('versions'))}")
    ttt = dict((meta.get("config") or {}).get("ttt") or {})
    # Method sub-sections of other methods (cotta.* on a tent run) only add noise.
    for section in _METHOD_SECTIONS:  # every method's config block is named after the method
        if section != meta.get("method"):
            ttt.pop(section, None)
    flat = pd.json_normalize(ttt, sep=".").iloc[0].to_dict() if ttt else {}
    if flat:
        lines.append("ttt          " + ", ".join(f"{k}={v}" for k, v in flat.items() if v is not None))
    print("\n".join(lines))
    per_domain = summary.get("per_domain") or {}
    if per_domain:
        table = pd.DataFrame([{"domain": d, "n": s.get("n"), "error %": _percent(s.get("error")),
                               **({"bits/byte": s["bits_per_byte"]} if "bits_per_byte" in s else {})}
                              for d, s in per_domain.items()])
        print("\n" + table.to_string(index=False))
    overall = summary.get("overall")
    if overall:
        print(f"\noverall: n={overall.get('n')} error %={_percent(overall.get('error'))} "
              f"error rows={overall.get('errors_rows')}")
    for key in ("throughput", "cache"):
        if summary.get(key):
            print(f"{key}: {json.dumps(summary[key])}")
    if not summary:
        print(f"\nno {SUMMARY_FILE} (status {meta.get('status')})")
    return 0


def compare_table(runs: RunSet) -> pd.DataFrame:
    """Error per domain (columns) for each run (rows, labelled by method), plus the domain mean."""
    frame = runs.to_frame()
    domains = [c for c in frame.columns if c.startswith("error/")]
    table = frame[domains].rename(columns=lambda c: c.split("/", 1)[1])
    table.index = run_labels(runs)
    table.index.name = "method"
    table["mean"] = table.mean(axis=1)
    return table


def _cmd_compare(args: argparse.Namespace) -> int:
    runs = _query(args)
    if args.runs:
        runs = _select(runs, args.runs)
    if not len(runs):
        print(f"no runs under {args.root} match")
        return 0
    table = compare_table(runs)
    print(table.map(_percent).to_string())
    print("(error % per domain; mean over domains)")
    return 0


def runs_main(argv: list[str]) -> int:
    """`python -m pipeline runs list|show|compare ...`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipeline runs", description="find and compare runs")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list runs (oldest first) with headline error")
    _add_filters(p_list)
    p_show = sub.add_parser("show", help="metadata and per-domain error of one run")
    p_show.add_argument("run", help="run id or a unique prefix of one")
    _add_filters(p_show)
    p_cmp = sub.add_parser("compare", help="method x domain error table")
    p_cmp.add_argument("runs", nargs="*", help="run ids or unique prefixes (default: every run the filters keep)")
    _add_filters(p_cmp)
    args = parser.parse_args(argv)
    try:
        return {"list": _cmd_list, "show": _cmd_show, "compare": _cmd_compare}[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
