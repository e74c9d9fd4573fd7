"""The worker pool: one actor per slot, how many there are (`worker_plan`), where they go, and
the rules for replacing one that died; the run's shared KB and adapter-cache actors; and the pool
a driver keeps between runs inside `warm_workers()`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import RunConfig
from workers.adapter_cache import get_or_create_adapter_cache
from workers.kb_actor import get_or_create_kb_actor
from workers.ttt_worker import TTTWorkerActor, embedder_name, kb_payload


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
        self.ready: dict[str, Any] = {}  # worker name -> ref that resolves when it is built (stall clock)
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
        actor = TTTWorkerActor.options(**options).remote(self.spec, self.names[slot])
        self.ready[self.names[slot]] = actor.__ray_ready__.remote()  # resolves once its constructor is done
        return actor

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


def _kill(*actors: Any) -> None:
    """Kill actors that may already be dead (a worker killed mid-run, a run ending after a failure)."""
    for actor in actors:
        if actor is None:
            continue
        try:
            ray.kill(actor)
        except Exception:
            pass


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
