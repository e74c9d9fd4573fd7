"""The Ray-free mode against the Ray job, and the job's end-of-run refusals and notes (issue 23)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.job.local import run_local
from pipeline.job.outputs import RunFailed
from pipeline.job.runner import run_job

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(small_default, tmp_path: Path, *overrides: str, config: str = "mnistc_tent.yaml"):
    base = [f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
            f"output_root={tmp_path / 'runs'}", "ttt.batch_size=20", "workers.num_cpus=0.25",
            "workers.progress_interval_s=0.5"]
    return load_config(ROOT / "configs" / config, base + list(overrides))


def rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["run_id"]).sort_values("position").reset_index(drop=True)


def test_local_rows_equal_the_ray_jobs_with_one_shard(small_default, tmp_path, ray_session) -> None:
    job_dir = run_job(cfg_for(small_default, tmp_path, "run_id=ray"))
    local = run_local(cfg_for(small_default, tmp_path, "run_id=local"))
    ray_rows = rows(pd.read_parquet(job_dir / "results"))
    assert len(ray_rows) == 150
    pd.testing.assert_frame_equal(rows(local.results), ray_rows, check_dtype=False)
    pd.testing.assert_frame_equal(rows(pd.read_parquet(local.run_dir / "results")), ray_rows, check_dtype=False)
    # the analysis records agree too, but for the timings and the worker's name
    keep = ["batch_index", "sample_ids", "losses", "steps", "class_entropy", "updated_param_count"]
    ray_an = pd.read_parquet(job_dir / "analysis").sort_values("batch_index")[keep].reset_index(drop=True)
    pd.testing.assert_frame_equal(local.analysis[keep].reset_index(drop=True), ray_an, check_dtype=False)
    info = json.loads((job_dir / "run.json").read_text())
    assert info["protocol"]["independent_streams"] == 1 and info["config"]["workers"]["num_shards"] == 1
    # summary.json's protocol: the stream's (run.json) and what the rows measured of it, in both modes
    for run_dir in (job_dir, local.run_dir):
        proto = json.loads((run_dir / "summary.json").read_text())["protocol"]
        assert proto["num_shards"] == 1 and proto["independent_streams"] == 1, run_dir
        assert proto["adapted_fraction"] == 1.0 and proto["rows_not_adapted"] == 0, run_dir


def test_every_row_an_error_row_fails_in_one_line(small_default, tmp_path, ray_session) -> None:
    manifest = tmp_path / "wrong_size.parquet"
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(30)], "label": [i % 10 for i in range(30)],
                             "domain": ["big"] * 30,
                             "pixels": [rng.integers(0, 255, 32 * 32).tolist() for _ in range(30)]}), manifest)
    cfg = cfg_for(small_default, tmp_path, f"data.manifest={manifest}", "run_id=bad")
    with pytest.raises(RunFailed, match=r"every row \(30\) is an error row; most common \(30 x\): .*1024 values"):
        run_job(cfg)
    info = json.loads((tmp_path / "runs" / "bad" / "run.json").read_text())
    assert info["status"] == "failed" and "every row (30) is an error row" in info["error"]
    with pytest.raises(RunFailed, match="every row"):
        run_local(cfg.model_copy(update={"run_id": "bad-local"}))


def test_no_update_reaching_a_prediction_is_said(small_default, tmp_path, ray_session) -> None:
    cfg = cfg_for(small_default, tmp_path, "ttt.batch_size=64", "ttt.reset_on_domain_change=true", "run_id=onebatch")
    run_dir = run_job(cfg)
    warnings = json.loads((run_dir / "summary.json").read_text())["warnings"]
    assert any(w.startswith("no update reached a prediction: each domain is one batch") for w in warnings)
    from pipeline.job.outputs import format_summary

    assert "WARNING: no update reached a prediction" in format_summary(run_dir)
