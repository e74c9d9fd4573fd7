"""The worker pool: one actor per slot, how many there are (`worker_plan`), where they go, and
the rules for replacing one that died; the run's shared KB and adapter-cache actors; and the pool
a driver keeps between runs inside `warm_workers()`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import RunConfig
from workers.adapter_cache import get_or_create_adapter_cache
from workers.kb_actor import get_or_create_kb_actor
from workers.ttt_worker import TTTWorkerActor, embedder_name, kb_payload


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers, the CPUs each asks Ray for, and the node each slot is placed on."""

    size: int
    num_cpus: float
    nodes: tuple[str | None, ...]  # None: no node known (Ray spreads them)


def worker_plan(cfg: RunConfig, resources: dict[str, float], shards_left: int,
                node_cpus: dict[str, float] | None = None) -> WorkerPlan:
    """Sized and placed per node: every node that holds workers keeps the CPUs one Ray Data decode
    task needs (`workers.preprocess_cpus`) free, for any shard count, so no node's workers can take
    its whole CPU and leave their own inputs nowhere to be decoded (on a cluster of 1-CPU nodes, a
    plan sized from the total put two workers on one node, and when the other node was lost nothing
    progressed). When `workers.num_cpus` does not fit beside that reserve, the workers ask for what
    is left (possibly 0: they still run, Ray just does not count them). `node_cpus`: the live
    nodes' CPUs (None: one node with the cluster's)."""
    nodes = {k: v for k, v in (node_cpus or {None: resources.get("CPU", 1.0)}).items() if v > 0} or {None: 1.0}
    free = {node: cpus - cfg.workers.preprocess_cpus for node, cpus in nodes.items()}
    if cfg.ttt.method == "nn":  # the shared KB actor
        largest = max(free, key=free.get)
        free[largest] -= cfg.kb.num_cpus
    per = cfg.workers.num_cpus
    if cfg.workers.num_workers is not None:
        n = cfg.workers.num_workers
    elif per > 0:
        n = max(1, sum(int(max(0.0, f) // per + 1e-9) for f in free.values()))
    else:
        n = shards_left
    if cfg.workers.num_gpus > 0:
        n = min(n, max(1, int(resources.get("GPU", 0.0) // cfg.workers.num_gpus)))
    n = max(1, min(n, shards_left))
    counts = dict.fromkeys(free, 0)
    placed: list[str | None] = []
    for _ in range(n):  # each slot to the node where a worker would get the most CPU: spread, by size
        node = max(free, key=lambda k: (free[k] / (counts[k] + 1), -counts[k]))
        counts[node] += 1
        placed.append(node)
    share = min(max(0.0, free[k]) / c for k, c in counts.items() if c)
    return WorkerPlan(n, min(per, share), tuple(placed))


def live_node_cpus(exclude: str | None = None) -> dict[str, float]:
    """The CPUs of each node Ray counts alive, less node `exclude`."""
    return {n["NodeID"]: float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes()
            if n.get("Alive") and n["NodeID"] != exclude}


class Pool:
    """Worker actors, one slot each, replaced on death. Names carry the run id so tests and users
    can find them; `nodes` remembers where each slot's worker ran, so a replacement is placed on
    another live node when there is one."""

    def __init__(self, cfg: RunConfig, plan: WorkerPlan, spec: dict[str, Any]):
        self.cfg, self.spec = cfg, spec  # the spec workers start with; each task names its run's
        self.tag = spec["run_id"]
        size, self.num_cpus = plan.size, plan.num_cpus
        self.generation, self.restarts = 0, 0
        self.resumes: list[dict[str, Any]] = []  # where each shard whose worker died went on from
        self.nodes: list[str | None] = list(plan.nodes)  # planned, then where its chunks say it ran
        self.names: list[str] = [""] * size
        self.serving: list[str | None] = [None] * size  # the run each slot's worker last served
        self.keep, self.runs = False, 1  # kept for the next run (`warm_workers`); runs served
        self.job = ray.get_runtime_context().get_job_id()
        self.ready: dict[str, Any] = {}  # worker name -> ref that resolves when it is built (stall clock)
        self.actors = [self._start(i, plan.nodes[i]) for i in range(size)]

    def matches(self, cfg: RunConfig, plan: WorkerPlan) -> bool:
        """Whether this pool can serve a run planned as `plan`: same driver connection, same
        workers and resources each, every worker alive and answering."""
        if ray.get_runtime_context().get_job_id() != self.job or self.live() != len(self.actors):
            return False
        if (len(self.actors), self.num_cpus, self.cfg.workers.num_gpus) != (plan.size, plan.num_cpus, cfg.workers.num_gpus):
            return False
        try:
            ray.get([a.progress.remote() for a in self.actors], timeout=10)
        except Exception:
            return False
        return True

    def pick(self, idle: list[int], run_id: str) -> int:
        """An idle slot, preferring one whose worker already serves `run_id` (no method rebuild)."""
        return next((slot for slot in idle if self.serving[slot] == run_id), idle[0])

    def _start(self, slot: int, node: str | None) -> Any:
        """A worker for `slot` on `node` (the plan's, or a replacement's): soft affinity, so Ray
        still places it when that node has gone meanwhile; None: Ray spreads them."""
        self.generation += 1
        self.names[slot] = f"ttt-{self.tag}-w{slot}-g{self.generation}"
        options: dict[str, Any] = {"name": self.names[slot], "num_cpus": self.num_cpus,
                                   "num_gpus": self.cfg.workers.num_gpus, "max_concurrency": 2, "max_restarts": 0}
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True) if node else "SPREAD"
        self.nodes[slot] = node
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
        """Start a fresh worker in `slot` on a live node with room for it beside that node's live
        workers and one decode task, another node than its predecessor's when there is one; or,
        when no node has room (the cluster shrank by a lost node), retire the slot (False) so its
        shard waits for a live worker instead of a replacement that would take a node's last
        decode CPU and stall the run. `node_lost`: the worker became unreachable
        (`ActorUnavailableError`), which Ray can report before it marks the node dead, so that
        node is not counted."""
        self.restarts += 1
        self.serving[slot] = None
        _kill(self.actors[slot])
        self.actors[slot] = None
        lost = self.nodes[slot]
        node = self._room(live_node_cpus(exclude=lost if node_lost else None), avoid=lost)
        if node is False:
            return False
        self.actors[slot] = self._start(slot, node)
        return True

    def _room(self, node_cpus: dict[str, float], avoid: str | None) -> str | None | bool:
        """The live node where one more worker fits beside that node's live workers and a decode
        task (the least loaded, `avoid` last); False when none has room while other workers live
        (they go on with the shards); None (Ray places it) for the last worker, or when no slot's
        node is known (then the cluster as a whole must have room)."""
        reserve = self.cfg.workers.preprocess_cpus
        live = [self.nodes[s] for s, a in enumerate(self.actors) if a is not None]
        if None in live or not node_cpus:
            fits = (len(live) + 1) * self.num_cpus + reserve <= sum(node_cpus.values()) + 1e-9
            return None if fits or not live else False
        on = {node: live.count(node) for node in node_cpus}
        fits = [node for node, cpus in node_cpus.items() if (on[node] + 1) * self.num_cpus + reserve <= cpus + 1e-9]
        if not fits:
            return False if live else None
        return min(fits, key=lambda n: (n == avoid, on[n], -node_cpus[n]))

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            _kill(self.actors[slot])
            self.actors[slot] = None

    def shutdown(self) -> None:
        _kill(*self.actors)


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


def pool_for(cfg: RunConfig, plan: WorkerPlan, spec: dict[str, Any]) -> "Pool":
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
