"""The run record on the driver: one run's resolved config, directory, fingerprint, shards and
commits, and the run.json it keeps (history of resumes across drivers, status, counts).
"""
from __future__ import annotations

import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import RunConfig
from pipeline.job.checks import check_resume, prepare_run
from pipeline.job.fingerprint import inputs_fingerprint, run_fingerprint
from pipeline.job.inputs import InputSpec, count_rows
from pipeline.job.lock import RunLock
from pipeline.job.outputs import PartColumns, RunFailed, committed_shards, summarise_run, write_json
from pipeline.job.pool import SharedActors
from pipeline.job.progress import log
from pipeline.job.protocol import finish_checks, protocol
from pipeline.job.provenance import git_commit, new_run_id, package_versions, source_hash
from pipeline.job.signals import Interrupted, critical
from pipeline.manifest import read_manifest_meta
from ttt.methods import method_analysis_schema, method_class

if TYPE_CHECKING:
    from pipeline.job.pool import Pool


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
        run.shared, run.status = None, "prepared"
        run.columns = part_columns(cfg)  # fixed here, so every part of the run, a resumed one's too, has them
        run.lock = RunLock(run.run_dir, run.run_id)  # one driver per run directory, from here to close()
        try:
            run.earlier = check_resume(run.run_dir, cfg, run.inputs)  # an earlier driver's run.json, or None
        except BaseException:
            run.lock.release(remove_if_unused=True)
            raise
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
        summary = summarise_run(self.run_dir, self.info.get("protocol"))
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
        failure, summary["warnings"] = finish_checks(self.run_dir, self.cfg, summary, self.info["predict_from"])
        write_json(self.run_dir / "summary.json", summary)
        if failure:  # every row an error row: not a result (run_jobs marks the run failed)
            raise RunFailed(f"run {self.run_id}: {failure}")
        for warning in summary["warnings"]:
            log(f"WARNING: {warning}")
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
        """run.json `failed`, or `interrupted` for SIGINT / SIGTERM (a rerun with the run_id resumes either)."""
        if self.status != "running":
            return
        status = "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
        self._note_resumes(pool)
        self.info.update(status=status, ended_at=_now(), error=f"{type(exc).__name__}: {exc}")
        try:
            with critical():
                write_json(self.run_dir / "run.json", self.info)
        except OSError as write_exc:  # a full disk may refuse even this small file
            log(f"WARNING: could not mark {self.run_dir / 'run.json'} {status}: {write_exc}")
        self.status = status

    def close(self) -> None:
        if self.shared is not None:
            self.shared.shutdown()
            self.shared = None
        self.lock.release(remove_if_unused=self.status == "prepared")


def part_columns(cfg: RunConfig) -> PartColumns:
    """The columns of a run's parts: its method's analysis columns, `probs` with outputs.save_probs.
    Refuses (ValueError) a method whose `analysis_columns` name a column ttt/schema.py does not declare."""
    return PartColumns(method_analysis_schema(cfg.ttt.method, cfg.model.kind), cfg.outputs.save_probs, cfg.ttt.method)


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
        "manifest_meta": (meta := read_manifest_meta(cfg.data.manifest)), "protocol": protocol(cfg, meta),
        "predict_from": cfg.ttt.predict_from or method_class(cfg.ttt.method, cfg.model.kind).default_predict_from,
        "versions": package_versions(), "git_commit": git_commit(), "source_hash": source_hash(),
        "python": platform.python_version(),
        "started_at": _now(), "ended_at": None,
        "counts": {"rows": None, "errors": None, "shards": cfg.workers.num_shards, "restarts": 0},
        "cluster_resources": resources, "error": None,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat()
