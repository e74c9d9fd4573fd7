"""Consume one shard in order: batch rows, adapt-then-predict, emit result and analysis rows.

Pure Python + torch so the same loop runs inside a Ray actor, in a test, or in a benchmark.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ttt.calibration import row_scores
from ttt.checkpoint import capture as capture_method
from ttt.checkpoint import restore as restore_method
from ttt.passes import counter_for, peak_memory_mb
from ttt.protocol import busy_batches, method_cost, passes_cost
from ttt.record import new_record
from workers.adapters import parse_label


def batches_in_order(rows: Iterable[dict[str, Any]], batch_size: int, cut_at_domain: bool) -> Iterator[list[dict[str, Any]]]:
    """Contiguous batches of `batch_size` rows; with `cut_at_domain`, a batch never spans two domains."""
    batch: list[dict[str, Any]] = []
    for row in rows:
        if batch and (len(batch) == batch_size or (cut_at_domain and row.get("domain") != batch[-1].get("domain"))):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def _label(row: dict[str, Any]) -> int | None:
    """The row's label for the results column; None when it has none or it is not a class index
    (that row is an error row already: the adapter validated it)."""
    try:
        return parse_label(row.get("label"))
    except ValueError:
        return None


def _domain(row: dict[str, Any]) -> str | None:
    domain = row.get("domain")
    if domain is None or (isinstance(domain, float) and math.isnan(domain)):
        return None
    return str(domain)


def manifest_facts(row: dict[str, Any]) -> dict[str, Any]:
    """The row's `corruption` and `severity` manifest columns, which the results and analysis rows
    carry through (None where the manifest has no such column; pipeline/manifest.py checks types)."""
    corruption, severity = row.get("corruption"), row.get("severity")
    return {"corruption": None if corruption is None else str(corruption),
            "severity": None if severity is None else int(severity)}


def result_row(row: dict[str, Any], *, run_id: str, shard: int, method: str, position: int,
               prediction: dict[str, Any] | None = None, error: str | None = None,
               adapter_source: str = "none") -> dict[str, Any]:
    label = _label(row)
    pred = (prediction or {}).get("prediction")
    out = {
        "run_id": run_id, "sample_id": str(row["sample_id"]), "shard": shard, "position": position,
        "domain": _domain(row), **manifest_facts(row), "method": method, "prediction": pred, "label": label,
        "correct": None if pred is None or label is None or error else pred == label,
        "confidence": (prediction or {}).get("confidence"), "entropy": (prediction or {}).get("entropy"),
        "adapter_source": adapter_source if error is None else "none", "error": error,
    }
    for key, value in (prediction or {}).items():  # LM scores etc.; ttt/schema.py must declare them
        if key not in ("prediction", "confidence", "entropy"):
            out[key] = value
    return out


def _non_finite(prediction: dict[str, Any]) -> str | None:
    """An error message when the model's output for a row is not finite: such a row must never
    pass as a prediction (argmax of NaN logits is class 0)."""
    bad = [k for k in ("confidence", "entropy", "nll") if isinstance(prediction.get(k), float)
           and not math.isfinite(prediction[k])]
    return f"non-finite model output ({', '.join(bad)} = {prediction[bad[0]]})" if bad else None


@dataclass
class StreamState:
    """Where a shard's stream stands between two batches: what a chunk commits and a resume
    starts from (rows consumed, the next batch's index, the domain of the last batch, and the
    method's adaptation state as `ttt.checkpoint.capture` gives it; None = the source model)."""

    offset: int = 0
    batch_index: int = 0
    prev_domain: str | None = None
    method_state: dict[str, Any] | None = None


def stream_chunks(adapter: Any, method: Any, rows: Iterable[dict[str, Any]], *, run_id: str, shard: int,
                  worker: str, first_position: int = 0, start: StreamState | None = None,
                  checkpoint_every: int | None = None, precision: str = "fp32",
                  on_batch: Callable[[int], None] | None = None, final_state: bool = False,
                  save_probs: bool = False) -> Iterator[dict[str, Any]]:
    """Run `method` over `rows` (one shard's rows from `start.offset` on, in order) and yield a chunk
    every `checkpoint_every` batches and at the end: {"results", "analysis", "lens", "state"} where
    `state` is the StreamState after the chunk's last batch. Starting from a chunk's state gives
    the rows an uninterrupted stream gives, bit for bit. `final_state`: the last chunk also carries
    the end-of-stream method state under `final_method_state` (for the probes). `save_probs`: each
    classifier result row keeps its probability vector (`probs`, outputs.save_probs)."""
    cfg = method.cfg
    state = start or StreamState()
    method.reset()
    method.online_delay = 0  # the online protocol's clock starts with the shard (a checkpoint restores it)
    if precision == "fp16" and hasattr(method, "use_loss_scaling"):
        method.use_loss_scaling()
    if state.method_state is not None:
        restore_method(method, state.method_state)
    position = first_position + state.offset
    prev_domain = state.prev_domain
    out = _empty_chunk()
    batches_in_chunk = 0
    batch_index = state.batch_index
    offset = state.offset
    source = iter(batches_in_order(rows, cfg.batch_size, cfg.reset_on_domain_change))
    while True:
        t_wait = time.perf_counter()
        chunk = next(source, None)
        if chunk is None:
            break
        t0 = time.perf_counter()
        positions = {}
        for r in chunk:
            positions[id(r)] = int(r["position"]) if r.get("position") is not None else position
            position += 1
        common = {"run_id": run_id, "shard": shard, "method": cfg.method}
        if cfg.max_batches is not None and batch_index >= cfg.max_batches:
            msg = f"skipped: ttt.max_batches={cfg.max_batches} reached"
            out["results"] += [result_row(r, position=positions[id(r)], error=msg, **common) for r in chunk]
        else:
            prev_domain = _run_batch(adapter, method, chunk, positions, common, out, batch_index=batch_index,
                                     prev_domain=prev_domain, worker=worker, precision=precision,
                                     t0=t0, wait=t0 - t_wait, save_probs=save_probs)
        batch_index += 1
        offset += len(chunk)
        batches_in_chunk += 1
        if on_batch is not None:
            on_batch(len(chunk))
        if checkpoint_every and batches_in_chunk >= checkpoint_every:
            out["state"] = StreamState(offset, batch_index, prev_domain, capture_method(method))
            out["results"].sort(key=lambda r: r["position"])
            yield out
            out, batches_in_chunk = _empty_chunk(), 0
    out["state"] = StreamState(offset, batch_index, prev_domain, None)
    if final_state:  # the end-of-stream state, for the probes (the last chunk commits none)
        out["final_method_state"] = capture_method(method)
    out["results"].sort(key=lambda r: r["position"])
    yield out


def _empty_chunk() -> dict[str, Any]:
    return {"results": [], "analysis": [], "lens": [], "state": None}


def _run_batch(adapter: Any, method: Any, chunk: list[dict[str, Any]], positions: dict[int, int],
               common: dict[str, Any], out: dict[str, Any], *, batch_index: int, prev_domain: str | None,
               worker: str, precision: str, t0: float, wait: float, save_probs: bool = False) -> str | None:
    """Adapt and predict one batch, appending its result rows, analysis record and lens rows to `out`."""
    cfg = method.cfg
    domain = _domain(chunk[0])
    if cfg.reset_on_domain_change and prev_domain is not None and domain != prev_domain:
        method.reset()
    batch = next(iter(adapter.build_loader(chunk, batch_size=len(chunk))))
    out["results"] += [result_row(r, position=positions[id(r)], error=err, **common) for r, err in batch.errors]
    if batch.records:
        adapt, periodic = _protocol_before(method)
        counter = counter_for(method)
        passes_before = counter.snapshot()
        step = None
        try:
            with autocast(precision, batch.inputs):
                step = method.step(batch.inputs) if adapt else method.predict_only(batch.inputs)
            preds = adapter.predict(batch, step.logits.float())
        except Exception as exc:  # a batch that cannot be processed becomes error rows
            step = None
            method.reset()
            msg = f"{type(exc).__name__}: {exc}"
            out["results"] += [result_row(r, position=positions[id(r)], error=msg, **common) for r in batch.records]
        passes = [(a - b) / len(batch.records) for a, b in zip(counter.snapshot(), passes_before)]
        _protocol_after(method, adapt, passes)
        if step is not None:
            preds = _with_protocol_fields(preds, step.logits, batch.records, adapt,
                                          class_scores=method.class_scores,
                                          save_probs=save_probs)
            source = step.record.pop("adapter_source", "none")
            for row in step.record.pop("logit_lens", None) or []:
                sample_id = str(batch.records[row.pop("sample_index")]["sample_id"])
                out["lens"].append({"run_id": common["run_id"], "shard": common["shard"], "batch_index": batch_index,
                                    "sample_id": sample_id, **row})
            for r, p in zip(batch.records, preds):
                bad = _non_finite(p)
                out["results"].append(result_row(r, position=positions[id(r)], prediction=None if bad else p,
                                                 error=bad, adapter_source=source, **common))
            rec = new_record(**step.record)
            rss_mb, gpu_mb = peak_memory_mb()
            rec.update(run_id=common["run_id"], shard=common["shard"], batch_index=batch_index, worker=worker,
                       domain=domain, **manifest_facts(chunk[0]), sample_ids=[str(r["sample_id"]) for r in batch.records],
                       timing_wait_input=wait, timing_total=time.perf_counter() - t0,
                       adapted=adapt, periodic_reset=periodic, forward_passes=passes[0], backward_passes=passes[1],
                       peak_rss_mb=rss_mb, peak_gpu_mb=gpu_mb)
            out["analysis"].append(rec)
        if cfg.episodic:
            method.reset()
    return domain


def _protocol_before(method: Any) -> tuple[bool, bool]:
    """(adapt on this batch?, reset to the source first?): the online protocol lets the batches that
    arrive during the last adapted batch's step pass unadapted; `ttt.reset_every` resets after N
    adapted batches (RDumb). ttt/protocol.py."""
    cfg = method.cfg
    adapt = cfg.protocol != "online" or getattr(method, "online_delay", 0) <= 0
    periodic = bool(adapt and cfg.reset_every and method.batches_since_reset >= cfg.reset_every)
    if periodic:
        method.reset()
    return adapt, periodic


def _protocol_after(method: Any, adapted: bool, passes: list[float]) -> None:
    cfg = method.cfg
    if adapted:
        method.batches_since_reset = getattr(method, "batches_since_reset", 0) + 1
    if cfg.protocol != "online":
        return
    if not adapted:
        method.online_delay -= 1
        return
    cost = passes_cost(passes[0], passes[1], 1) if cfg.online.cost == "passes" else method_cost(cfg.online, cfg.method)
    method.online_delay = busy_batches(cost, cfg.online.eta)


def _with_protocol_fields(preds: list[dict[str, Any]], logits: torch.Tensor, records: list[dict[str, Any]],
                          adapted: bool, class_scores: bool = True, save_probs: bool = False) -> list[dict[str, Any]]:
    """Each prediction row plus `adapted` and, for class scores, the calibration inputs
    `label_prob` and `brier` (ttt/calibration.py) and, with `save_probs`, the probability vector
    itself: all from the one softmax of the logits the prediction came from."""
    extra: list[dict[str, Any]] = [{"adapted": adapted} for _ in preds]
    if class_scores and logits.dim() == 2 and logits.shape[0] == len(preds):
        probs = logits.detach().float().softmax(1).cpu().numpy()
        label_prob, briers = row_scores(probs, [_label(r) for r in records])
        for e, lp, b in zip(extra, label_prob, briers):
            e.update(label_prob=lp, brier=b)
        if save_probs:
            for e, p in zip(extra, probs):
                e["probs"] = p  # float32, as the schema stores it
    return [{**p, **e} for p, e in zip(preds, extra)]


def autocast(precision: str, inputs: Any) -> contextlib.AbstractContextManager:
    """Mixed precision for the method's forward passes (`workers.precision`); fp32 = off."""
    if precision == "fp32" or not isinstance(inputs, torch.Tensor):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=inputs.device.type, dtype=dtype)


def run_stream(adapter: Any, method: Any, rows: Iterable[dict[str, Any]], *, run_id: str, shard: int,
               worker: str, first_position: int = 0, on_batch: Callable[[int], None] | None = None
               ) -> dict[str, list[dict[str, Any]]]:
    """Run `method` over `rows` (one shard, in order) starting from the source state, in one piece.

    Returns {"results": one row per input row, "analysis": one row per adapted batch, "lens":
    logit-lens rows when the method records them (else empty)}.
    """
    (out,) = stream_chunks(adapter, method, rows, run_id=run_id, shard=shard, worker=worker,
                           first_position=first_position, on_batch=on_batch)
    out.pop("state")
    out["results"].sort(key=lambda r: r["position"])
    return out
