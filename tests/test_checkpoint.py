"""Mid-shard checkpoints: a stream resumed from any chunk's state gives the rows an uninterrupted
stream gives, bit for bit, for every image method; and the job resumes a shard mid-way after
its driver is killed, with results equal to an undisturbed run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAFETY_S

from pipeline.config import load_config
from pipeline.job.runner import run_job
from ttt import TTTConfig, build_method
from ttt.checkpoint import capture, restore
from ttt.methods import METHODS
from ttt.schema import measured
from workers.adapters import ImageClassifierAdapter
from workers.models import load_model
from workers.stream import stream_chunks

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "pipeline.embedded.model:small_cnn"
NEEDS_SERVICES = {"nn"}  # retrieval TTT resets per query; covered by its own tests
# need labelled source data or the rotation-head model: their resume tests are in test_new_methods.py
NEEDS_OWN_INPUTS = {"rmt", "santa", "ttt"}


def _rows(small_default, n=30):
    table = pq.read_table(small_default["manifest"]).slice(0, n).to_pylist()
    return table


def _stream(small_default, method_name, rows, *, start=None, every=1):
    model = load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")
    adapter = ImageClassifierAdapter(model)
    cfg = TTTConfig(method=method_name, batch_size=10, seed=3, reset_on_domain_change=False)
    method = build_method(adapter, cfg)
    torch.manual_seed(0)
    return list(stream_chunks(adapter, method, rows[start.offset if start else 0:], run_id="r", shard=0, worker="w",
                              start=start, checkpoint_every=every))


def _comparable(chunks):
    results = [r for c in chunks for r in c["results"]]
    analysis = [{k: v for k, v in a.items() if not measured(k)} for c in chunks for a in c["analysis"]]
    return results, analysis


@pytest.mark.parametrize("method_name", sorted(set(METHODS) - NEEDS_SERVICES - NEEDS_OWN_INPUTS))
def test_resume_from_any_chunk_equals_the_uninterrupted_stream(small_default, method_name):
    torch.set_num_threads(1)
    rows = _rows(small_default)
    whole = _stream(small_default, method_name, rows)
    assert len(whole) == 4 and whole[-1]["state"].method_state is None  # 3 chunks of one batch + the end
    for cut in (1, 2):
        state = whole[cut - 1]["state"]
        assert state.offset == cut * 10 and state.batch_index == cut
        resumed = _stream(small_default, method_name, rows, start=state)
        got, want = _comparable(resumed), _comparable(whole[cut:])
        assert got[0] == want[0], f"{method_name}: results differ after resuming at chunk {cut}"
        assert got[1] == want[1], f"{method_name}: analysis differs after resuming at chunk {cut}"


def test_a_checkpoint_holds_only_cpu_tensors_and_restores_state_made_after_the_start(small_default):
    """Checkpoints cross nodes (a GPU worker's shard may go on elsewhere): every tensor is a CPU
    copy, and a tensor the method created mid-stream (absent from a fresh method) comes back."""
    model = load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")
    method = build_method(ImageClassifierAdapter(model), TTTConfig(method="tent", batch_size=10, seed=3))
    method.running_mean = torch.arange(4.0)  # e.g. a moving average a method starts after its first batch
    state = capture(method)
    method.running_mean.add_(1.0)  # a capture is a copy, not a view
    tensors = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            [walk(v) for v in x.values()]
        elif isinstance(x, (list, tuple)):
            [walk(v) for v in x]
    walk(state)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    fresh = build_method(ImageClassifierAdapter(load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")),
                         TTTConfig(method="tent", batch_size=10, seed=3))
    restore(fresh, state)
    assert torch.equal(fresh.running_mean, torch.arange(4.0))


DRIVER_SCRIPT = """
import sys
from pipeline.config import load_config
from pipeline.job.runner import run_job
run_job(load_config(sys.argv[1], sys.argv[2:]))
"""


def test_driver_killed_mid_shard_resumes_from_the_last_commit(small_default, tmp_path):
    """Kill the driver (and with it its local Ray) after some chunks are committed; the rerun with
    the same run_id goes on from each shard's last commit and equals an undisturbed run."""
    base = [f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
            f"output_root={tmp_path / 'runs'}", "ttt.batch_size=5", "ttt.steps=8", "workers.num_shards=2",
            "workers.checkpoint_every=2", "workers.progress_interval_s=0.5"]
    config = str(ROOT / "configs" / "mnistc_tent.yaml")
    script = tmp_path / "drive.py"
    script.write_text(DRIVER_SCRIPT)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(script), config, *base, "run_id=killed"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    commits = tmp_path / "runs" / "killed" / "results"
    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:  # wait for a few chunks of each shard, not the end
        done = [json.loads(p.read_text()) for p in commits.glob("_COMMIT-*.json")] if commits.exists() else []
        if any(c["chunk"] >= 1 for c in done) and not any(c["done"] for c in done):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done and not any(c["done"] for c in done), done
    out = subprocess.run([sys.executable, str(script), config, *base, "run_id=killed"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=SAFETY_S)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "from row" in out.stdout  # a shard went on mid-way
    undisturbed = subprocess.run([sys.executable, str(script), config, *base, "run_id=undisturbed"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=SAFETY_S)
    assert undisturbed.returncode == 0, undisturbed.stderr[-2000:]
    a = pd.read_parquet(tmp_path / "runs" / "killed" / "results").sort_values("position").drop(columns="run_id")
    b = pd.read_parquet(tmp_path / "runs" / "undisturbed" / "results").sort_values("position").drop(columns="run_id")
    assert a["sample_id"].is_unique and len(a) == len(b) == pq.read_metadata(small_default["manifest"]).num_rows
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    for kind in ("results", "analysis"):  # parts written before the kill and after the resume: one schema
        schemas = {pq.read_schema(p).remove_metadata() for p in (tmp_path / "runs" / "killed" / kind).glob("part-*")}
        assert len(schemas) == 1, kind
    assert not list((tmp_path / "runs" / "killed").rglob("*.tmp"))
    assert not list((tmp_path / "runs" / "killed" / "state").glob("*"))  # finished shards keep no checkpoint
    record = json.loads((tmp_path / "runs" / "killed" / "run.json").read_text())
    went_on = [r for r in record["resumes"] if r["error"] == "driver restarted"]
    assert went_on and all(r["from_row"] > 0 for r in went_on) and record["counts"]["restarts"] >= len(went_on)
    assert len(record["resumed_at"]) == 1 and record["started_at"] < record["resumed_at"][0]


def test_bf16_autocast_runs_on_cpu(ray_session, small_default, tmp_path):
    cfg = load_config(ROOT / "configs" / "mnistc_tent.yaml", [
        f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
        f"output_root={tmp_path / 'runs'}", "data.limit=40", "ttt.batch_size=10", "workers.precision=bf16"])
    df = pd.read_parquet(run_job(cfg) / "results")
    assert len(df) == 40 and df["error"].isna().all() and df["confidence"].between(0, 1).all()
    assert json.loads((Path(cfg.output_root)).joinpath(df["run_id"][0], "run.json").read_text()
                      )["config"]["workers"]["precision"] == "bf16"


def test_fp16_autocast_with_loss_scaling_runs_on_cpu(small_default):
    """fp16: forward passes under autocast, the loss scaled before backward and the gradients
    unscaled before the guards see them; predictions close to fp32's."""
    rows = _rows(small_default, n=20)
    model = load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")
    adapter = ImageClassifierAdapter(model)
    method = build_method(adapter, TTTConfig(method="tent", batch_size=10))
    (chunk,) = stream_chunks(adapter, method, rows, run_id="r", shard=0, worker="w", precision="fp16")
    # as torch's GradScaler: a scale that overflows fp16 skips that step (rolled back) and halves
    steps = [a["steps"] for a in chunk["analysis"]]
    backoffs = sum(a["stop_reason"] == "nonfinite_grad" for a in chunk["analysis"])
    assert method.loss_scale == 2.0**16 / 2**backoffs and sum(steps) >= 1
    fp32 = _stream(small_default, "tent", rows)
    want = [r["prediction"] for c in fp32 for r in c["results"]]
    got = [r["prediction"] for r in chunk["results"]]
    assert sum(a == b for a, b in zip(got, want)) >= 18  # fp16 rounding may flip a near-tie
