"""Tidy rows for a pivot: the run-level facts the registry adds to every result / analysis row at
read time, so a notebook pivots several runs' rows without joining run.json by hand.

Why at read time: these facts are properties of a run (its run.json), not of a row, so the rows on
disk stay what ttt/schema.py declares and every run, old or new, gets them the same way. Per row:
- `setting`: the evaluation setting the run's manifest was written with (`manifest_setting`);
- `model` and `method`: as run.json names them; `seed`: the config's `ttt.seed`;
- every config field (dotted, e.g. `ttt.lr`) whose value differs among the selected runs
  (`varying_fields`; `run_id`, `ttt.seed` and `ttt.method` have their own columns);
- `corruption` and `severity` (rows with a `domain`): the row's own columns, which the stream
  passes through from the manifest when it has them, else parsed from a `<name>-<int>` domain
  (`fog-5`), else null (`parse_domain`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from pipeline.manifest import read_manifest_meta

MISSING = object()
RUN_COLUMNS = ("setting", "model", "method", "seed")  # per run, from run.json
DOMAIN_COLUMNS = ("corruption", "severity")  # per row: stored, else parsed from `domain`
OWN_COLUMN = {"run_id": "run_id", "ttt.seed": "seed", "ttt.method": "method"}  # not repeated as config fields
_DOMAIN = re.compile(r"^(?P<name>.+)-(?P<severity>\d+)$")


def dotted(mapping: Any, key: str) -> Any:
    """mapping["a"]["b"] for "a.b"; MISSING where a part is absent."""
    for part in key.split("."):
        if not isinstance(mapping, Mapping) or part not in mapping:
            return MISSING
        mapping = mapping[part]
    return mapping


def manifest_setting(meta: dict[str, Any]) -> str | None:
    """The evaluation setting a run's manifest was written with (pipeline.benchmarks.settings), if it
    says: from run.json's record of the manifest's metadata (so a moved manifest still answers),
    else read from the manifest itself (runs written before run.json kept it)."""
    recorded = meta.get("manifest_meta")
    if isinstance(recorded, dict):
        return recorded.get("setting")
    manifest = dotted(meta.get("config"), "data.manifest")
    if not isinstance(manifest, str):
        return None
    try:
        return read_manifest_meta(manifest).get("setting")
    except (OSError, ValueError):
        return None


def run_facts(meta: dict[str, Any]) -> dict[str, Any]:
    seed = dotted(meta.get("config"), "ttt.seed")
    return {"setting": manifest_setting(meta), "model": meta.get("model"), "method": meta.get("method"),
            "seed": None if seed is MISSING else seed}


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved config as {dotted name: leaf value}; lists become tuples (hashable: a pivot can group
    by them), empty sections contribute nothing."""
    out: dict[str, Any] = {}
    for key, value in (tree or {}).items() if isinstance(tree, Mapping) else ():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def varying_fields(metas: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """{dotted config field: its value in each run} for the fields whose value differs among the runs
    (a field a run's config lacks counts as None), in the order the configs name them."""
    flats = [flat_config(m.get("config")) for m in metas]
    names = list(dict.fromkeys(name for flat in flats for name in flat))
    out = {}
    for name in names:
        if name in OWN_COLUMN:
            continue
        values = [flat.get(name) for flat in flats]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            out[name] = values
    return out


def parse_domain(domain: Any) -> tuple[str | None, int | None]:
    """(corruption, severity) of a `<name>-<int>` domain (the benchmark layouts' `fog-5`); else (None, None)."""
    match = _DOMAIN.match(domain) if isinstance(domain, str) else None
    return (match["name"], int(match["severity"])) if match else (None, None)


def fill_domain_columns(frame: pd.DataFrame, domains: pd.Series) -> None:
    """`corruption` / `severity` in place: each row's stored value, else parsed from its domain."""
    parsed = {d: parse_domain(d) for d in domains.dropna().unique()}
    for i, name in enumerate(DOMAIN_COLUMNS):
        derived = domains.map(lambda d, i=i: parsed.get(d, (None, None))[i])
        stored = frame[name] if name in frame else pd.Series(None, index=frame.index, dtype=object)
        filled = stored.where(stored.notna(), derived)
        frame[name] = filled.astype("Int64") if name == "severity" else filled.astype(object)


def derived_columns(metas: Sequence[dict[str, Any]], stored: Sequence[str]) -> list[str]:
    """The columns the registry adds to rows whose stored columns are `stored`, in the order it adds them."""
    names = [c for c in DOMAIN_COLUMNS if "domain" in stored and c not in stored]
    names += [c for c in RUN_COLUMNS if c not in stored]
    return names + [c for c in varying_fields(metas) if c not in stored]


def add_run_columns(frame: pd.DataFrame, metas: Sequence[dict[str, Any]], wanted: Sequence[str],
                    run_ids: pd.Series, domains: pd.Series | None) -> None:
    """Add the `wanted` derived columns to `frame` in place; each row finds its run by `run_ids`."""
    if domains is not None and any(c in wanted for c in DOMAIN_COLUMNS):
        fill_domain_columns(frame, domains)
    by_run = {m.get("run_id"): run_facts(m) for m in metas}
    for name in RUN_COLUMNS:
        if name in wanted:
            frame[name] = run_ids.map({rid: f[name] for rid, f in by_run.items()})
    varying = varying_fields(metas)
    for name in wanted:
        if name in varying:
            values = dict(zip((m.get("run_id") for m in metas), varying[name]))
            frame[name] = run_ids.map(lambda rid, values=values: values.get(rid))
