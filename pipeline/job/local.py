"""Ray-free mode: one config run in this process, one stream, on the job's own adapters, methods,
decoding and stream loop, for notebooks and debugging (a breakpoint in a method stops here).

    from pipeline.config import load_config
    from pipeline.job.local import run_local
    out = run_local(load_config("configs/mnistc_tent.yaml", ["data.limit=600"]))
    out.results.groupby("domain")["correct"].mean()

`python -m pipeline run CONFIG --local` does the same from a shell. The rows equal those of the
Ray job with `workers.num_shards=1` (tests/test_local.py checks it): the same start-up checks
(`prepare_run`), the same decode function per block (`inputs.prepare_block`, the same block
ranges), the same seed and the same loop (`workers.stream.stream_chunks`). What differs: no
actors, so `nn` uses the KB and adapter cache in-process, and no chunked commits: the run directory
(written unless `write=False`) holds one part per kind, run.json and summary.json as a job's do,
so `report` and `runs` read it; a rerun with the same run_id is refused rather than resumed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.job.checks import in_process_services, prepare_run
from pipeline.job.fingerprint import inputs_fingerprint
from pipeline.job.inputs import InputSpec, block_ranges, block_rows, count_rows, prepare_block
from pipeline.job.outputs import RunFailed, summarise_run, write_json, write_shard
from pipeline.job.protocol import finish_checks
from pipeline.job.provenance import new_run_id
from pipeline.job.record import part_columns, run_info
from ttt import TTTConfig, build_method
from workers.stream import stream_chunks
from workers.ttt_worker import build_adapter


@dataclass
class LocalRun:
    """What `run_local` gives: the rows as frames (results in stream order), and the run directory."""

    results: pd.DataFrame
    analysis: pd.DataFrame
    run_dir: Path | None
    summary: dict[str, Any]


def local_rows(cfg: RunConfig, facts: dict[str, Any]):
    """The manifest's rows decoded block by block exactly as the job's Ray Data operators decode them."""
    inputs = InputSpec(manifest=cfg.data.manifest, kind=cfg.model.kind, model=cfg.model.model_dump(),
                       num_classes=facts.get("num_classes"), read_timeout_s=cfg.data.read_timeout_s,
                       rows_per_block=cfg.workers.rows_per_block)
    n_rows = count_rows(cfg.data.manifest, cfg.data.limit)
    for r in block_ranges(0, n_rows, block_rows(inputs)):
        yield from prepare_block({"lo": np.array([r["lo"]]), "hi": np.array([r["hi"]])}, inputs=inputs).to_pylist()


def run_local(cfg: RunConfig, *, write: bool = True, log: Any = print) -> LocalRun:
    """Run `cfg` in-process as one stream (workers.num_shards is taken as 1)."""
    cfg = cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"num_shards": 1})})
    cfg, facts = prepare_run(cfg, log)
    run_id = cfg.run_id or new_run_id(cfg.ttt.method)
    run_dir = Path(cfg.output_root) / run_id if write else None
    if run_dir is not None and (run_dir / "run.json").exists():
        raise ConfigError(f"run directory {run_dir} exists: local runs do not resume; choose another run_id")
    torch.set_num_threads(cfg.workers.torch_threads)
    torch.manual_seed(cfg.ttt.seed)  # as a worker does when it is configured and when a shard starts
    adapter = build_adapter(cfg.model.model_dump(), "cpu", threads=cfg.workers.torch_threads,
                            read_timeout_s=cfg.data.read_timeout_s)
    method = build_method(adapter, TTTConfig.model_validate(cfg.ttt.model_dump()), in_process_services(cfg))
    torch.manual_seed(cfg.ttt.seed)
    t0 = time.perf_counter()
    (out,) = stream_chunks(adapter, method, local_rows(cfg, facts), run_id=run_id, shard=0, worker="local",
                           precision=cfg.workers.precision, save_probs=cfg.outputs.save_probs)
    out.pop("state")
    columns = part_columns(cfg)
    tables = dict(columns.tables(out))  # the frames below hold the columns and types of the Parquet parts
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = {}
    if run_dir is not None:
        info = run_info(cfg.model_copy(update={"run_id": run_id}), run_id, {"CPU": float(os.cpu_count() or 1)},
                        inputs_fingerprint(cfg.data.manifest, cfg.model.model_dump()))
        info["mode"] = "local"
        run_dir.mkdir(parents=True, exist_ok=True)
        write_shard(run_dir, 0, out, cfg.config_hash(), columns)
        summary = summarise_run(run_dir, info["protocol"])
        summary["throughput"] = {"wall_s": wall, "rows_processed": len(out["results"]),
                                 "samples_per_s": len(out["results"]) / wall if wall > 0 else None}
        failure, summary["warnings"] = finish_checks(run_dir, cfg, summary, info["predict_from"])
        summary["cache"] = None
        write_json(run_dir / "summary.json", summary)
        info["counts"].update(rows=summary["overall"]["n"], errors=summary["overall"]["errors_rows"], shards=1)
        info.update(status="failed" if failure else "finished", error=failure, output_dir=str(run_dir.resolve()),
                    ended_at=pd.Timestamp.now(tz="UTC").isoformat())
        write_json(run_dir / "run.json", info)
        if failure:
            raise RunFailed(f"run {run_id}: {failure}")
        for warning in summary["warnings"]:
            log(f"WARNING: {warning}")
    return LocalRun(tables["results"].to_pandas(), tables["analysis"].to_pandas(), run_dir, summary)
