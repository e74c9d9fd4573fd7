"""Run registry: select run directories by their metadata, load them, compare them, tidy them.

Why: every run is a self-describing directory (DESIGN.md, "Outputs: one directory per run"),
so the directory tree under the output root is the database, in the spirit of easyroutine's
ActivationSaver/Loader. A notebook asks `query_runs(root, method="tent")` and gets a RunSet;
`python -m pipeline runs list|show|compare` (pipeline/analysis/runs_cli.py) prints the same
selections as tables.

Reading many runs' Parquet is one pyarrow dataset scan over the part files of all selected
runs: one scan plans the I/O and reads in parallel, and runs whose schemas differ (LM runs add
columns) come back as one frame with nulls where a column does not apply.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.analysis.tidy import (
    DOMAIN_COLUMNS,
    MISSING,
    add_run_columns,
    derived_columns,
    dotted,
    manifest_setting,
    run_facts,
    varying_fields,
)
from pipeline.job.outputs import write_json

# Run identity and provenance live in pipeline.job.provenance (the job imports them from there); they are
# re-exported so a notebook finds every run-registry helper in one module.
from pipeline.job.provenance import git_commit, new_run_id, package_versions
from ttt.schema import ANALYSIS_SCHEMA, LENS_SCHEMA, PROBES_SCHEMA, RESULTS_SCHEMA

__all__ = ["RunSet", "query_runs", "run_labels", "manifest_setting", "new_run_id", "git_commit", "package_versions"]

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
KINDS = {"results": RESULTS_SCHEMA, "analysis": ANALYSIS_SCHEMA, "lens": LENS_SCHEMA, "probes": PROBES_SCHEMA}


def _read_run_json(run_dir: Path) -> dict[str, Any]:
    meta = json.loads((run_dir / RUN_FILE).read_text())
    if not isinstance(meta, dict) or not meta.get("run_id"):
        raise ValueError("run.json holds no run_id")
    return meta


def _part_files(run_dir: Path, kind: str) -> list[Path]:
    # Only committed parts: temporary `.part-*.tmp` files and `_SUCCESS-*` markers are skipped.
    return sorted((run_dir / kind).glob("part-*.parquet"))


def _as_utc(value: datetime | str) -> datetime:
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    # Run timestamps are written in UTC; a naive `since` is read as UTC too.
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _started(meta: dict[str, Any]) -> datetime | None:
    try:
        return _as_utc(meta["started_at"])
    except (KeyError, TypeError, ValueError):
        return None


def _value_matches(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, (list, tuple, set, frozenset)):
        return any(_value_matches(actual, w) for w in wanted)
    if isinstance(wanted, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        # 1e-3 given in Python and 0.001 read back from JSON are the same setting.
        return math.isclose(actual, wanted, rel_tol=1e-9, abs_tol=0.0)
    return actual == wanted


class RunSet:
    """An ordered selection of run directories (oldest first). Indexing gives run.json's dict.

    `results()`, `analysis()`, `lens()` and `probes()` give tidy rows: the stored columns (ttt/schema.py)
    plus, added at read time from each row's run.json (pipeline/analysis/tidy.py), `setting` (the
    manifest's), `model`, `method`, `seed` (ttt.seed) and every config field whose value differs
    among the selected runs, by its dotted name (`ttt.lr`); rows with a `domain` also get `corruption`
    and `severity` (the manifest's columns, else parsed from a `<name>-<int>` domain, else null). So
    `runs.results().pivot_table("correct", "corruption", ["method", "ttt.lr"])` needs no join.
    `columns=[...]` may name any of them; `schema(kind)` is the stored columns only. `to_frame()` is
    one row per run with the same run-level columns.
    """

    def __init__(self, runs: Iterable[tuple[Path, dict[str, Any]]] = ()):
        self._runs: list[tuple[Path, dict[str, Any]]] = list(runs)

    @classmethod
    def from_dirs(cls, run_dirs: Iterable[str | Path]) -> RunSet:
        """Open named run directories in the order given; a missing or corrupt run.json raises."""
        runs = []
        for run_dir in map(Path, run_dirs):
            try:
                runs.append((run_dir, _read_run_json(run_dir)))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{run_dir} is not a readable run directory: {exc}") from None
        return cls(runs)

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (meta for _, meta in self._runs)

    def __getitem__(self, index: int | slice) -> dict[str, Any] | RunSet:
        if isinstance(index, slice):
            return RunSet(self._runs[index])
        return self._runs[index][1]

    def __repr__(self) -> str:
        return f"RunSet({len(self)} runs: {', '.join(self.run_ids[:3])}{', ...' if len(self) > 3 else ''})"

    @property
    def run_ids(self) -> list[str]:
        return [meta["run_id"] for _, meta in self._runs]

    def path(self, index: int) -> Path:
        return self._runs[index][0]

    def summary(self, index: int) -> dict[str, Any] | None:
        """summary.json of one run; None while a run has none (running, failed) or it is unreadable."""
        try:
            return json.loads((self.path(index) / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            return None

    def schema(self, kind: str = "results") -> pa.Schema:
        """The unified schema of all selected runs' `kind` parts (footers only, no data read)."""
        files = self._files(kind)
        if not files:
            return KINDS[kind]
        # Permissive: an int32 column in one part and int64 in another become one int64 column.
        return pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")

    def results(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All selected runs' result rows, in run order then shard order, in one dataset scan."""
        return self._scan("results", columns)

    def analysis(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All selected runs' analysis rows, in run order then shard order, in one dataset scan."""
        return self._scan("analysis", columns)

    def lens(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All selected runs' logit-lens rows (causal-LM nn runs with nn.logit_lens_top_k > 0):
        one row per (sample, stage before/after, layer, rank)."""
        return self._scan("lens", columns)

    def probes(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All selected runs' probe rows (probes.every > 0): error / ECE of each committed state on the
        clean set and each domain's sample, by shard and stream position (pipeline/job/probes.py)."""
        return self._scan("probes", columns)

    def load(self, index: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
        """(results, analysis, run.json metadata) of one run."""
        one = RunSet([self._runs[index]])
        return one.results(), one.analysis(), dict(self._runs[index][1])

    def to_frame(self) -> pd.DataFrame:
        """One row per run: metadata and headline metrics from summary.json, the run's `setting` and
        `seed`, the config fields that differ among the runs (dotted names), `error/<domain>` columns."""
        rows = []
        metas = list(self)
        varying = varying_fields(metas)
        for i, meta in enumerate(metas):
            summary = self.summary(i) or {}
            overall = summary.get("overall") or {}
            facts = run_facts(meta)
            row = {"run_id": meta.get("run_id"), "experiment": meta.get("experiment"), "tag": meta.get("tag"),
                   "method": meta.get("method"), "model": meta.get("model"), "dataset": meta.get("dataset"),
                   "status": meta.get("status"), "started_at": _started(meta),
                   "n": overall.get("n"), "error": overall.get("error"),
                   "setting": facts["setting"], "seed": facts["seed"]}
            row.update({name: values[i] for name, values in varying.items() if name not in row})
            if overall.get("bits_per_byte") is not None:
                row["bits_per_byte"] = overall["bits_per_byte"]
            for domain, stats in (summary.get("per_domain") or {}).items():
                row[f"error/{domain}"] = (stats or {}).get("error")
                if (stats or {}).get("bits_per_byte") is not None:
                    row[f"bits_per_byte/{domain}"] = stats["bits_per_byte"]
            rows.append(row)
        head = ["run_id", "experiment", "tag", "method", "model", "dataset", "status", "started_at", "n", "error"]
        frame = pd.DataFrame(rows, columns=None if rows else head)
        frame["started_at"] = pd.to_datetime(frame["started_at"], utc=True)
        for col in ("n", "error"):
            frame[col] = pd.to_numeric(frame[col])
        return frame

    def remove(self, index: int) -> None:
        """Delete one run's directory from disk and drop it from this set."""
        run_dir, _ = self._runs.pop(index)
        shutil.rmtree(run_dir)

    def rename_experiment(self, index: int, name: str) -> None:
        """Move one run to another experiment by rewriting run.json atomically.

        Only the top-level `experiment` changes: `config` stays the record of what ran, so its
        config_hash still matches and a resume into this directory still works. A run that is
        still running writes run.json once more when it ends, so rename runs that have ended.
        """
        run_dir, _ = self._runs[index]
        meta = _read_run_json(run_dir)  # re-read: the file is the truth, not this set's copy
        meta["experiment"] = name
        write_json(run_dir / RUN_FILE, meta)
        self._runs[index] = (run_dir, meta)

    def _files(self, kind: str) -> list[Path]:
        if kind not in KINDS:
            raise ValueError(f"unknown part kind {kind!r}: expected one of {sorted(KINDS)}")
        return [f for run_dir, _ in self._runs for f in _part_files(run_dir, kind)]

    def _scan(self, kind: str, columns: list[str] | None) -> pd.DataFrame:
        files = self._files(kind)
        schema = self.schema(kind)
        metas = list(self)
        available = schema.names + derived_columns(metas, schema.names)
        if columns is not None:
            unknown = [c for c in columns if c not in available]
            if unknown:
                raise ValueError(f"no {kind} column(s) {unknown}; available: {available}")
        wanted = list(dict.fromkeys(columns if columns is not None else available))
        # what is added at read time: run-level columns, and corruption / severity filled from the domain
        fill = [c for c in DOMAIN_COLUMNS if c in wanted] if "domain" in schema.names else []
        add = [c for c in wanted if c not in schema.names] + [c for c in fill if c in schema.names]
        read = [c for c in wanted if c in schema.names]
        if set(add) - set(DOMAIN_COLUMNS):  # run-level columns: each row finds its run by its run_id
            read.append("run_id")
        if fill:
            read.append("domain")
        read = list(dict.fromkeys(read))
        if files:
            table = ds.dataset([str(f) for f in files], schema=schema, format="parquet").to_table(columns=read)
        else:
            table = schema.empty_table().select(read)
        frame = table.to_pandas()
        if add:
            add_run_columns(frame, metas, add, frame.get("run_id"), frame["domain"] if fill else None)
        return frame[wanted]


def query_runs(root: str | Path = "runs", experiment: str | Iterable[str] | None = None,
               model: str | Iterable[str] | None = None, method: str | Iterable[str] | None = None,
               tag: str | Iterable[str] | None = None, status: str | Iterable[str] | None = None,
               since: datetime | str | None = None, config: dict[str, Any] | None = None) -> RunSet:
    """Runs under `root` matching every filter given, oldest first.

    String filters match run.json's top-level field exactly (a list matches any of its values);
    `config` maps dotted paths into the resolved config to values (`{"ttt.lr": 1e-3}`); `since`
    keeps runs started at or after it (datetime or ISO string, naive means UTC). Directories
    with an unreadable run.json are skipped with a warning; those without one are not runs.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs root {root} is not a directory")
    fields = {"experiment": experiment, "model": model, "method": method, "tag": tag, "status": status}
    since_utc = None if since is None else _as_utc(since)
    found = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (run_dir / RUN_FILE).exists():  # not a run directory (an MLflow store, a notebook's folder)
            continue
        try:
            meta = _read_run_json(run_dir)
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping {run_dir}: unreadable {RUN_FILE} ({exc})", stacklevel=2)
            continue
        if any(w is not None and not _value_matches(meta.get(k), w) for k, w in fields.items()):
            continue
        if since_utc is not None and ((started := _started(meta)) is None or started < since_utc):
            continue
        if config and not all(_value_matches(dotted(meta.get("config"), k), v) for k, v in config.items()):
            continue
        found.append((run_dir, meta))
    # The directory name is the run id, which sorts by start time; started_at decides first
    # so renamed or copied directories still order by when they ran.
    epoch = datetime.min.replace(tzinfo=UTC)
    found.sort(key=lambda r: (_started(r[1]) or epoch, r[1]["run_id"]))
    return RunSet(found)


LABEL_FIELDS: tuple[tuple[str, str], ...] = (
    ("setting", "setting"), ("seed", "ttt.seed"), ("data seed", "data.seed"), ("lr", "ttt.lr"),
    ("steps", "ttt.steps"), ("batch", "ttt.batch_size"), ("severity", "data.severity"),
)


def _label_fact(meta: dict[str, Any], field: str) -> Any:
    if field == "setting":
        return manifest_setting(meta)
    value = dotted(meta.get("config"), field)
    return None if value is MISSING else value


def run_labels(runs: RunSet) -> list[str]:
    """Readable row labels: the method, then each of LABEL_FIELDS (setting, seed, lr, ...) whose value
    differs among the runs; the tag, then the full run id, only where labels still repeat."""
    metas = list(runs)
    labels = [str(m.get("method")) for m in metas]
    for name, field in LABEL_FIELDS:
        values = [_label_fact(m, field) for m in metas]
        if len({json.dumps(v, default=str) for v in values}) > 1:
            labels = [lab if v is None else f"{lab} {name} {v}" for lab, v in zip(labels, values)]
    labels = [lab if labels.count(lab) == 1 or not m.get("tag") else f"{lab} ({m['tag']})"
              for lab, m in zip(labels, metas)]
    # Still the same twice: the full run id, which is unique.
    return [lab if labels.count(lab) == 1 else f"{lab} {m['run_id']}" for lab, m in zip(labels, metas)]
