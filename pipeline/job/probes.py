"""The driver's side of the forgetting / transfer probes (`probes.every > 0`; workers/probe.py).

After a shard's chunk commits (pipeline/job/scheduler.py calls `after_commit`), every
`probes.every`-th committed checkpoint of the shard, its final state, and once per shard the
source model (position 0) are sent to the run's probe actor (created on first use, one per run,
`probes.num_cpus` CPUs) with the position they stand at. The stream never waits for a probe: the
driver only puts the state's bytes (already in its memory for the commit) into the object store;
finished probes are collected at later commits, and all of a run's before the run is finished
(`drain`). Rows land in `<run>/probes/part-<shard>-<chunk>.parquet` (ttt/schema.py PROBES_SCHEMA;
`chunk` -1 = the source model), written atomically, so a resumed run rewrites what it rescored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from pipeline.job.outputs import _write_part
from ttt.schema import PROBES_SCHEMA, to_table


class Probes:
    def __init__(self) -> None:
        self.actors: dict[str, Any] = {}
        self.pending: dict[Any, Any] = {}  # ObjectRef -> run
        self.last: dict[tuple[str, int], int] = {}  # (run, shard) -> position last probed

    @staticmethod
    def active(run: Any) -> bool:
        return run.cfg.probes.every > 0

    def after_commit(self, run: Any, chunk: dict[str, Any], commit: dict[str, Any]) -> None:
        if not self.active(run):
            return
        where = {"run_id": run.run_id, "shard": chunk["shard"]}
        if commit["chunk"] == 0 and chunk.get("first_offset", 0) == 0:
            self._submit(run, None, {**where, "chunk": -1, "position": 0, "batch_index": 0})
        state = chunk.get("final_state") if chunk["done"] else chunk.get("method_state")
        due = chunk["done"] or (commit["chunk"] + 1) % run.cfg.probes.every == 0
        # the last chunk may hold no batch (the stream ended on a checkpoint): its state was probed already
        if state is not None and due and self.last.get((run.run_id, chunk["shard"])) != commit["offset"]:
            self.last[(run.run_id, chunk["shard"])] = commit["offset"]
            self._submit(run, state, {**where, "chunk": commit["chunk"], "position": commit["offset"],
                                      "batch_index": commit["batch_index"]})
        self.collect(timeout=0)

    def _actor(self, run: Any) -> Any:
        if run.run_id not in self.actors:
            from workers.probe import ProbeActor

            p = run.cfg.probes
            sources = {"manifest": str(Path(run.cfg.data.manifest).resolve()), "per_domain": p.per_domain,
                       "clean": None if p.clean is None else str(Path(p.clean).resolve()), "clean_n": p.clean_n,
                       "seed": p.seed}
            self.actors[run.run_id] = ProbeActor.options(num_cpus=p.num_cpus).remote(run.worker_spec, sources, p.threads)
        return self.actors[run.run_id]

    def _submit(self, run: Any, state: bytes | None, where: dict[str, Any]) -> None:
        ref = self._actor(run).score.remote(None if state is None else ray.put(state), where)
        self.pending[ref] = run

    def collect(self, timeout: float | None = 0, run: Any = None) -> None:
        refs = [r for r, owner in self.pending.items() if run is None or owner is run]
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            owner = self.pending.pop(ref)
            rows = ray.get(ref)
            if rows:
                shard, chunk = rows[0]["shard"], rows[0]["chunk"]
                name = f"part-{shard:05d}-{'source' if chunk < 0 else f'{chunk:05d}'}.parquet"
                _write_part(owner.run_dir / "probes", name, to_table(rows, PROBES_SCHEMA, "probes"))

    def drain(self, run: Any) -> None:
        """Wait for the run's outstanding probes, write them, release its actor."""
        if run.run_id not in self.actors:
            return
        self.collect(timeout=None, run=run)
        ray.kill(self.actors.pop(run.run_id))
