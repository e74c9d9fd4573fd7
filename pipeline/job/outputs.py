"""Run-directory outputs: atomic Parquet parts (columns from ttt/schema.py), the chunk commits
that are the unit of resume, run.json / summary.json writes.

A shard's chunks are written under temporary names and renamed, then its checkpoint, then a
commit marker that carries the run's fingerprint (config hash + input content); a rerun goes on
from each shard's last commit with the same fingerprint (DESIGN.md, Outputs).
"""
from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job.metrics import add_metrics
from pipeline.job.protocol import streams_text
from ttt.schema import LENS_SCHEMA, UnknownColumnError, results_schema, to_table

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """The run's output could not be written for lack of space; one line, resumable."""


class RunFailed(RuntimeError):
    """A run the job gave up on (a shard's worker died `workers.max_shard_attempts` times, or no
    row was done for `workers.stall_timeout_s`): run.json says failed, and a rerun with the same
    run_id goes on from each shard's last commit. The message is one line."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:  # at start (run.json) as mid-run: one line
            raise DiskFullError(f"no space left writing {path} ({exc.strerror}); "
                                "free space and rerun with the same run_id to resume") from None
        raise


def write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def marker_path(run_dir: Path, shard: int) -> Path:
    return run_dir / "results" / f"_SUCCESS-{shard:05d}.json"


@dataclass(frozen=True)
class PartColumns:
    """The columns of a run's parts, fixed by its config when it starts, so that every part of the run
    (each chunk, a resumed shard's, one without an adapted batch) has the same schema: the analysis
    columns of the method that runs (its `analysis_columns`) and whether results keep `probs`
    (`pipeline.job.record.part_columns` makes it from a config; here no torch is imported)."""

    analysis: pa.Schema
    probs: bool = False
    method: str = ""  # ttt.method, for the error a record with an undeclared field gets

    def results(self, rows: Iterable[dict[str, Any]]) -> pa.Schema:
        return results_schema(rows, probs=self.probs)

    def tables(self, rows: dict[str, Any]) -> list[tuple[str, pa.Table]]:
        """(folder, table) of each part a chunk of rows writes: results, analysis, and lens when it has rows."""
        try:
            analysis = to_table(rows["analysis"], self.analysis, "analysis")
        except UnknownColumnError as exc:  # say whose declaration lacks it, and where it goes
            raise UnknownColumnError(f"ttt.method={self.method}: {exc.args[0]}; a method declares the analysis "
                                     "columns it fills in its class's `analysis_columns`") from None
        tables = [("results", to_table(rows["results"], self.results(rows["results"]), "results")),
                  ("analysis", analysis)]
        if rows.get("lens"):
            tables.append(("lens", to_table(rows["lens"], LENS_SCHEMA, "lens")))
        return tables


def write_shard(run_dir: Path, shard: int, rows: dict[str, list[dict[str, Any]]], config_hash: str,
                columns: PartColumns) -> None:
    """Write a shard's results and analysis parts (and its logit-lens part, when it has one),
    then the marker that makes the shard count as done."""
    results = rows["results"]
    tables = columns.tables(rows)
    for sub, table in tables:
        _write_part(run_dir / sub, part_name(shard), table)
    write_json(marker_path(run_dir, shard), {"shard": shard, "rows": len(results), "config_hash": config_hash})


# -- chunked shards: the job's unit of commit and resume ------------------------------------
def chunk_part_name(shard: int, chunk: int) -> str:
    return f"part-{shard:05d}-{chunk:05d}.parquet"


def commit_path(run_dir: Path, shard: int) -> Path:
    return run_dir / "results" / f"_COMMIT-{shard:05d}.json"


def _write_part(folder: Path, name: str, table: pa.Table) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, folder / name)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written part behind
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise DiskFullError(f"no space left writing {folder / name} ({exc.strerror}); "
                                "free space and rerun with the same run_id to resume") from None
        raise


def commit_chunk(run_dir: Path, chunk: dict[str, Any], previous: dict[str, Any] | None, fingerprint: str,
                 columns: PartColumns) -> dict[str, Any]:
    """Commit one streamed chunk of a shard: its parts, then its checkpoint, then the marker that
    makes them count (each under a temporary name, renamed). A crash at any point leaves the
    previous commit in force; what was written after it is removed on resume. Returns the commit."""
    shard = chunk["shard"]
    index = 0 if previous is None else previous["chunk"] + 1
    name = chunk_part_name(shard, index)
    results = chunk["results"]
    for sub, table in columns.tables(chunk):
        _write_part(run_dir / sub, name, table)
    state_name = None
    if chunk.get("method_state") is not None:
        state_name = f"shard-{shard:05d}-{index:05d}.pt"
        (run_dir / "state").mkdir(exist_ok=True)
        tmp = run_dir / "state" / f".{state_name}.tmp"
        try:
            tmp.write_bytes(chunk["method_state"])
            os.replace(tmp, run_dir / "state" / state_name)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                raise DiskFullError(f"no space left writing {run_dir / 'state' / state_name}; free space and "
                                    "rerun with the same run_id to resume") from None
            raise
    commit = {"shard": shard, "chunk": index, "rows": (previous or {}).get("rows", 0) + len(results),
              "offset": chunk["offset"], "batch_index": chunk["batch_index"], "prev_domain": chunk["prev_domain"],
              "done": bool(chunk["done"]), "state": state_name, "node": chunk.get("node"), "config_hash": fingerprint,
              "memory": chunk.get("memory")}
    write_json(commit_path(run_dir, shard), commit)
    if previous is not None and previous.get("state") and previous["state"] != state_name:
        (run_dir / "state" / previous["state"]).unlink(missing_ok=True)
    return commit


def committed_shards(run_dir: Path, fingerprint: str,
                     warn: Callable[[str], None] | None = None) -> dict[int, dict[str, Any]]:
    """Each shard's last commit that carries `fingerprint` and whose parts read back with the
    committed row count. Everything not covered by such a commit (parts of later chunks, parts of
    a shard whose commit does not hold, stale checkpoints, temporary files) is removed, so the
    shard goes on from that commit (or from its first row) and no row is written twice; `warn`
    hears of each commit dropped, and why."""
    commits: dict[int, dict[str, Any]] = {}
    for marker in (run_dir / "results").glob("_COMMIT-*.json"):
        try:
            info = json.loads(marker.read_text())
            shard = int(info["shard"])
        except (OSError, ValueError, KeyError, TypeError):
            marker.unlink(missing_ok=True)
            if warn is not None:
                warn(f"WARNING: {marker} is unreadable: dropped, its shard starts again from its first row")
            continue
        if info.get("config_hash") != fingerprint:
            why = "it was written for another config or other inputs"
        elif not (info.get("state") is None or (run_dir / "state" / info["state"]).is_file()):
            why = f"its checkpoint state/{info['state']} is missing"
        elif not _chunks_read_back(run_dir, shard, info):
            why = "its parts do not read back with the committed row count (a part is missing or damaged)"
        else:
            commits[shard] = info
            continue
        marker.unlink(missing_ok=True)
        if warn is not None:
            warn(f"WARNING: the commit of shard {shard} ({marker.name}, row {info.get('offset')}) does not hold: "
                 f"{why}; the shard starts again from its first row")
    _remove_uncommitted(run_dir, commits)
    return commits


def _chunks_read_back(run_dir: Path, shard: int, info: dict[str, Any]) -> bool:
    try:
        rows = 0
        for index in range(info["chunk"] + 1):
            name = chunk_part_name(shard, index)
            rows += pq.read_metadata(run_dir / "results" / name).num_rows
            pq.read_metadata(run_dir / "analysis" / name)
            if (run_dir / "lens" / name).exists():
                pq.read_metadata(run_dir / "lens" / name)
    except (OSError, pa.ArrowException):
        return False
    return rows == info.get("rows")


def _remove_uncommitted(run_dir: Path, commits: dict[int, dict[str, Any]]) -> None:
    for sub in ("results", "analysis", "lens"):
        for part in (run_dir / sub).glob("part-*-*.parquet"):
            shard, chunk = (int(x) for x in part.stem.split("-")[1:3])
            if shard not in commits or chunk > commits[shard]["chunk"]:
                part.unlink()
        for tmp in (run_dir / sub).glob(".*.tmp"):
            tmp.unlink()
    keep = {c["state"] for c in commits.values() if c.get("state")}
    for f in (run_dir / "state").glob("*"):
        if f.name not in keep:
            f.unlink()


def load_state(run_dir: Path, commit: dict[str, Any] | None) -> bytes | None:
    """The committed checkpoint a shard resumes from (None: from the source model)."""
    if commit is None or not commit.get("state"):
        return None
    return (run_dir / "state" / commit["state"]).read_bytes()


SUMMARY_COLUMNS = ("domain", "correct", "error", "nll", "n_bytes")  # all that summarise_run reads


def summarise_run(run_dir: Path, stream_protocol: dict[str, Any] | None = None) -> dict[str, Any]:
    """Headline metrics overall and per domain: error over rows with a label and a prediction;
    for LM rows also bits per byte, pooled over bytes (sum of nll / sum of bytes), as the
    TTT-NN paper reports it. `stream_protocol` (run.json's `protocol`) heads the summary's
    `protocol`, beside what the rows measured of it. Aggregated part by part over the five columns it needs: a 1.5M-row
    run's results read whole took the driver from 0.7 to 1.9 GB at the end of the run."""
    scored: dict[str, list[int]] = {}  # domain -> [rows scored, rows wrong], in order of appearance
    pooled: dict[str, list[float]] = {}  # domain -> [rows without error, sum nll, sum bytes] (LM rows)
    n = n_scored = n_wrong = error_rows = 0
    lm, lm_total = False, [0, 0.0, 0.0]  # every row without error, with or without a domain
    for part in sorted((run_dir / "results").glob("*.parquet")):
        parquet = pq.ParquetFile(part)
        columns = [c for c in SUMMARY_COLUMNS if c in parquet.schema_arrow.names]
        lm = lm or "nll" in columns
        for batch in parquet.iter_batches(columns=columns):
            df = batch.to_pandas()
            n += len(df)
            error_rows += int(df["error"].notna().sum())
            rated = df[df["correct"].notna()]
            n_scored += len(rated)
            n_wrong += int((~rated["correct"].astype(bool)).sum())
            for domain, group in rated.groupby("domain", sort=False):
                acc = scored.setdefault(str(domain), [0, 0])
                acc[0] += len(group)
                acc[1] += int((~group["correct"].astype(bool)).sum())
            if "nll" in df.columns:
                ok = df[df["error"].isna()]
                lm_total[0] += len(ok)
                lm_total[1] += float(ok["nll"].sum())
                lm_total[2] += float(ok["n_bytes"].sum())
                for domain, group in ok.groupby("domain", sort=False):
                    acc = pooled.setdefault(str(domain), [0, 0.0, 0.0])
                    acc[0] += len(group)
                    acc[1] += float(group["nll"].sum())
                    acc[2] += float(group["n_bytes"].sum())
    per_domain: dict[str, dict[str, Any]] = {d: {"n": k, "error": wrong / k} for d, (k, wrong) in scored.items()}
    for domain, (k, nll, n_bytes) in pooled.items():
        per_domain.setdefault(domain, {"n": k, "error": None})["bits_per_byte"] = _bits_per_byte(nll, n_bytes)
    overall_err = n_wrong / n_scored if n_scored else None
    out = {
        "overall": {"n": n, "scored": n_scored, "error": overall_err,
                    "accuracy": None if overall_err is None else 1.0 - overall_err, "errors_rows": error_rows},
        "per_domain": per_domain,
    }
    if lm:
        out["overall"]["bits_per_byte"] = _bits_per_byte(lm_total[1], lm_total[2]) if lm_total[0] else None
    out["workers"] = worker_memory(run_dir)
    return add_metrics(run_dir, out, stream_protocol)  # calibration per domain and overall, cost, protocol (pipeline/job/metrics.py)


def worker_memory(run_dir: Path) -> list[dict[str, Any]]:
    """Per worker that served the run: its process's peak RSS and (CUDA) peak GPU memory, in MiB,
    the highest its shards' last commits recorded."""
    peaks: dict[str, dict[str, Any]] = {}
    for marker in sorted((run_dir / "results").glob("_COMMIT-*.json")):
        try:
            mem = json.loads(marker.read_text()).get("memory")
        except (OSError, ValueError):
            continue
        if not isinstance(mem, dict) or not mem.get("worker"):
            continue
        seen = peaks.setdefault(mem["worker"], {"worker": mem["worker"], "peak_rss_mb": None, "peak_gpu_mb": None})
        for key in ("peak_rss_mb", "peak_gpu_mb"):
            if mem.get(key) is not None:
                seen[key] = max(seen[key] or 0.0, float(mem[key]))
    return list(peaks.values())


def _bits_per_byte(nll: float, n_bytes: float) -> float:
    return float(nll / (n_bytes * math.log(2)))


LOG_FIELDS = ("shard", "batch_index", "domain", "losses", "steps", "stop_reason", "class_entropy",
              "max_class_prob", "unique_classes", "diversity_weight", "grad_norm", "mask_ratio", "used_cache",
              "timing_total")


def append_log(path: Path, analysis: list[dict[str, Any]]) -> None:
    """`ttt.log_out`: a lightweight JSON-lines log beside the Parquet, one line per adapted batch,
    appended as each shard lands, so `tail -f` shows a long run's adaptation as it goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for rec in analysis:
            fh.write(json.dumps({k: rec.get(k) for k in LOG_FIELDS}, default=float) + "\n")


def format_summary(run_dir: Path) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    lm = summary["overall"].get("bits_per_byte") is not None
    lines = [f"run {info['run_id']}  method={info['method']}  predict_from={info['predict_from']}",
             f"{'domain':<16}{'n':>7}{'error %':>10}" + (f"{'bits/byte':>11}" if lm else "")]
    for domain, d in summary["per_domain"].items():
        err = "-" if d["error"] is None else f"{100 * d['error']:.2f}"
        lines.append(f"{domain:<16}{d['n']:>7}{err:>10}" + (f"{d.get('bits_per_byte', float('nan')):>11.4f}" if lm else ""))
    per = [d["error"] for d in summary["per_domain"].values() if d["error"] is not None]
    if per:
        lines.append(f"{'mean':<16}{'':>7}{100 * sum(per) / len(per):>10.2f}  (mean over domains, each domain "
                     "weighs the same)")
    o = summary["overall"]
    if o.get("bits_per_byte") is not None:
        lines.append(f"bits per byte {o['bits_per_byte']:.4f} (all scored bytes)")
    lines.append(f"rows {o['n']}, error rows {o['errors_rows']}, {summary['throughput']['samples_per_s'] or 0:.2f} samples/s")
    if summary.get("cache"):
        c = summary["cache"]
        lines.append(f"adapter cache: hit rate {c['hit_rate']:.2f} ({c['hits']} hits, {c['misses']} misses, "
                     f"{c['evictions']} evictions)")
    lines.append(f"streams:  {streams_text(summary.get('protocol') or info.get('protocol'))}")
    lines += [f"WARNING: {w}" for w in summary.get("warnings") or []]
    lines.append(f"run dir:  {run_dir.resolve()}")
    lines.append(f"results:  {(run_dir / 'results').resolve()}")
    lines.append(f"analysis: {(run_dir / 'analysis').resolve()}")
    return "\n".join(lines)
