"""lm-evaluation-harness speaks retrieval TTT: a registered LM class (`ttt-nn`) whose requests
are answered by the project's TTT workers on Ray.

    python -m pipeline lm-eval --model ttt-nn --model_args config=configs/lm_nn.yaml,workers=2 \
        --tasks ttt_text_choices --include_path configs/lm_eval

Why a class of our own and not lm_eval's `hf`: each request context must be adapted on its own
retrieved neighbours before it is scored, exactly as `python -m pipeline run` does (the CT3 seed
drives TTT through the harness the same way, `ct3_lm_eval.py --task ...`).

Protocol (what the tests hold it to):
- Requests are grouped by their context (the document): one adaptation per context, then every
  continuation of that context (the choices of a multiple-choice question) is scored by the
  adapted model. Never one adaptation per choice.
- The retrieval query is the context alone: a choice (the answer) never reaches the embedder.
- loglikelihood: (log-likelihood, is_greedy) of the continuation after the context, scored by
  `CausalLMAdapter.score_continuations` (the scoring of the project's multiple-choice rows).
  loglikelihood_rolling: -nll of the whole text (BOS-prefixed, every token once: the project's
  bits-per-byte scoring), the text being the query, as TTT-NN adapts on the document it scores.
  generate_until: greedy decoding from the adapted model, cut at the stop strings.
- Contexts fan out over `workers` Ray actors (`HarnessWorker`, one model replica each; the KB
  actor and the adapter cache are the run's shared actors); `nn` resets to the base LoRA before
  every context, so answers do not depend on which worker took which context.
- Each call writes a run directory like `pipeline run` does: `results/` (one row per context, the
  project's result columns: nll, bits per byte ...), `analysis/` (one record per adaptation:
  retrieved neighbours, losses, timings), `requests/` (one row per harness request: its answer),
  `run.json`. Model args: `config` (a run config, default configs/lm_nn.yaml), `workers`,
  `output_root`, `run_id`, and any dotted config field (`ttt.nn.k=5`, `ttt.method=source`).

lm_eval 0.4.13 has no plug-in entry point for model classes, so the stock `lm_eval` command
cannot find this one; `python -m pipeline lm-eval` imports it, then takes lm_eval's own run flags.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pipeline.config import ConfigError, check_run_id, check_unique_keys, load_config
from pipeline.job.outputs import write_json, write_shard
from pipeline.job.provenance import new_run_id
from pipeline.job.record import part_columns
from ttt import TTTConfig, build_method
from ttt.record import new_record
from workers.stream import result_row
from workers.ttt_worker import build_adapter, build_services

MODEL_NAME = "ttt-nn"
# one row per harness request; fixed types so parts of different request kinds read as one table
REQUEST_SCHEMA = pa.schema([("run_id", pa.string()), ("call", pa.int64()), ("task", pa.string()),
                            ("doc_id", pa.int64()), ("request_index", pa.int64()), ("kind", pa.string()),
                            ("sample_id", pa.string()), ("loglik", pa.float64()), ("is_greedy", pa.bool_()),
                            ("generated", pa.string())])
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm_nn.yaml"
TASK_DIR = Path(__file__).resolve().parents[1] / "configs" / "lm_eval"


def group_requests(kinds: Sequence[str], args: Sequence[tuple]) -> list[dict[str, Any]]:
    """Requests -> one group per distinct context, in order of first appearance.

    A group is {"context", "items": [(request index, kind, payload)]}: loglikelihood's payload is
    the continuation, generate_until's its gen_kwargs, loglikelihood_rolling's None (its text is
    the context). The continuation is kept out of "context": it is what the model is asked for.
    """
    groups: dict[str, dict[str, Any]] = {}
    for i, (kind, a) in enumerate(zip(kinds, args)):
        context = a[0]
        payload = a[1] if kind in ("loglikelihood", "generate_until") else None
        groups.setdefault(context, {"context": context, "items": []})["items"].append((i, kind, payload))
    return list(groups.values())


class HarnessWorker:
    """One model replica + method; answers whole context groups (adapt once, then score)."""

    def __init__(self, spec: dict[str, Any], name: str):
        torch.set_num_threads(spec["torch_threads"])
        torch.manual_seed(spec["ttt"]["seed"])
        self.name = name
        self.device = "cuda" if spec["num_gpus"] > 0 and torch.cuda.is_available() else "cpu"
        self.adapter = build_adapter(spec["model"], self.device, threads=spec["torch_threads"])
        self.method = build_method(self.adapter, TTTConfig.model_validate(spec["ttt"]),
                                   build_services(spec.get("services")))
        self.adaptations = 0

    def answer(self, group: dict[str, Any], group_id: str, run_id: str, shard: int, position: int,
               task: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        row = {"sample_id": group_id, "text": group["context"], "domain": task, "position": position}
        common = {"run_id": run_id, "shard": shard, "method": self.method.cfg.method, "position": position}
        batch = next(iter(self.adapter.build_loader([row], batch_size=1)))
        if batch.errors:  # e.g. an empty context: nothing to retrieve for or to adapt on
            raise ValueError(f"harness request context {group_id}: {batch.errors[0][1]}")
        step = self.method.step(batch.inputs)  # resets, retrieves for the context only, adapts
        self.adaptations += 1
        pred = self.adapter.predict(batch, step.logits)[0]
        answers = []
        conts = [(i, payload) for i, kind, payload in group["items"] if kind == "loglikelihood"]
        scored = self.adapter.score_continuations(group["context"], [c for _, c in conts]) if conts else []
        by_index = {i: {"loglik": ll, "is_greedy": g} for (i, _), (ll, g) in zip(conts, scored)}
        for i, kind, payload in group["items"]:
            if kind == "loglikelihood_rolling":
                by_index[i] = {"loglik": -pred["nll"], "is_greedy": None}
            elif kind == "generate_until":
                kwargs = dict(payload or {})
                until = kwargs.get("until") or []
                by_index[i] = {"generated": self.adapter.generate(
                    group["context"], until=[until] if isinstance(until, str) else list(until),
                    max_new_tokens=int(kwargs.get("max_gen_toks", 64)))}
            answers.append({"request_index": i, "kind": kind, "sample_id": group_id, **by_index[i]})
        source = step.record.pop("adapter_source", "none")
        step.record.pop("logit_lens", None)
        rec = new_record(**step.record)
        rec.update(run_id=run_id, shard=shard, batch_index=position, worker=self.name, domain=task,
                   sample_ids=[group_id], timing_total=time.perf_counter() - t0)
        return {"answers": answers, "analysis": rec,
                "result": result_row(row, prediction=pred, adapter_source=source, **common)}

    def count(self) -> int:
        return self.adaptations


HarnessWorkerActor = ray.remote(HarnessWorker)


@register_model(MODEL_NAME)
class TTTHarnessLM(LM):
    """The `ttt-nn` model of lm-evaluation-harness: see the module docstring."""

    def __init__(self, config: str | None = None, workers: int = 1, output_root: str | None = None,
                 run_id: str | None = None, batch_size: Any = None, max_batch_size: Any = None,
                 device: Any = None, **overrides: Any):
        super().__init__()
        from pipeline.job.checks import prepare
        from pipeline.job.pool import SharedActors
        from pipeline.job.ray_start import init_ray

        sets = [f"{k}={v}" for k, v in overrides.items()]
        if output_root is not None:
            sets.append(f"output_root={output_root}")
        cfg = load_config(config or DEFAULT_CONFIG, sets)
        if cfg.model.kind != "causal_lm":
            raise ValueError(f"model {MODEL_NAME!r} needs a causal-LM config (model.kind=causal_lm), got {cfg.model.kind}")
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.cfg = prepare(cfg)
        if run_id is not None:
            try:
                check_run_id(run_id)
            except ValueError as exc:
                raise ConfigError(f"config error: run_id: {exc} (got {run_id!r:.80})") from None
        self.run_id = run_id or new_run_id(f"harness-{cfg.experiment}")
        self.run_dir = Path(self.cfg.output_root) / self.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        init_ray()
        self.shared = SharedActors(self.cfg, self.run_id)
        spec = {"model": self.cfg.model.model_dump(), "ttt": self.cfg.ttt.model_dump(),
                "torch_threads": self.cfg.workers.torch_threads, "num_gpus": self.cfg.workers.num_gpus,
                "services": self.shared.spec}
        self.workers = [HarnessWorkerActor.options(num_cpus=self.cfg.workers.num_cpus,
                                                   num_gpus=self.cfg.workers.num_gpus)
                        .remote(spec, f"harness-worker-{i}") for i in range(int(workers))]
        self.calls = 0
        self.adaptations_done = 0
        self.timings: list[dict[str, Any]] = []
        write_json(self.run_dir / "run.json", {
            "run_id": self.run_id, "kind": "lm_eval", "model": MODEL_NAME, "workers": int(workers),
            "config": json.loads(self.cfg.model_dump_json()), "config_hash": self.cfg.config_hash(),
            "started": datetime.now(UTC).isoformat()})

    # -- the three request types ----------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        answers = self._run(requests, "loglikelihood")
        return [(a["loglik"], bool(a["is_greedy"])) for a in answers]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return [a["loglik"] for a in self._run(requests, "loglikelihood_rolling")]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return [a["generated"] for a in self._run(requests, "generate_until")]

    # -- fan-out ----------------------------------------------------------------------------------
    def _run(self, requests: list[Instance], kind: str) -> list[dict[str, Any]]:
        """Group by context, spread the groups over the workers (each takes the next group when
        free), write this call's Parquet parts, return the answers in request order."""
        shard = self.calls
        self.calls += 1
        t0 = time.perf_counter()
        groups = group_requests([kind] * len(requests), [r.args for r in requests])
        tasks = [getattr(r, "task_name", None) for r in requests]
        first_request = {}
        for g_index, g in enumerate(groups):
            first_request[g_index] = g["items"][0][0]
        pending, outputs, free = {}, [None] * len(groups), list(self.workers)
        todo = list(range(len(groups)))
        while todo or pending:
            while todo and free:
                g = todo.pop(0)
                worker = free.pop(0)
                ref = worker.answer.remote(groups[g], f"c{shard}-{g:05d}", self.run_id, shard, g,
                                           tasks[first_request[g]])
                pending[ref] = (g, worker)
            done, _ = ray.wait(list(pending), num_returns=1)
            g, worker = pending.pop(done[0])
            outputs[g] = ray.get(done[0])
            free.append(worker)
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        request_rows = []
        for out in outputs:
            for a in out["answers"]:
                answers[a["request_index"]] = a
                request_rows.append({"run_id": self.run_id, "call": shard, "task": tasks[a["request_index"]],
                                     "doc_id": getattr(requests[a["request_index"]], "doc_id", None), **a})
        wall = time.perf_counter() - t0
        self._write(shard, outputs, request_rows)
        self.timings.append({"call": shard, "kind": kind, "requests": len(requests), "contexts": len(groups),
                             "workers": len(self.workers), "wall_s": round(wall, 3)})
        write_json(self.run_dir / "harness.json", {"calls": self.timings, "adaptations": self.adaptations()})
        return answers  # type: ignore[return-value]

    def _write(self, shard: int, outputs: list[dict[str, Any]], request_rows: list[dict[str, Any]]) -> None:
        write_shard(self.run_dir, shard, {"results": [o["result"] for o in outputs],
                                          "analysis": [o["analysis"] for o in outputs]}, self.cfg.config_hash(),
                    part_columns(self.cfg))
        (self.run_dir / "requests").mkdir(exist_ok=True)
        rows = [{name: r.get(name) for name in REQUEST_SCHEMA.names} for r in request_rows]
        pq.write_table(pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA),
                       self.run_dir / "requests" / f"part-{shard:05d}.parquet")

    def adaptations(self) -> int:
        """Contexts adapted so far, summed over the workers (each counts its own `method.step`s)."""
        return sum(ray.get([w.count.remote() for w in self.workers]))

    def shutdown(self) -> None:
        from pipeline.job.pool import _kill

        self.adaptations_done = self.adaptations()
        _kill(*self.workers)
        self.shared.shutdown()


# -- the CLI front: `python -m pipeline lm-eval` ------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline lm-eval",
                                description="lm-evaluation-harness with the TTT model `ttt-nn` registered "
                                            "(lm_eval's own run flags; tasks from configs/lm_eval by default)")
    p.add_argument("--model", default=MODEL_NAME)
    p.add_argument("--model_args", default="", help="key=value,... e.g. config=configs/lm_nn.yaml,workers=2,ttt.nn.k=5")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include_path", default=str(TASK_DIR))
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--output_path", default=None, help="write lm_eval's results JSON here")
    p.add_argument("--seed", type=int, default=0)
    return p


def evaluate(argv: list[str]) -> dict[str, Any]:
    """One lm_eval run of `ttt-nn` from CLI flags: {"results": lm_eval's results dict, "wall_s":
    evaluation wall time (model start-up excluded), "workers", "adaptations", "run_dir", "calls":
    the per-call timings of harness.json}. The benchmark calls this, side by side, in one process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only; never the hub
    if args.model != MODEL_NAME:
        raise SystemExit(f"python -m pipeline lm-eval runs --model {MODEL_NAME}; for other models use lm_eval itself")
    for task_file in sorted(Path(args.include_path).rglob("*.y*ml")):  # lm_eval's loader keeps the last of a duplicate
        check_unique_keys(task_file.read_text(encoding="utf-8", errors="replace"), f"lm-eval task file {task_file}")
    manager = TaskManager(include_path=args.include_path)
    model = TTTHarnessLM.create_from_arg_string(args.model_args)
    try:
        t0 = time.perf_counter()
        results = lm_eval.simple_evaluate(model=model, tasks=args.tasks.split(","), task_manager=manager,
                                          limit=args.limit, num_fewshot=args.num_fewshot, random_seed=args.seed,
                                          numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                          fewshot_random_seed=args.seed)
        wall = time.perf_counter() - t0
    finally:
        model.shutdown()
    if args.output_path:
        Path(args.output_path).write_text(json.dumps({k: results[k] for k in ("results", "configs", "n-samples")
                                                      if k in results}, indent=2, default=str))
    return {"results": results, "wall_s": wall, "workers": len(model.workers), "adaptations": model.adaptations_done,
            "run_dir": model.run_dir, "calls": model.timings}


def metric_rows(results: dict[str, Any]) -> list[list[Any]]:
    """[task, metric, value] for every float metric of an lm_eval results dict (stderr left out)."""
    return [[task, metric.split(",")[0], value] for task, metrics in results["results"].items()
            for metric, value in metrics.items() if isinstance(value, float) and "stderr" not in metric]


def main(argv: list[str]) -> int:
    from tabulate import tabulate

    out = evaluate(argv)
    print(tabulate(metric_rows(out["results"]), headers=["task", "metric", "value"], floatfmt=".4f"))
    print(f"{out['workers']} workers, {out['adaptations']} adaptations, evaluation wall {out['wall_s']:.1f}s; "
          f"run directory: {out['run_dir']}")
    return 0
