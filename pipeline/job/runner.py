"""The job: check and prepare a run, start (or join) Ray, drive one worker actor per shard, and
commit the chunks the workers stream back; then write summary.json and run.json.

Read top to bottom: `run_job` is the whole story; the parts it calls live beside it:
`record.py` (the Run and its run.json), `pool.py` (workers and their replacement), `scheduler.py`
(work items and commits), `ray_start.py` (Ray), `checks.py` (start-up refusals). The manifest is cut into `num_shards`
contiguous, ordered row ranges (only its Parquet metadata is read here: nothing is
materialised on the driver). A worker takes one shard at a time; its rows arrive decoded and
preprocessed by Ray Data operators (pipeline/job/inputs.py) and it streams back, every
`workers.checkpoint_every` batches, the rows since the last chunk plus a checkpoint of its
adaptation state. The driver commits each chunk atomically (pipeline/job/outputs.py) and holds at
most two uncommitted chunks per shard (Ray's generator backpressure). A worker that dies is
replaced (away from its node when another is alive) and its shard goes on from the last commit;
a driver killed and rerun with the same run_id does the same. The rows equal an undisturbed
run's, bit for bit, and every restart is printed and counted in run.json. Several runs share one
pool (`run_jobs`, a campaign's cells), and inside `warm_workers()` a driver's later runs start on
the pool its last run kept.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.job import signals
from pipeline.job.checks import check_gpus
from pipeline.job.inputs import warm_up
from pipeline.job.pool import Pool, keep_warm, live_node_cpus, pool_for, worker_plan
from pipeline.job.progress import log
from pipeline.job.ray_start import init_ray, quiet_ray_data
from pipeline.job.record import Run
from pipeline.job.scheduler import Scheduler


def run_job(cfg: RunConfig) -> Path:
    """One run; its run directory."""
    return run_jobs([cfg])[0]


def _start(runs: list[Run], started_at: float) -> tuple[dict[str, float], dict[str, float]]:
    """Ray up, the GPU check, every run directory opened (run.json written, committed shards found); returns the
    cluster's resources and the start-up timeline the summaries report."""
    prepared_at = time.time()
    resources = init_ray()
    signals.reinstall()  # ray.init sets a SIGTERM handler of its own
    ray_ready_at = time.time()
    for run in runs:
        check_gpus(run.cfg, resources)
    for run in runs:
        with signals.critical():
            run.open(resources)
    quiet_ray_data()
    return resources, {"started_at": started_at, "prepare_s": prepared_at - started_at,
                       "ray_ready_s": ray_ready_at - started_at}


def run_jobs(cfgs: list[RunConfig], on_done: Callable[[int, Path], None] | None = None) -> list[Path]:
    """Several runs (a campaign's cells) over ONE worker pool: every (run, shard) is a work item
    the scheduler hands to the next free worker, which keeps its loaded model when the next item's
    model is the same. Each run is written, resumable and finished on its own, exactly as if run
    alone (same rows, same run directory layout); `on_done(index, run_dir)` is called as each ends."""
    started_at = time.time()
    runs: list[Run] = []
    pool: Pool | None = None
    try:
        for cfg in cfgs:
            runs.append(Run.prepare(cfg))  # every refusal happens here, before Ray starts
        resources, timing = _start(runs, started_at)
        pending = [(run, shard) for run in runs for shard in run.todo]
        index = {id(run): i for i, run in enumerate(runs)}

        def finished(run: Run) -> None:
            run.finish(pool, timing)
            if on_done is not None:
                on_done(index[id(run)], run.run_dir)

        for run in runs:
            if not run.todo:
                with signals.critical():
                    finished(run)
        if pending:
            threading.Thread(target=warm_up, args=(pending[0][0].inputs_spec,), daemon=True).start()
            lead_run = pending[0][0]  # runs finished by an earlier driver hold no worker spec
            lead = lead_run.cfg
            pool = pool_for(lead, worker_plan(lead, resources, len(pending), live_node_cpus()), lead_run.worker_spec)
            log(f"{len(pending)} shard(s) of {sum(1 for r in runs if r.todo)} run(s) on {len(pool.actors)} "
                f"{'warm ' if pool.runs > 1 else ''}worker(s), checkpoint every {lead.workers.checkpoint_every} batches")
            Scheduler(lead, pool, on_run_done=finished).run(pending)
            keep_warm(pool)
            pool = None
        return [run.run_dir for run in runs]
    except BaseException as exc:
        stop = signals.interruption(exc)
        if stop is not None:  # raised inside a Ray call, it comes wrapped in a SystemError
            stop.run_ids = [run.run_id for run in runs if run.status != "finished"]
            exc = stop
        for run in runs:
            run.fail(exc, pool)
        if stop is not None:
            raise stop from None
        raise
    finally:
        with signals.critical():  # a second signal waits for the clean-up
            if pool is not None:
                pool.shutdown()
            for run in runs:
                run.close()
