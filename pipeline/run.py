"""The job: check and prepare a run, start (or join) Ray, drive one worker actor per shard, and
commit the chunks the workers stream back; then write summary.json and run.json.

Read top to bottom: `run_job` is the whole story. The manifest is cut into `num_shards`
contiguous, ordered row ranges (only its Parquet metadata is read here: nothing is
materialised on the driver). A worker takes one shard at a time; its rows arrive decoded and
preprocessed by Ray Data operators (pipeline/inputs.py) and it streams back, every
`workers.checkpoint_every` batches, the rows since the last chunk plus a checkpoint of its
adaptation state. The driver commits each chunk atomically (pipeline/outputs.py) and holds at
most two uncommitted chunks per shard (Ray's generator backpressure). A worker that dies is
replaced (away from its node when another is alive) and its shard goes on from the last commit;
a driver killed and rerun with the same run_id does the same. The rows equal an undisturbed
run's, bit for bit, and every restart is printed and counted in run.json. Several runs share one
pool (`run_jobs`, a campaign's cells), and inside `warm_workers()` a driver's later runs start on
the pool its last run kept.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import threading
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.checks import check_gpus, check_resume, prepare_run
from pipeline.checks import prepare  # noqa: F401  (the CLI and the harness prepare through here)
from pipeline.config import ConfigError, RunConfig
from pipeline.fingerprint import inputs_fingerprint, run_fingerprint
from pipeline.inputs import InputSpec, count_rows, shard_dataset, warm_up
from pipeline.meta import git_commit, new_run_id, package_versions, source_hash
from pipeline.outputs import (RunFailed, append_log, commit_chunk, committed_shards, load_state, summarise_run,
                              write_json)
from pipeline.progress import Progress
from pipeline.settings import read_manifest_meta
from ttt.methods import method_class
from workers.adapter_cache import get_or_create_adapter_cache
from workers.kb_actor import get_or_create_kb_actor
from workers.ttt_worker import TTTWorkerActor, embedder_name, kb_payload

WORKER_DIED = (RayActorError, ActorDiedError, ActorUnavailableError)
CHUNKS_AHEAD = 2  # uncommitted chunks a worker may stream ahead of the driver


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def run_job(cfg: RunConfig) -> Path:
    """One run; its run directory."""
    return run_jobs([cfg])[0]


def run_jobs(cfgs: list[RunConfig], on_done: Callable[[int, Path], None] | None = None) -> list[Path]:
    """Several runs (a campaign's cells) over ONE worker pool: every (run, shard) is a work item
    the scheduler hands to the next free worker, which keeps its loaded model when the next item's
    model is the same. Each run is written, resumable and finished on its own, exactly as if run
    alone (same rows, same run directory layout); `on_done(index, run_dir)` is called as each ends."""
    started_at = time.time()
    runs = [Run.prepare(cfg) for cfg in cfgs]  # every refusal happens here, before Ray starts
    prepared_at = time.time()
    resources = init_ray()
    ray_ready_at = time.time()
    for run in runs:
        check_gpus(run.cfg, resources)
    for run in runs:
        run.open(resources)
    quiet_ray_data()
    timing = {"started_at": started_at, "prepare_s": prepared_at - started_at, "ray_ready_s": ray_ready_at - started_at}
    pool: Pool | None = None
    try:
        pending = [(run, shard) for run in runs for shard in run.todo]
        index = {id(run): i for i, run in enumerate(runs)}

        def finished(run: Run) -> None:
            run.finish(pool, timing)
            if on_done is not None:
                on_done(index[id(run)], run.run_dir)

        for run in runs:
            if not run.todo:
                finished(run)
        if pending:
            threading.Thread(target=warm_up, args=(pending[0][0].inputs_spec,), daemon=True).start()
            lead_run = pending[0][0]  # runs finished by an earlier driver hold no worker spec
            lead = lead_run.cfg
            pool = pool_for(lead, worker_plan(lead, resources, len(pending)), lead_run.worker_spec)
            log(f"{len(pending)} shard(s) of {sum(1 for r in runs if r.todo)} run(s) on {len(pool.actors)} "
                f"{'warm ' if pool.runs > 1 else ''}worker(s), checkpoint every {lead.workers.checkpoint_every} batches")
            Scheduler(lead, pool, on_run_done=finished).run(pending)
            keep_warm(pool)
            pool = None
        return [run.run_dir for run in runs]
    except BaseException as exc:
        for run in runs:
            run.fail(exc, pool)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        for run in runs:
            run.close()


# The pool `warm_workers()` keeps between runs; None outside such a block.
_warm: dict[str, "Pool | None"] | None = None


@contextlib.contextmanager
def warm_workers() -> Iterator[None]:
    """Keep the worker pool between the runs of this driver (a notebook's or a script's loop over
    configs): a run whose pool would be the same (workers, CPUs and GPUs each) starts on the last
    run's workers, with torch imported and the model loaded, instead of paying a fresh worker's
    start-up (~4 s on the dev box, see BENCHMARKS.md). Inside the block, a run's idle workers keep
    their resources until the block ends; outside, they release them as soon as no shard is left."""
    global _warm
    if _warm is not None:  # nested: the outer block owns the pool
        yield
        return
    _warm = {"pool": None}
    try:
        yield
    finally:
        pool, _warm = _warm["pool"], None
        if pool is not None and ray.is_initialized():
            pool.shutdown()


def pool_for(cfg: RunConfig, plan: tuple[int, float], spec: dict[str, Any]) -> "Pool":
    """The kept pool when it matches `plan` and all its workers answer; else a fresh one."""
    kept = _warm.pop("pool", None) if _warm is not None else None
    if kept is not None:
        if kept.matches(cfg, plan):
            kept.cfg, kept.runs, kept.keep = cfg, kept.runs + 1, True
            return kept
        kept.shutdown()
    pool = Pool(cfg, plan, spec)
    pool.keep = _warm is not None
    return pool


def keep_warm(pool: "Pool") -> None:
    """After a run that ended well: keep its pool inside `warm_workers()`, else shut it down."""
    if _warm is not None and pool.live() == len(pool.actors):
        _warm["pool"] = pool
    else:
        pool.shutdown()


class Run:
    """One run's state on the driver: its resolved config, directory, fingerprint, shards and
    commits, and its shared actors (method nn)."""

    @classmethod
    def prepare(cls, cfg: RunConfig) -> "Run":
        cfg, facts = prepare_run(cfg, log)
        run = cls()
        run.cfg, run.facts = cfg, facts
        run.run_id = cfg.run_id or new_run_id(cfg.ttt.method)
        run.run_dir = Path(cfg.output_root) / run.run_id
        run.inputs = inputs_fingerprint(cfg.data.manifest, cfg.model.model_dump())
        run.fingerprint = run_fingerprint(cfg.config_hash(), run.inputs)  # what each shard's commit records
        run.earlier = check_resume(run.run_dir, cfg, run.inputs)  # an earlier driver's run.json, or None
        run.shared, run.status = None, "prepared"
        return run

    def open(self, resources: dict[str, float]) -> None:
        """Create the run directory and run.json (a resumed run's keeps its history); find what is
        already committed."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        n_rows = count_rows(cfg.data.manifest, cfg.data.limit)
        self.bounds = shard_bounds(n_rows, cfg.workers.num_shards)
        self.commits = committed_shards(self.run_dir, self.fingerprint, warn=log)
        self.todo = [s for s, (a, b) in enumerate(self.bounds) if b > a and not self.commits.get(s, {}).get("done")]
        self.resumed = {s: c["offset"] for s, c in self.commits.items() if s in self.todo}
        log(f"run {self.run_id}: {n_rows} rows, {len(self.bounds)} shards, method {cfg.ttt.method}")
        earlier = self.earlier
        if earlier is not None and earlier.get("status") == "finished" and not self.todo \
                and (self.run_dir / "summary.json").exists():
            log(f"{self.run_id} is finished already: {self.run_dir} is left as it is")
            self.info, self.status, self.shared = earlier, "finished", None
            return
        if self.commits:
            where = "".join(f", shard {s} from row {o}" for s, o in self.resumed.items())
            log(f"resuming {self.run_id}: {len(self.bounds) - len(self.todo)} shard(s) done{where}, "
                f"{len(self.todo)} to go")
        self.info = run_info(cfg.model_copy(update={"run_id": self.run_id}), self.run_id, resources, self.inputs)
        # a resumed run's record keeps what its earlier drivers saw; each driver restart that went
        # on mid-shard is a resume like a worker's
        self.history = {"resumes": (earlier or {}).get("resumes") or [], "workers": (earlier or {}).get("workers") or []}
        self.history["resumes"] += [{"run_id": self.run_id, "shard": s, "from_row": o, "worker": None,
                                     "error": "driver restarted"} for s, o in self.resumed.items() if o > 0]
        if earlier is not None:  # started_at stays the first driver's; resumed_at lists the later ones
            self.info["resumed_at"] = [*(earlier.get("resumed_at") or []), self.info["started_at"]]
            self.info["started_at"] = earlier.get("started_at", self.info["started_at"])
        self._note_resumes(None)
        self.info["workers"] = self.history["workers"]
        write_json(self.run_dir / "run.json", self.info)
        self.status = "running"
        self.shared = SharedActors(cfg, self.run_id) if self.todo else None
        self.inputs_spec = InputSpec(
            manifest=cfg.data.manifest, kind=cfg.model.kind, model=cfg.model.model_dump(),
            num_classes=self.facts.get("num_classes"), read_timeout_s=cfg.data.read_timeout_s,
            rows_per_block=cfg.workers.rows_per_block, prefetch_blocks=cfg.workers.prefetch_blocks,
            cpus_per_task=cfg.workers.preprocess_cpus)
        self.worker_spec = {"run_id": self.run_id, "model": cfg.model.model_dump(), "ttt": cfg.ttt.model_dump(),
                            "torch_threads": cfg.workers.torch_threads, "num_gpus": cfg.workers.num_gpus,
                            "read_timeout_s": cfg.data.read_timeout_s,
                            "services": self.shared.spec if self.shared else None}
        self.remaining = set(self.todo)
        self.first_step_at: float | None = None
        self.first_timeline: dict[str, float] | None = None  # the first shard to step: its worker's start-up
        self.t0 = time.perf_counter()

    def finish(self, pool: "Pool | None", timing: dict[str, float]) -> None:
        """All shards committed: summary.json, run.json `finished`."""
        if self.status == "finished":  # finished by an earlier driver: nothing new to record
            return
        summary = summarise_run(self.run_dir)
        wall = time.perf_counter() - self.t0
        processed = sum(self.bounds[s][1] - self.bounds[s][0] - self.resumed.get(s, 0) for s in self.todo)
        summary["throughput"] = {
            "wall_s": wall, "rows_processed": processed,
            "samples_per_s": processed / wall if wall > 0 and processed else None,
            # where the time before the first adapted batch goes (seconds from the job's start)
            "prepare_s": timing["prepare_s"], "ray_ready_s": timing["ray_ready_s"],
            "first_step_s": None if self.first_step_at is None else self.first_step_at - timing["started_at"],
            "startup": startup_breakdown(self.first_timeline, timing["started_at"])}
        summary["cache"] = self.shared.cache_stats() if self.shared is not None else None
        write_json(self.run_dir / "summary.json", summary)
        self.info["counts"].update(rows=summary["overall"]["n"], errors=summary["overall"]["errors_rows"],
                                   shards=len(self.bounds))
        self._note_resumes(pool)
        self.info.update(status="finished", ended_at=_now(), output_dir=str(self.run_dir.resolve()),
                         workers=self.history["workers"] + (pool.placement() if pool else []))
        write_json(self.run_dir / "run.json", self.info)
        self.status = "finished"
        if self.shared is not None:
            self.shared.shutdown()
            self.shared = None

    def record_resumes(self, pool: "Pool") -> None:
        """Write the resumes so far to run.json at once, so a driver killed later does not lose them."""
        self._note_resumes(pool)
        write_json(self.run_dir / "run.json", self.info)

    def _note_resumes(self, pool: "Pool | None") -> None:
        """run.json's `resumes` and `counts.restarts`: earlier drivers', this driver's restart, this
        driver's workers'."""
        resumes = self.history["resumes"] + [r for r in (pool.resumes if pool else []) if r["run_id"] == self.run_id]
        self.info["resumes"] = resumes
        self.info["counts"]["restarts"] = restarts(resumes)

    def fail(self, exc: BaseException, pool: "Pool | None") -> None:
        if self.status != "running":
            return
        self._note_resumes(pool)
        self.info.update(status="failed", ended_at=_now(), error=f"{type(exc).__name__}: {exc}")
        try:
            write_json(self.run_dir / "run.json", self.info)
        except OSError as write_exc:  # a full disk may refuse even this small file
            log(f"WARNING: could not mark {self.run_dir / 'run.json'} failed: {write_exc}")
        self.status = "failed"

    def close(self) -> None:
        if self.shared is not None:
            self.shared.shutdown()


class Scheduler:
    """Hands (run, shard) items to workers and commits the chunks they stream back, in any order
    across shards and in stream order within one; a run is finished when its last shard is."""

    def __init__(self, cfg: RunConfig, pool: "Pool", on_run_done: Callable[[Run], None]):
        self.cfg, self.pool, self.on_run_done = cfg, pool, on_run_done
        self.attempts: dict[tuple[str, int], int] = {}
        self.progress: Progress | None = None

    def run(self, items: list[tuple[Run, int]]) -> None:
        single = len({id(run) for run, _ in items}) == 1
        label = (lambda run, s: f"s{s}") if single else (lambda run, s: f"{run.run_id[-24:]}/s{s}")
        self.progress = Progress({label(r, s): r.bounds[s][1] - r.bounds[s][0] for r, s in items},
                                 {label(r, s): r.commits[s]["offset"] for r, s in items if s in r.commits},
                                 log, self.cfg.workers.progress_interval_s)
        self.label = label
        pending = deque(items)
        running: dict[Any, tuple[int, Run, int]] = {}  # generator -> (worker slot, run, shard)
        idle = list(range(len(self.pool.actors)))
        last_change = time.monotonic()
        while pending or running:
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
                self._commit(slot, run, chunk)
                last_change = time.monotonic()
            if self.progress.poll(self.pool, {g: (slot, label(r, s)) for g, (slot, r, s) in running.items()}):
                last_change = time.monotonic()
            if running and time.monotonic() - last_change > self.cfg.workers.stall_timeout_s:
                waiting = ", ".join(f"shard {s} of {r.run_id} on {self.pool.name(slot)}" for slot, r, s in running.values())
                raise RunFailed(f"no row done for {self.cfg.workers.stall_timeout_s:g} s "
                                f"(workers.stall_timeout_s): waiting for {waiting}")
        self.progress.finish()

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
                "prefetch_blocks": run.inputs_spec.prefetch_blocks}
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
        run.commits[shard] = commit_chunk(run.run_dir, chunk, run.commits.get(shard), run.fingerprint)
        if run.cfg.ttt.log_out:
            append_log(run.run_dir / run.cfg.ttt.log_out, chunk["analysis"])  # relative to the run dir
        self.progress.committed(self.label(run, shard), chunk["offset"], done=chunk["done"])
        if chunk["done"]:
            run.remaining.discard(shard)
            if not run.remaining:
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


class Pool:
    """Worker actors, one slot each, replaced on death. Names carry the run id so tests and users
    can find them; `nodes` remembers where each slot's worker ran, so a replacement is placed on
    another live node when there is one."""

    def __init__(self, cfg: RunConfig, plan: tuple[int, float], spec: dict[str, Any]):
        self.cfg, self.spec = cfg, spec  # the spec workers start with; each task names its run's
        self.tag = spec["run_id"]
        size, self.num_cpus = plan
        self.generation, self.restarts = 0, 0
        self.resumes: list[dict[str, Any]] = []  # where each shard whose worker died went on from
        self.nodes: list[str | None] = [None] * size
        self.names: list[str] = [""] * size
        self.serving: list[str | None] = [None] * size  # the run each slot's worker last served
        self.keep, self.runs = False, 1  # kept for the next run (`warm_workers`); runs served
        self.job = ray.get_runtime_context().get_job_id()
        self.actors = [self._start(i) for i in range(size)]

    def matches(self, cfg: RunConfig, plan: tuple[int, float]) -> bool:
        """Whether this pool can serve a run planned as `plan`: same driver connection, same
        workers and resources each, every worker alive and answering."""
        if ray.get_runtime_context().get_job_id() != self.job or self.live() != len(self.actors):
            return False
        if (len(self.actors), self.num_cpus, self.cfg.workers.num_gpus) != (*plan, cfg.workers.num_gpus):
            return False
        try:
            ray.get([a.progress.remote() for a in self.actors], timeout=10)
        except Exception:
            return False
        return True

    def pick(self, idle: list[int], run_id: str) -> int:
        """An idle slot, preferring one whose worker already serves `run_id` (no method rebuild)."""
        return next((slot for slot in idle if self.serving[slot] == run_id), idle[0])

    def _start(self, slot: int, avoid_node: str | None = None) -> Any:
        self.generation += 1
        self.names[slot] = f"ttt-{self.tag}-w{slot}-g{self.generation}"
        options: dict[str, Any] = {"name": self.names[slot], "num_cpus": self.num_cpus,
                                   "num_gpus": self.cfg.workers.num_gpus, "max_concurrency": 2, "max_restarts": 0}
        other = _another_live_node(avoid_node) if avoid_node else None
        # replicas spread over the nodes (a lost node costs the fewest shards); a replacement goes to
        # another live node than the one its predecessor died on
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(other, soft=True) if other else "SPREAD"
        return TTTWorkerActor.options(**options).remote(self.spec, self.names[slot])

    def placement(self) -> list[dict[str, Any]]:
        """Where each slot's last worker ran (the node id its chunks reported)."""
        return [{"worker": name, "node": node} for name, node in zip(self.names, self.nodes)]

    def name(self, slot: int) -> str:
        return self.names[slot]

    def live(self) -> int:
        return sum(a is not None for a in self.actors)

    def replace(self, slot: int, node_lost: bool = False) -> bool:
        """Start a fresh worker in `slot`, on another live node than the lost one when there is
        one; or, when the cluster (shrunk by a lost node) cannot hold it beside the live workers
        and one decode task, retire the slot (False) so its shard waits for a live worker instead
        of a replacement that would take the decode tasks' last CPU and stall the run.
        `node_lost`: the worker became unreachable (`ActorUnavailableError`), which Ray can report
        before it marks the node dead, so that node's CPUs are not counted."""
        self.restarts += 1
        self.serving[slot] = None
        _kill(self.actors[slot])
        self.actors[slot] = None
        cpus = _live_cpus(exclude=self.nodes[slot] if node_lost else None)
        others = self.live()
        if others and (others + 1) * self.num_cpus + self.cfg.workers.preprocess_cpus > cpus + 1e-9:
            return False
        self.actors[slot] = self._start(slot, avoid_node=self.nodes[slot])
        return True

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            _kill(self.actors[slot])
            self.actors[slot] = None

    def shutdown(self) -> None:
        _kill(*self.actors)


def _live_cpus(exclude: str | None = None) -> float:
    """The CPUs of the nodes Ray counts alive, less those of node `exclude`."""
    return float(sum(n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes()
                     if n.get("Alive") and n["NodeID"] != exclude))


def _another_live_node(avoid: str) -> str | None:
    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != avoid
             and n.get("Resources", {}).get("CPU", 0) > 0]
    return alive[0] if alive else None


class SharedActors:
    """The run's shared KB and adapter-cache actors (method nn), named after the run, created once
    by the driver; workers find them by name. Killed when the run ends."""

    def __init__(self, cfg: RunConfig, run_id: str):
        self.cfg, self.kb, self.cache = cfg, None, None
        self.spec: dict[str, Any] | None = None
        if cfg.ttt.method != "nn":
            return
        kb_name = f"kb-{run_id}"
        self.kb = get_or_create_kb_actor(cfg.kb.dir, name=kb_name, num_cpus=cfg.kb.num_cpus, threads=cfg.kb.threads)
        self.spec = {"kb": {"actor": kb_name, "embedder": embedder_name(cfg.model.model_dump()),
                            "payload": kb_payload(cfg.model.model_dump()),
                            "nprobe": cfg.kb.nprobe, "ef_search": cfg.kb.ef_search}, "cache": None}
        nn = cfg.ttt.nn
        if nn.use_cache:
            cache_name = f"adapter-cache-{run_id}"
            self.cache = get_or_create_adapter_cache(name=cache_name, capacity=nn.cache_capacity,
                                                     threshold=nn.cache_threshold, eviction=nn.cache_eviction,
                                                     seed=cfg.ttt.seed)
            self.spec["cache"] = cache_name

    def cache_stats(self) -> dict[str, Any] | None:
        return None if self.cache is None else ray.get(self.cache.stats.remote())

    def shutdown(self) -> None:
        _kill(self.kb, self.cache)


_SharedActors = SharedActors  # the name the LM harness imports


def _kill(*actors: Any) -> None:
    """Kill actors that may already be dead (a worker killed mid-run, a run ending after a failure)."""
    for actor in actors:
        if actor is None:
            continue
        try:
            ray.kill(actor)
        except Exception:
            pass


# Ray kills idle worker processes beyond one per CPU after 1 s; decode tasks come in bursts as the
# workers consume, so the processes that ran them (with pyarrow, PIL and torch imported) died between
# bursts and the next block waited ~2 s for a cold one. A local instance keeps them 30 s.
LOCAL_IDLE_WORKER_KILL_MS = "30000"


def init_ray(num_cpus: int | None = None) -> dict[str, float]:
    """Join the cluster at RAY_ADDRESS, else start a local instance (no dashboard; `num_cpus`
    None = the machine's); the cluster's resources, without the per-node entries."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address and address.startswith(("http://", "https://")):
            raise ConfigError(f"RAY_ADDRESS={address} is a job server's address (for `ray job submit`); a run "
                              "joins a cluster at its GCS address, e.g. RAY_ADDRESS=<head-ip>:6379")
        if address:
            log(f"connecting to the Ray cluster at {address}")
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", LOCAL_IDLE_WORKER_KILL_MS)
            log("starting a local Ray instance")
            ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=num_cpus)
    return {k: float(v) for k, v in ray.cluster_resources().items() if "node:" not in k}


def quiet_ray_data() -> None:
    """The driver prints its own progress; Ray Data's bars and start-up notices would only repeat it."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def worker_plan(cfg: RunConfig, resources: dict[str, float], shards_left: int) -> tuple[int, float]:
    """(number of workers, CPUs each asks for). The pool never takes the CPUs that one Ray Data
    decode task needs (`workers.preprocess_cpus`), for any shard count: when `workers.num_cpus`
    does not fit beside that reserve, the workers ask for what is left (possibly 0: they still
    run, Ray just does not count them)."""
    cpus = resources.get("CPU", 1.0) - (cfg.kb.num_cpus if cfg.ttt.method == "nn" else 0.0)  # the shared KB actor
    budget = max(0.0, cpus - cfg.workers.preprocess_cpus)
    per = cfg.workers.num_cpus
    if cfg.workers.num_workers is not None:
        n = cfg.workers.num_workers
    elif per > 0:
        n = max(1, int(budget // per))
    else:
        n = shards_left
    if cfg.workers.num_gpus > 0:
        n = min(n, max(1, int(resources.get("GPU", 0.0) // cfg.workers.num_gpus)))
    n = max(1, min(n, shards_left))
    return n, min(per, budget / n)


def restarts(resumes: list[dict[str, Any]]) -> int:
    """How many times a shard went on after a worker or driver died (a death the run gave up on is not one)."""
    return sum(1 for r in resumes if not r.get("gave_up"))


def startup_breakdown(timeline: dict[str, float] | None, started_at: float) -> dict[str, float] | None:
    """The first adapted batch's way there, in seconds from the job's start: when its worker's
    process started, had imported its modules (torch), was ready (model and method built), was given
    the shard, received the first decoded block, and finished the first batch."""
    if not timeline:
        return None
    return {f"{k}_s": round(v - started_at, 3) for k, v in timeline.items() if v is not None}


def shard_bounds(n_rows: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous near-equal [start, end) ranges; the first `n % k` shards get one row more."""
    base, extra = divmod(n_rows, n_shards)
    bounds, start = [], 0
    for i in range(n_shards):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def run_info(cfg: RunConfig, run_id: str, resources: dict[str, float], inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id, "experiment": cfg.experiment, "tag": cfg.tag, "status": "running",
        "model": cfg.model.path if cfg.model.kind == "causal_lm" else cfg.model.factory,
        "method": cfg.ttt.method, "dataset": cfg.data.dataset,
        "config": cfg.model_dump(mode="json"), "config_hash": cfg.config_hash(), "inputs_fingerprint": inputs,
        "manifest_meta": read_manifest_meta(cfg.data.manifest),
        "predict_from": cfg.ttt.predict_from or method_class(cfg.ttt.method, cfg.model.kind).default_predict_from,
        "versions": package_versions(), "git_commit": git_commit(), "source_hash": source_hash(),
        "python": platform.python_version(),
        "started_at": _now(), "ended_at": None,
        "counts": {"rows": None, "errors": None, "shards": cfg.workers.num_shards, "restarts": 0},
        "cluster_resources": resources, "error": None,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


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
        lines.append(f"{'mean':<16}{'':>7}{100 * sum(per) / len(per):>10.2f}")
    o = summary["overall"]
    if o.get("bits_per_byte") is not None:
        lines.append(f"bits per byte {o['bits_per_byte']:.4f} (all scored bytes)")
    lines.append(f"rows {o['n']}, error rows {o['errors_rows']}, {summary['throughput']['samples_per_s'] or 0:.2f} samples/s")
    if summary.get("cache"):
        c = summary["cache"]
        lines.append(f"adapter cache: hit rate {c['hit_rate']:.2f} ({c['hits']} hits, {c['misses']} misses, "
                     f"{c['evictions']} evictions)")
    lines.append(f"run dir:  {run_dir.resolve()}")
    lines.append(f"results:  {(run_dir / 'results').resolve()}")
    lines.append(f"analysis: {(run_dir / 'analysis').resolve()}")
    return "\n".join(lines)
