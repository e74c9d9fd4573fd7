"""A running driver as an outsider sees it: what its local Ray instance listens on (loopback
only, no HTTP endpoint that runs code), SIGTERM / SIGINT (exit 143 / 130, run.json
`interrupted`, one resume line, no Ray process left, an exact resume), two drivers on one run_id
(the second refuses; a killed one's successor takes over), a full disk before the first commit
and bad run ids. Every wait is on an event (a commit on disk, a process ending); the timeouts are
only safety nets for a loaded machine."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import SAFETY_S

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "mnistc_tent.yaml")


def base_args(small_default, root: Path) -> list[str]:
    sets = [f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
            f"output_root={root}", "ttt.batch_size=5", "ttt.steps=8", "workers.num_shards=2",
            "workers.checkpoint_every=2", "workers.progress_interval_s=0.5"]
    return [a for s in sets for a in ("--set", s)]


def start(args: list[str], run_id: str, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", CONFIG, *args, "--set", f"run_id={run_id}"],
                            cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(cond, proc: subprocess.Popen | None = None, what: str = "", timeout: float = SAFETY_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def mid_run_commit(run_dir: Path):
    """A committed chunk that does not end its shard: the driver is mid-run."""
    markers = list((run_dir / "results").glob("_COMMIT-*.json")) if (run_dir / "results").exists() else []
    commits = []
    for m in markers:
        try:
            commits.append(json.loads(m.read_text()))
        except (OSError, ValueError):
            return None
    return [c for c in commits if not c["done"]] or None


def family(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def gone(procs: list[psutil.Process]) -> bool:
    return not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def results(run_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "results").sort_values("position").drop(columns="run_id")
    return df.reset_index(drop=True)


@pytest.fixture(scope="module")
def undisturbed(small_default, tmp_path_factory):
    root = tmp_path_factory.mktemp("undisturbed")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", CONFIG, *base_args(small_default, root),
                           "--set", "run_id=calm"], cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                          capture_output=True, text=True, timeout=SAFETY_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = results(root / "calm")
    assert len(df) == pq.read_metadata(small_default["manifest"]).num_rows
    return df


def probe_ports(pids: set[int], marker: Path) -> list[tuple[str, int, object]]:
    """Every TCP port the processes listen on, and what a job-agent POST (that would create
    `marker`) gets from it."""
    found = []
    for conn in psutil.net_connections("tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in pids:
            continue
        host, port = conn.laddr.ip, conn.laddr.port
        body = json.dumps({"entrypoint": f"touch {marker}", "submission_id": "probe"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/job_agent/jobs/", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            answer: object = urllib.request.urlopen(request, timeout=5).status
        except urllib.error.HTTPError as exc:
            answer = exc.code
        except Exception as exc:  # a gRPC port does not speak HTTP/1.1
            answer = type(exc).__name__
        found.append((host, port, answer))
    return found


def assert_interrupted(proc, log: Path, run_dir: Path, run_id: str, code: int, family_procs):
    rc = proc.wait(timeout=SAFETY_S)
    text = log.read_text()
    assert rc == code, text[-3000:]
    lines = [ln for ln in text.splitlines() if "resume it with:" in ln]
    assert len(lines) == 1 and f"--set run_id={run_id}" in lines[0], text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert not list(run_dir.rglob("*.tmp"))  # nothing half-written
    wait_for(lambda: gone(family_procs), what="the driver's Ray processes to end")


def test_sigterm_stops_cleanly_and_the_local_instance_exposes_nothing(small_default, undisturbed, tmp_path):
    """Mid-run (a commit on disk, the driver stopped so the instance stays as it is), every port
    the driver's processes listen on is loopback and none accepts a job-agent POST; SIGTERM then
    stops the run: exit 143, run.json interrupted, one resume line, no Ray process of its left;
    the resume equals an undisturbed run."""
    args, run_dir, log = base_args(small_default, tmp_path), tmp_path / "term", tmp_path / "term.log"
    proc = start(args, "term", log)
    wait_for(lambda: mid_run_commit(run_dir), proc, "a mid-run commit")
    os.kill(proc.pid, signal.SIGSTOP)  # the instance stays up while it is probed
    try:
        procs = family(proc.pid)
        marker = tmp_path / "job-agent-ran"
        ports = probe_ports({p.pid for p in procs}, marker)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
    assert len(ports) >= 3, ports  # the GCS, the raylet, the driver's core worker at least
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip, _, _ in ports), ports
    assert not [p for p in ports if isinstance(p[2], int) and 200 <= p[2] < 300], ports
    assert not marker.exists()
    assert_interrupted(proc, log, run_dir, "term", 143, procs)
    rerun = subprocess.run([sys.executable, "-m", "pipeline", "run", CONFIG, *args, "--set", "run_id=term"],
                           cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                           timeout=SAFETY_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    pd.testing.assert_frame_equal(results(run_dir), undisturbed)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_ctrl_c_stops_cleanly_and_resumes_exactly(small_default, undisturbed, tmp_path):
    args, run_dir, log = base_args(small_default, tmp_path), tmp_path / "int", tmp_path / "int.log"
    proc = start(args, "int", log)
    wait_for(lambda: mid_run_commit(run_dir), proc, "a mid-run commit")
    procs = family(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
    assert_interrupted(proc, log, run_dir, "int", 130, procs)
    rerun = subprocess.run([sys.executable, "-m", "pipeline", "run", CONFIG, *args, "--set", "run_id=int"],
                           cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                           timeout=SAFETY_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    pd.testing.assert_frame_equal(results(run_dir), undisturbed)


def test_one_driver_per_run_directory(small_default, undisturbed, tmp_path):
    """Two drivers started together on one run_id: one refuses in one line (exit 2) before it
    does anything; the other is killed mid-run (SIGKILL: the kernel drops its lock) and a third
    takes the run over and finishes it exactly."""
    args, run_dir = base_args(small_default, tmp_path), tmp_path / "both"
    a, b = start(args, "both", tmp_path / "a.log"), start(args, "both", tmp_path / "b.log")
    loser = wait_for(lambda: next((p for p in (a, b) if p.poll() is not None), None), what="one driver to end")
    winner = b if loser is a else a
    text = (tmp_path / ("a.log" if loser is a else "b.log")).read_text()
    assert loser.returncode == 2, text[-3000:]
    refusal = [ln for ln in text.splitlines() if "held by another driver" in ln]
    assert len(refusal) == 1 and "run_id both" in refusal[0] and "Traceback" not in text, text
    wait_for(lambda: mid_run_commit(run_dir), winner, "a mid-run commit")
    os.killpg(winner.pid, signal.SIGKILL)
    winner.wait()
    third = subprocess.run([sys.executable, "-m", "pipeline", "run", CONFIG, *args, "--set", "run_id=both"],
                           cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                           timeout=SAFETY_S)
    assert third.returncode == 0, third.stderr[-3000:]
    pd.testing.assert_frame_equal(results(run_dir), undisturbed)


def test_a_second_driver_mid_run_refuses_and_touches_nothing(small_default, tmp_path):
    args, run_dir, log = base_args(small_default, tmp_path), tmp_path / "held", tmp_path / "held.log"
    first = start(args, "held", log)
    try:
        wait_for(lambda: mid_run_commit(run_dir), first, "a mid-run commit")
        os.kill(first.pid, signal.SIGSTOP)  # nothing changes in the run directory meanwhile
        before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
        second = subprocess.run([sys.executable, "-m", "pipeline", "run", CONFIG, *args, "--set", "run_id=held"],
                                cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                                text=True, timeout=SAFETY_S)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip().count("\n") == 0 and "held by another driver" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


@pytest.mark.parametrize("run_id", ["../x", "/tmp/abs", ".", "..", "", "a" * 300, "a/b", "a\\b", "-x"])
def test_run_ids_that_leave_output_root_are_refused(run_id, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", CONFIG, "--set", f"output_root={tmp_path}",
                           "--set", f"run_id={json.dumps(run_id)}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=SAFETY_S)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "run_id" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir()) and not Path("/tmp/abs").exists()


def test_a_nul_byte_in_a_run_id_is_refused():
    from pipeline.config import ConfigError, RunConfig, load_config

    with pytest.raises(ConfigError, match="run_id.*NUL"):
        load_config(None, ['run_id="a\\0b"'])
    assert RunConfig(run_id="ok-1.2").run_id == "ok-1.2"


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_before_the_first_commit_is_the_mid_run_line(small_default, tmp_path):
    """output_root on a real, full file system (a 64 KiB tmpfs filled up, in a private mount
    namespace: `unshare -m`, root or a user namespace): the run.json write at start gets ENOSPC
    and the driver says the same line as a full disk mid-run, exit 1, with no traceback."""
    full = tmp_path / "full"
    full.mkdir()
    if not _can_mount_tmpfs(full):
        pytest.skip("no private tmpfs mount here (unshare -m needs root or user namespaces)")
    cmd = " ".join([f"mount -t tmpfs -o size=64k tmpfs {full} &&",
                    f"(dd if=/dev/zero of={full}/filler bs=4k 2>/dev/null; true) &&",
                    f"exec {sys.executable} -m pipeline run {CONFIG}",
                    *base_args(small_default, full / "runs"), "--set run_id=nospace"])
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=SAFETY_S)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "no space left writing" in errors[0] and "rerun with the same run_id to resume" in errors[0]


@pytest.mark.parametrize("shape", [[3, 28, 28], [1, 12, 12]])
def test_an_image_shape_the_model_does_not_take_is_refused_at_start(small_default, tmp_path, shape):
    from pipeline.config import ConfigError, load_config
    from pipeline.job.checks import prepare

    cfg = load_config(CONFIG, [f"data.manifest={small_default['manifest']}", f"output_root={tmp_path}",
                               f"model.checkpoint={small_default['checkpoint']}", f"model.image_shape={shape}"])
    with pytest.raises(ConfigError) as err:
        prepare(cfg, log=lambda _: None)
    assert str(err.value).count("\n") == 0 and f"model.image_shape={shape}" in str(err.value)
    assert not list(tmp_path.iterdir())
