"""The scheduler: hands (run, shard) work items to the pool's workers, commits the chunks they
stream back, replaces a worker that died (its shard goes on from the last commit), and gives up
in one line when a shard is out of attempts or no row is done for `workers.stall_timeout_s`.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from pipeline.config import RunConfig
from pipeline.job.inputs import shard_dataset
from pipeline.job.outputs import RunFailed, append_log, commit_chunk, load_state
from pipeline.job.pool import Pool
from pipeline.job.probes import Probes
from pipeline.job.progress import Progress, log
from pipeline.job.record import Run
from pipeline.job.signals import critical

WORKER_DIED = (RayActorError, ActorDiedError, ActorUnavailableError)
CHUNKS_AHEAD = 2  # uncommitted chunks a worker may stream ahead of the driver


class Scheduler:
    """Hands (run, shard) items to workers and commits the chunks they stream back, in any order
    across shards and in stream order within one; a run is finished when its last shard is."""

    def __init__(self, cfg: RunConfig, pool: "Pool", on_run_done: Callable[[Run], None]):
        self.cfg, self.pool, self.on_run_done = cfg, pool, on_run_done
        self.attempts: dict[tuple[str, int], int] = {}
        self.ready_seen: set[str] = set()  # workers whose constructor has finished
        self.progress: Progress | None = None
        self.probes = Probes()  # forgetting / transfer probes of committed states (probes.every > 0)

    def run(self, items: list[tuple[Run, int]]) -> None:
        single = len({id(run) for run, _ in items}) == 1
        label = (lambda run, s: f"s{s}") if single else (lambda run, s: f"{run.run_id}/s{s}")
        self.progress = Progress({label(r, s): r.bounds[s][1] - r.bounds[s][0] for r, s in items},
                                 {label(r, s): r.commits[s]["offset"] for r, s in items if s in r.commits},
                                 log, self.cfg.workers.progress_interval_s)
        self.label = label
        pending = deque(items)
        running: dict[Any, tuple[int, Run, int]] = {}  # generator -> (worker slot, run, shard)
        idle = list(range(len(self.pool.actors)))
        last_change = time.monotonic()
        while pending or running:
            if pending and not running and not idle:  # every slot retired: nothing could ever progress
                raise RunFailed(f"no worker left to run {len(pending)} shard(s): the cluster has no room for one beside "
                                f"a decode task (workers.preprocess_cpus={self.cfg.workers.preprocess_cpus:g}); "
                                "a rerun with the same run_id goes on from the last commits")
            while pending and idle:
                run, shard = pending.popleft()
                slot = self.pool.pick(idle, run.run_id)
                idle.remove(slot)
                running[self._start(slot, run, shard)] = (slot, run, shard)
            if not pending and idle and not self.pool.keep:
                self.pool.release(idle)  # nothing left for them: free their CPUs / GPUs for others
                idle = []
            ready, _ = ray.wait(list(running), num_returns=1, timeout=self.cfg.workers.progress_interval_s)
            for gen in ready:
                slot, run, shard = running.pop(gen)
                try:
                    chunk = ray.get(next(gen))
                except StopIteration:
                    idle.append(slot)
                    continue
                except WORKER_DIED as exc:
                    self._worker_died(slot, run, shard, exc)
                    pending.appendleft((run, shard))
                    if self.pool.actors[slot] is not None:  # replaced; else retired: a live worker takes the shard
                        idle.append(slot)
                    continue
                running[gen] = (slot, run, shard)
                with critical():  # a signal waits for the commit (and a finished run's summary)
                    self._commit(slot, run, chunk)
                last_change = time.monotonic()
            if self.progress.poll(self.pool, {g: (slot, label(r, s)) for g, (slot, r, s) in running.items()}):
                last_change = time.monotonic()
            if running and not self._any_ready(running.values()):
                last_change = time.monotonic()  # the stall clock starts when a worker is built, not before
            if running and time.monotonic() - last_change > self.cfg.workers.stall_timeout_s:
                waiting = ", ".join(f"shard {s} of {r.run_id} on {self.pool.name(slot)}" for slot, r, s in running.values())
                raise RunFailed(f"no row done for {self.cfg.workers.stall_timeout_s:g} s "
                                f"(workers.stall_timeout_s): waiting for {waiting}")
        self.progress.finish()

    def _any_ready(self, items: Any) -> bool:
        """Whether a running item's worker has finished its start-up (a fresh worker's boot under
        load takes longer than a short stall timeout)."""
        for slot, _, _ in items:
            name = self.pool.name(slot)
            if name in self.ready_seen:
                return True
            ref = self.pool.ready.get(name)
            if ref is not None and ray.wait([ref], timeout=0)[0]:
                self.ready_seen.add(name)
                return True
        return False

    def _start(self, slot: int, run: Run, shard: int) -> Any:
        key = (run.run_id, shard)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        commit = run.commits.get(shard)
        start, end = run.bounds[shard]
        offset = commit["offset"] if commit else 0
        task = {"shard": shard, "first_position": start, "offset": offset,
                "batch_index": commit["batch_index"] if commit else 0,
                "prev_domain": commit["prev_domain"] if commit else None,
                "checkpoint_every": run.cfg.workers.checkpoint_every, "precision": run.cfg.workers.precision,
                "save_probs": run.cfg.outputs.save_probs,
                "prefetch_blocks": run.inputs_spec.prefetch_blocks, "final_state": Probes.active(run)}
        dataset = shard_dataset(run.inputs_spec, start + offset, end)
        state = load_state(run.run_dir, commit)
        self.pool.serving[slot] = run.run_id
        return self.pool.actors[slot].run_shard.options(
            num_returns="streaming", _generator_backpressure_num_objects=CHUNKS_AHEAD
        ).remote(task, dataset, state, run.worker_spec)

    def _commit(self, slot: int, run: Run, chunk: dict[str, Any]) -> None:
        shard = chunk["shard"]
        self.pool.nodes[slot] = chunk.get("node")
        first = (chunk.get("timeline") or {}).get("first_batch")
        if first is not None and (run.first_step_at is None or first < run.first_step_at):
            run.first_step_at, run.first_timeline = first, chunk.get("timeline")
        first_offset = (run.commits.get(shard) or {}).get("offset", 0)
        run.commits[shard] = commit_chunk(run.run_dir, chunk, run.commits.get(shard), run.fingerprint,
                                         run.columns)
        self.probes.after_commit(run, {**chunk, "first_offset": first_offset}, run.commits[shard])
        if run.cfg.ttt.log_out:
            append_log(run.run_dir / run.cfg.ttt.log_out, chunk["analysis"])  # relative to the run dir
        self.progress.committed(self.label(run, shard), chunk["offset"], done=chunk["done"])
        if chunk["done"]:
            run.remaining.discard(shard)
            if not run.remaining:
                self.probes.drain(run)
                self.on_run_done(run)

    def _worker_died(self, slot: int, run: Run, shard: int, exc: BaseException) -> None:
        attempt = self.attempts.get((run.run_id, shard), 1)
        commit = run.commits.get(shard)
        resume_at = commit["offset"] if commit else 0
        death = {"run_id": run.run_id, "shard": shard, "from_row": resume_at, "worker": self.pool.name(slot),
                 "error": type(exc).__name__}
        if attempt >= self.cfg.workers.max_shard_attempts:
            self.pool.resumes.append({**death, "from_row": None, "gave_up": True})  # run.json records the last death too
            raise RunFailed(f"shard {shard} of {run.run_id} failed {attempt} time(s) "
                            f"(workers.max_shard_attempts={self.cfg.workers.max_shard_attempts}); last: "
                            f"{type(exc).__name__} on {self.pool.name(slot)}; a rerun with run_id={run.run_id} "
                            f"goes on from row {resume_at} of the shard") from exc
        self.pool.resumes.append(death)
        run.record_resumes(self.pool)
        log(f"WARNING: worker {self.pool.name(slot)} died on shard {shard} of {run.run_id} ({type(exc).__name__}); "
            f"a fresh worker goes on from row {resume_at} of the shard (its last commit); "
            f"attempt {attempt + 1} of {self.cfg.workers.max_shard_attempts}")
        self.progress.rewind(self.label(run, shard), resume_at)
        if not self.pool.replace(slot, node_lost=isinstance(exc, ActorUnavailableError)):
            log(f"the cluster has no room for a replacement beside {self.pool.live()} live worker(s) and the decode "
                f"tasks (a node was lost?): shard {shard} of {run.run_id} waits for a live worker")
