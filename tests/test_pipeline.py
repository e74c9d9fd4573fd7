"""End-to-end behaviour of the job on a real local Ray, real torch, real Parquet, small data."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.embedded.model import small_cnn
from pipeline.job.outputs import RunFailed
from pipeline.job.pool import Pool, WorkerPlan, warm_workers
from pipeline.job.provenance import source_hash
from pipeline.job.ray_start import init_ray
from pipeline.job.record import Run, shard_bounds
from pipeline.job.runner import run_job

ROOT = Path(__file__).resolve().parents[1]
from conftest import DOMAINS, SAFETY_S  # noqa: E402  (the small stream's domains; the hang guard)


def make_cfg(small_default, tmp_path, *overrides: str):
    base = [
        f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
        f"output_root={tmp_path / 'runs'}", "ttt.batch_size=20", "workers.num_shards=2",
        "workers.num_cpus=0.25", "workers.progress_interval_s=0.5",
    ]
    return load_config(ROOT / "configs" / "mnistc_tent.yaml", base + list(overrides))


def results_of(run_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "results").sort_values("position").reset_index(drop=True)
    return df.drop(columns=["run_id"])


def test_shard_bounds_keep_every_row():
    for n, k in [(999, 2), (10, 3), (5, 5), (3, 4)]:
        b = shard_bounds(n, k)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(b[i][1] == b[i + 1][0] for i in range(k - 1))
        assert max(e - s for s, e in b) - min(e - s for s, e in b) <= 1


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"ttt\.lr"):
        load_config(ROOT / "configs/mnistc_tent.yaml", ["ttt.lr=-1"])
    with pytest.raises(ConfigError, match=r"unknown field 'workers\.gpus'"):
        load_config(ROOT / "configs/mnistc_tent.yaml", ["workers.gpus=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ROOT / "configs/nope.yaml")


def test_cli_config_error_is_one_line_and_exits_before_ray(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # any attempt to reach Ray would hang or fail
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "configs/mnistc_tent.yaml",
                           "--set", "ttt.method=tentt"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=SAFETY_S)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ttt.method" in lines[0] and "tentt" in lines[0]


def test_missing_hook_fails_at_start_up(small_default, tmp_path):
    cfg = make_cfg(small_default, tmp_path, "model.factory=torch.nn:Identity", "model.checkpoint=null")
    with pytest.raises(ConfigError):
        run_job(cfg)


def test_source_equals_plain_forward(ray_session, small_default, tmp_path):
    run_dir = run_job(make_cfg(small_default, tmp_path, "ttt.method=source"))
    got = results_of(run_dir)
    manifest = pq.read_table(small_default["manifest"]).to_pandas()
    model = small_cnn()
    model.load_state_dict(torch.load(small_default["checkpoint"], weights_only=True))
    model.eval()
    x = torch.tensor(np.stack(manifest["pixels"].map(np.asarray)), dtype=torch.float32).view(-1, 1, 28, 28)
    with torch.no_grad():
        logits = model((x / 255.0 - 0.1307) / 0.3081)
    assert list(got["sample_id"]) == list(manifest["sample_id"])
    assert (got["prediction"].to_numpy() == logits.argmax(1).numpy()).all()
    np.testing.assert_allclose(got["confidence"], logits.softmax(1).max(1).values.numpy(), rtol=1e-5)
    assert got["error"].isna().all() and (got["adapter_source"] == "none").all()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["counts"]["rows"] == len(manifest)
    # where the time before the first batch went, in the order it happens
    startup = json.loads((run_dir / "summary.json").read_text())["throughput"]["startup"]
    order = ["imported_s", "ready_s", "shard_start_s", "first_input_s", "first_batch_s"]
    assert [startup[k] for k in order] == sorted(startup[k] for k in order)


def test_tent_exactly_once_and_deterministic_across_worker_counts(ray_session, small_default, tmp_path):
    """Same rows for 1 or 2 workers and any decode block size."""
    a = run_job(make_cfg(small_default, tmp_path, "workers.num_workers=1"))
    b = run_job(make_cfg(small_default, tmp_path, "workers.num_workers=2", "workers.rows_per_block=7"))
    ra, rb = results_of(a), results_of(b)
    manifest = pq.read_table(small_default["manifest"], columns=["sample_id"]).column(0).to_pylist()
    assert sorted(ra["sample_id"]) == sorted(manifest) and ra["sample_id"].is_unique
    pd.testing.assert_frame_equal(ra, rb)
    analysis = pd.read_parquet(a / "analysis")
    assert (analysis["updated_param_count"] > 0).all() and (analysis["steps"] == 1).all()
    assert "timing_embedding" not in analysis and (analysis["timing_total"] >= 0).all()  # a retrieval column
    assert set(analysis["shard"]) == {0, 1}
    # the two shards each start from the source model: shard 1's first batch equals a fresh run on it
    info = json.loads((a / "run.json").read_text())
    assert info["predict_from"] == "same_forward"
    assert info["source_hash"] == source_hash()  # which code ran, with or without .git


def test_warm_workers_serve_the_next_runs_with_the_same_rows(ray_session, small_default, tmp_path):
    """Inside `warm_workers()` a run whose pool would be the same starts on the last run's workers
    (a source run in between: no state leaks from one method to the next); a different pool is
    fresh; the block's end kills the kept workers."""
    import ray

    def workers(run_dir: Path) -> list[str]:
        return [w["worker"] for w in json.loads((run_dir / "run.json").read_text())["workers"]]

    with warm_workers():
        a = run_job(make_cfg(small_default, tmp_path, "workers.num_workers=2"))
        between = run_job(make_cfg(small_default, tmp_path, "workers.num_workers=2", "ttt.method=source"))
        b = run_job(make_cfg(small_default, tmp_path, "workers.num_workers=2"))
        other = run_job(make_cfg(small_default, tmp_path, "workers.num_workers=1"))
        kept = workers(other)
        assert all(ray.get_actor(name) for name in kept)
    assert workers(a) == workers(between) == workers(b) and set(kept).isdisjoint(workers(a))
    pd.testing.assert_frame_equal(results_of(a), results_of(b))
    assert results_of(between)["method"].eq("source").all()

    def alive(name: str) -> bool:
        try:
            return ray.get_actor(name) is not None
        except ValueError:
            return False

    deadline = time.monotonic() + 20  # ray.kill is asynchronous
    while any(alive(n) for n in kept) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(n) for n in kept)


def test_single_shard_is_one_stream(ray_session, small_default, tmp_path):
    run_dir = run_job(make_cfg(small_default, tmp_path, "workers.num_shards=1"))
    df = results_of(run_dir)
    assert len(df) == 150 and (df["shard"] == 0).all() and list(df["position"]) == list(range(150))


def _png_manifest(small_default, tmp_path, n=60, corrupt_row=7):
    from PIL import Image

    src = pq.read_table(small_default["manifest"]).to_pandas().head(n)
    folder = tmp_path / "pngs"
    folder.mkdir()
    paths = []
    for _, row in src.iterrows():
        p = folder / f"{row.sample_id}.png"
        Image.fromarray(np.asarray(row.pixels, dtype=np.uint8).reshape(28, 28)).save(p)
        paths.append(str(p))
    Path(paths[corrupt_row]).write_bytes(b"\x89PNG not really a png")
    out = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"sample_id": src.sample_id, "domain": src.domain, "label": src.label, "path": paths}), out)
    return out, src.sample_id[corrupt_row]


def test_corrupt_file_becomes_error_row(ray_session, small_default, tmp_path):
    manifest, bad_id = _png_manifest(small_default, tmp_path)
    run_dir = run_job(make_cfg(small_default, tmp_path, f"data.manifest={manifest}"))
    df = results_of(run_dir)
    assert len(df) == 60 and df["sample_id"].is_unique
    bad = df[df["sample_id"] == bad_id].iloc[0]
    assert bad["error"] and "not an image file" in bad["error"] and bad_id.split("-")[-1] in bad["error"]
    assert pd.isna(bad["prediction"])
    assert df[df["sample_id"] != bad_id]["error"].isna().all()
    assert json.loads((run_dir / "run.json").read_text())["counts"]["errors"] == 1


def test_resume_skips_written_shards(ray_session, small_default, tmp_path):
    cfg = make_cfg(small_default, tmp_path, "run_id=resume-test")
    run_dir = run_job(cfg)
    full = results_of(run_dir)
    kept = run_dir / "results" / "part-00000-00000.parquet"
    kept_mtime = kept.stat().st_mtime_ns
    for part in (run_dir / "results").glob("part-00001-*.parquet"):
        part.unlink()
    (run_dir / "results" / "_COMMIT-00001.json").unlink()
    run_job(cfg)
    assert kept.stat().st_mtime_ns == kept_mtime  # shard 0 was not recomputed
    pd.testing.assert_frame_equal(results_of(run_dir), full)
    with pytest.raises(ConfigError, match=r"another config \(ttt\.lr: [0-9.e-]+ -> 0\.01\)"):
        run_job(make_cfg(small_default, tmp_path, "run_id=resume-test", "ttt.lr=0.01"))


def _stop_worker_mid_shard(ray, prefix: str, sig: int) -> bool:
    """Send `sig` to the first worker named `prefix*` once it has done a row; True when sent."""
    deadline = time.time() + SAFETY_S
    while time.time() < deadline:
        names = [n for n in ray.util.list_named_actors() if n.startswith(prefix)]
        if names:
            try:
                actor = ray.get_actor(names[0])
                if ray.get(actor.progress.remote(), timeout=5)["rows_done"] > 0:
                    os.kill(ray.get(actor.info.remote(), timeout=5)["pid"], sig)
                    return True
            except Exception:
                pass
        time.sleep(0.05)
    return False


def test_killed_worker_is_replaced_and_results_unchanged(ray_session, small_default, tmp_path):
    slow = ["ttt.steps=15", "ttt.batch_size=10", "workers.num_workers=1"]
    reference = results_of(run_job(make_cfg(small_default, tmp_path, "run_id=ref", *slow)))
    cfg = make_cfg(small_default, tmp_path, "run_id=killed", *slow)
    box = {}
    thread = threading.Thread(target=lambda: box.update(run_dir=run_job(cfg)))
    thread.start()
    killed = _stop_worker_mid_shard(ray_session, "ttt-killed-w0", signal.SIGKILL)
    assert killed, "never caught the worker mid-shard"
    deadline = time.time() + 30  # the death is in run.json while the run goes on (a driver killed now keeps it)
    while time.time() < deadline and not json.loads((tmp_path / "runs" / "killed" / "run.json").read_text())["resumes"]:
        time.sleep(0.1)
    assert json.loads((tmp_path / "runs" / "killed" / "run.json").read_text())["resumes"][0]["worker"].startswith(
        "ttt-killed-w0")
    thread.join(timeout=SAFETY_S)
    run = json.loads((box["run_dir"] / "run.json").read_text())
    assert run["status"] == "finished" and run["counts"]["restarts"] >= 1
    pd.testing.assert_frame_equal(results_of(box["run_dir"]), reference)


def _run_signalling_the_worker(ray, cfg, sig: int) -> BaseException | None:
    """Run `cfg` (one worker) in a thread, send `sig` to its worker mid-shard; what the run raised."""
    box = {}

    def drive():
        try:
            run_job(cfg)
        except Exception as exc:
            box["exc"] = exc
    thread = threading.Thread(target=drive)
    thread.start()
    assert _stop_worker_mid_shard(ray, f"ttt-{cfg.run_id}-w0", sig), "never caught the worker mid-shard"
    thread.join(timeout=SAFETY_S)
    return box.get("exc")


def test_a_worker_lost_with_its_node_is_not_replaced_where_the_node_no_longer_counts(ray_session, small_default,
                                                                                    tmp_path):
    """Ray can report a worker on a dying node as unavailable before it marks the node dead; the
    replacement must not count that node's CPUs, or it takes the decode tasks' last CPU and the run
    stalls. Here the one node stands for the dying one: with it uncounted the slot is retired (its
    shard waits for the live worker); a worker that died on a healthy node is replaced."""
    run = Run.prepare(make_cfg(small_default, tmp_path, "run_id=lost-node", "data.limit=40"))
    run.open(init_ray())
    pool = Pool(run.cfg, WorkerPlan(2, 0.5, (None, None)), run.worker_spec)
    try:
        node = ray_session.get_runtime_context().get_node_id()
        pool.nodes = [node, node]
        assert pool.replace(0) is True and pool.live() == 2  # 2 CPUs hold 2 workers of 0.5 and a decode task
        assert pool.replace(1, node_lost=True) is False and pool.live() == 1
    finally:
        pool.shutdown()
        run.close()


def test_a_job_server_address_in_ray_address_is_refused_in_one_line(small_default, tmp_path):
    """`RAY_ADDRESS=http://head:8265` is what `ray job submit` takes; a run needs the GCS address."""
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(ROOT / "configs/mnistc_tent.yaml"),
                           "--set", f"data.manifest={small_default['manifest']}",
                           "--set", f"model.checkpoint={small_default['checkpoint']}",
                           "--set", f"output_root={tmp_path / 'runs'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=SAFETY_S)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "RAY_ADDRESS=http://127.0.0.1:8265" in proc.stderr and "6379" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_hung_worker_fails_the_run_in_one_line_and_a_rerun_goes_on(ray_session, small_default, tmp_path):
    """A worker that stops answering (SIGSTOP: a hung device or file system) fails the run after
    workers.stall_timeout_s with one line naming the shard and the worker; run.json says failed;
    the same command again goes on from the last commits and equals an undisturbed run."""
    slow = ["ttt.steps=15", "ttt.batch_size=10", "workers.num_workers=1", "workers.checkpoint_every=2"]
    reference = results_of(run_job(make_cfg(small_default, tmp_path, "run_id=ref", *slow)))
    # the stall clock starts when the worker is built (its boot under load is not counted), and the
    # worker is stopped only after its first row (an event); 30 s covers its first block under load
    cfg = make_cfg(small_default, tmp_path, "run_id=hung", "workers.stall_timeout_s=30", *slow)
    exc = _run_signalling_the_worker(ray_session, cfg, signal.SIGSTOP)
    assert isinstance(exc, RunFailed), exc
    assert "\n" not in str(exc) and "workers.stall_timeout_s" in str(exc) and "shard" in str(exc)
    assert "ttt-hung-w0" in str(exc)
    record = json.loads((tmp_path / "runs" / "hung" / "run.json").read_text())
    assert record["status"] == "failed" and "stall_timeout_s" in record["error"]
    run_dir = run_job(cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"stall_timeout_s": 600.0})}))
    pd.testing.assert_frame_equal(results_of(run_dir), reference)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_a_run_out_of_attempts_records_the_death_and_a_rerun_goes_on(ray_session, small_default, tmp_path):
    """workers.max_shard_attempts=1: the first worker death fails the run (one line, exit 1 from the
    CLI), run.json records that death; a rerun goes on and equals an undisturbed run."""
    slow = ["ttt.steps=15", "ttt.batch_size=10", "workers.num_workers=1", "workers.checkpoint_every=2"]
    reference = results_of(run_job(make_cfg(small_default, tmp_path, "run_id=ref", *slow)))
    cfg = make_cfg(small_default, tmp_path, "run_id=once", "workers.max_shard_attempts=1", *slow)
    exc = _run_signalling_the_worker(ray_session, cfg, signal.SIGKILL)
    assert isinstance(exc, RunFailed) and "max_shard_attempts=1" in str(exc), exc
    record = json.loads((tmp_path / "runs" / "once" / "run.json").read_text())
    assert record["status"] == "failed" and record["counts"]["restarts"] == 0
    assert [r["gave_up"] for r in record["resumes"]] == [True] and record["resumes"][0]["worker"].startswith("ttt-once-w0")
    run_dir = run_job(cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"max_shard_attempts": 3})}))
    pd.testing.assert_frame_equal(results_of(run_dir), reference)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["resumes"][0]["gave_up"]  # the history is kept


def test_rerunning_a_finished_run_leaves_its_records_alone(ray_session, small_default, tmp_path):
    cfg = make_cfg(small_default, tmp_path, "run_id=done-once", "data.limit=40")
    run_dir = run_job(cfg)
    before = {name: (run_dir / name).read_bytes() for name in ("run.json", "summary.json")}
    assert run_job(cfg) == run_dir
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_a_damaged_committed_part_is_named_and_its_shard_done_again(ray_session, small_default, tmp_path, capsys):
    cfg = make_cfg(small_default, tmp_path, "run_id=damaged", "data.limit=80", "ttt.batch_size=10",
                   "workers.checkpoint_every=1")
    run_dir = run_job(cfg)
    reference = results_of(run_dir)
    part = run_dir / "results" / "part-00000-00001.parquet"
    part.write_bytes(part.read_bytes()[:100])  # a torn copy, say
    capsys.readouterr()
    run_job(cfg)
    out = capsys.readouterr().out
    assert "WARNING: the commit of shard 0" in out and "do not read back" in out
    pd.testing.assert_frame_equal(results_of(run_dir), reference)


def test_notebook_example_compares_three_real_runs(ray_session, small_default, tmp_path):
    """examples/compare_runs.py on three tiny real runs: the table has a row per run, and its
    numbers are the runs' own summary errors."""
    for method in ("source", "norm", "tent"):
        run_job(make_cfg(small_default, tmp_path, f"ttt.method={method}"))
    out = tmp_path / "compare.png"
    proc = subprocess.run([sys.executable, "examples/compare_runs.py", "--root", str(tmp_path / "runs"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=SAFETY_S)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sys.path.insert(0, str(ROOT / "examples"))
    from compare_runs import method_domain_table

    runs, errors, _ = method_domain_table(str(tmp_path / "runs"), None)
    assert errors["run_id"].nunique() == 3 and set(DOMAINS) <= set(errors["domain"])
    for i, meta in enumerate(runs):
        summary = runs.summary(i)
        mine = errors[errors["run_id"] == meta["run_id"]].set_index("domain")["error"]
        for domain, d in summary["per_domain"].items():
            assert abs(mine[domain] - d["error"]) < 1e-9


def test_cli_flags_reach_the_method(ray_session, small_default, tmp_path):
    """`--set` fields land in the worker's method: steps taken, update filter, guards and MIM mask."""
    from pipeline.cli import main

    args = ["run", str(ROOT / "configs/mnistc_mim.yaml"), "--set", f"data.manifest={small_default['manifest']}",
            "--set", f"model.checkpoint={small_default['checkpoint']}", "--set", f"output_root={tmp_path / 'runs'}",
            "--set", "ttt.batch_size=50", "--set", "ttt.steps=3", "--set", "ttt.mim.mask_prob=0.25",
            "--set", "ttt.update_filter=all", "--set", "ttt.guards.grad_clip=0.5", "--set", "run_id=cli-flags",
            "--set", "workers.num_cpus=0.25", "--set", "ttt.log_out=adapt.jsonl"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "cli-flags"
    analysis = pd.read_parquet(run_dir / "analysis")
    assert (analysis["steps"] == 3).all()
    log = [json.loads(line) for line in (run_dir / "adapt.jsonl").read_text().splitlines()]
    assert len(log) == len(analysis) and all(len(rec["losses"]) == 3 for rec in log)
    assert analysis["mask_ratio"].between(0.1, 0.4).all()  # realised ratio follows mask_prob=0.25
    norm_only = sum(p.numel() for m in small_cnn().features.modules() if isinstance(m, torch.nn.BatchNorm2d)
                    for p in m.parameters())
    assert (analysis["updated_param_count"] > norm_only).all()  # `all`, not the YAML's norm_only
    config = json.loads((run_dir / "run.json").read_text())["config"]["ttt"]
    assert config["guards"]["grad_clip"] == 0.5 and config["mim"]["mask_prob"] == 0.25
