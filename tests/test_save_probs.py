"""outputs.save_probs: each classifier result row keeps the softmax of the logits its prediction came
from (`probs`, list<float32>), on Ray and in the Ray-free mode alike; off by default, and then there
is no such column."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.analysis.runs import query_runs
from pipeline.config import ConfigError, load_config
from pipeline.job.local import run_local
from pipeline.job.runner import run_job

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(small_default, tmp_path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "mnistc_tent.yaml", [
        f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
        f"output_root={tmp_path / 'runs'}", "ttt.batch_size=20", "workers.num_cpus=0.25",
        "workers.progress_interval_s=0.5", "ttt.max_batches=6", *overrides])  # 6 x 20 rows scored, 30 skipped


def test_probs_are_the_softmax_the_prediction_came_from(small_default, tmp_path, ray_session) -> None:
    local = run_local(cfg_for(small_default, tmp_path, "outputs.save_probs=true", "run_id=local"))
    job_dir = run_job(cfg_for(small_default, tmp_path, "outputs.save_probs=true", "run_id=ray"))
    plain = run_local(cfg_for(small_default, tmp_path, "run_id=plain"))

    runs = query_runs(tmp_path / "runs", config={"outputs.save_probs": True})
    assert sorted(runs.run_ids) == ["local", "ray"]
    frame = runs.results(["run_id", "position", "prediction", "confidence", "label", "label_prob", "probs", "error"])
    assert pq.read_schema(next((job_dir / "results").glob("part-*.parquet"))).field("probs").type == pa.list_(pa.float32())
    scored = frame[frame["error"].isna()]
    assert len(scored) == 2 * 120 and frame["error"].notna().sum() == 2 * 30
    assert frame.loc[frame["error"].notna(), "probs"].isna().all()  # skipped rows have no prediction
    probs = np.stack(scored["probs"].to_numpy())
    assert probs.dtype == np.float32 and probs.shape == (240, 10)
    np.testing.assert_array_equal(probs.argmax(1), scored["prediction"].to_numpy())
    np.testing.assert_allclose(probs.max(1), scored["confidence"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(probs[np.arange(len(probs)), scored["label"].to_numpy()],
                               scored["label_prob"].to_numpy(), rtol=1e-6)  # label_prob: the same softmax
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # the Ray-free mode gives the Ray job's probabilities, and its in-memory rows equal its Parquet
    by_run = {rid: np.stack(g.sort_values("position")["probs"].to_numpy()) for rid, g in scored.groupby("run_id")}
    np.testing.assert_array_equal(by_run["local"], by_run["ray"])
    ok = local.results[local.results["error"].isna()].sort_values("position")
    np.testing.assert_array_equal(np.stack(ok["probs"].to_numpy()), by_run["local"])

    # off (the default): no column, and the run's other columns are the same rows
    assert "probs" not in pq.read_schema(next((plain.run_dir / "results").glob("part-*.parquet"))).names
    assert "probs" not in plain.results.columns
    with pytest.raises(ValueError, match="no results column"):
        query_runs(tmp_path / "runs", config={"outputs.save_probs": False}).results(["probs"])
    both = query_runs(tmp_path / "runs", config={"run_id": ["local", "plain"]}).results(["run_id", "confidence", "probs"])
    assert both.loc[both["run_id"] == "plain", "probs"].isna().all()  # read together: null where not kept
    np.testing.assert_array_equal(both.loc[both["run_id"] == "plain", "confidence"].to_numpy(),
                                  both.loc[both["run_id"] == "local", "confidence"].to_numpy())


def test_save_probs_changes_the_config_hash_only_when_on_and_needs_a_classifier(small_default, tmp_path) -> None:
    off = cfg_for(small_default, tmp_path)
    assert off.config_hash() == cfg_for(small_default, tmp_path, "outputs.save_probs=false").config_hash()
    assert "outputs" not in off.results_key()  # runs written before the field keep their hash (and resume)
    assert cfg_for(small_default, tmp_path, "outputs.save_probs=true").config_hash() != off.config_hash()
    with pytest.raises(ConfigError, match="outputs.save_probs applies to model.kind=image_classifier"):
        load_config(ROOT / "configs" / "lm_nn.yaml", ["outputs.save_probs=true"])
