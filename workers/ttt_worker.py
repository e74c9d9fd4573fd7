"""The TTT worker actor: one model replica + one method, consuming one shard at a time, in order.

Ray Data's actor pools give no order or affinity, so continual methods run on plain actors,
one shard at a time (DESIGN.md, Stream order). The shard's rows arrive decoded by Ray Data
operators (pipeline/job/inputs.py); the worker adapts and predicts and streams back a chunk of rows
with a checkpoint of its adaptation state every `workers.checkpoint_every` batches, so a shard
whose worker dies goes on, on another worker, from its last committed chunk with the same rows.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import ray
import ray.data  # configures its loggers on import: before the worker quiets them
import torch

from ttt import TTTConfig, build_method
from ttt.images import ImageSpec
from ttt.methods import method_class
from workers.adapters import ImageClassifierAdapter
from workers.clients import CacheClient, KBClient, build_services  # noqa: F401  (re-exported for callers)
from workers.models import load_model
from workers.stream import StreamState, stream_chunks

IMPORTED_AT = time.time()  # with the process's start: where a cold worker's start-up time goes


def build_adapter(model_spec: dict[str, Any], device: str, *, threads: int | None = None,
                  read_timeout_s: float | None = 60.0, model: torch.nn.Module | None = None):
    """The model adapter a `model` config section describes (paths already resolved by the driver);
    `model`: an image classifier already loaded from that section."""
    if model_spec["kind"] == "image_classifier":
        if model is None:
            model = load_model(model_spec["factory"], model_spec["checkpoint"], model_spec["factory_kwargs"], device)
        return ImageClassifierAdapter(model, device=device, spec=ImageSpec.from_model_config(model_spec),
                                      read_timeout_s=read_timeout_s)
    if model_spec["kind"] == "causal_lm":
        from workers.lm_adapter import CausalLMAdapter

        if model_spec.get("path") is None:
            raise ValueError("model.kind=causal_lm needs model.path (a Hugging Face model directory)")
        return CausalLMAdapter(model_spec["path"], device=device, max_length=model_spec.get("max_length"),
                               lora=model_spec.get("lora"), embedder_threads=threads,
                               max_text_bytes=model_spec.get("max_text_bytes"))
    raise ValueError(f"model.kind={model_spec['kind']!r} has no adapter")


def embedder_name(model_spec: dict[str, Any]) -> str:
    """The name of the embedder whose KB this model's queries search (as build-kb records it):
    for a classifier, its `embed` features (factory function name + checkpoint hash); for a
    causal LM, the sentence model that embeds text on both sides."""
    from kb_index import torch_checkpoint_name
    from kb_index.embedders import SENTENCE_MODEL_NAME

    if model_spec["kind"] == "causal_lm":
        return SENTENCE_MODEL_NAME
    return torch_checkpoint_name(model_spec["factory"].rpartition(":")[2], model_spec["checkpoint"])


def kb_payload(model_spec: dict[str, Any]) -> list[str]:
    """The KB columns method nn fine-tunes on for this model kind."""
    return list(method_class("nn", model_spec["kind"]).kb_payload)


class TTTWorker:
    """One model replica and one method. A worker serves one run or, in a campaign, shards of
    several runs in turn: `configure(spec)` keeps the loaded model when the next run's model is the
    same (each method gets a fresh copy of the pristine weights) and rebuilds only the method."""

    def __init__(self, spec: dict[str, Any], name: str):
        self.boot = {"process_start": psutil.Process().create_time(), "imported": IMPORTED_AT}
        self.device = "cuda" if spec["num_gpus"] > 0 and torch.cuda.is_available() else "cpu"
        self.name = name
        self._spec_key: str | None = None
        self._model_key: str | None = None
        self._pristine: torch.nn.Module | None = None
        self.configure(spec)
        self._lock = threading.Lock()
        self._progress = {"shard": None, "rows_done": 0}
        self.node = ray.get_runtime_context().get_node_id()
        # the driver reports progress; Ray Data's notices (bars disabled, execution finished) would reach
        # its terminal from here under `ray job submit` / RAY_ADDRESS, where worker logs go to the driver
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        self.boot["ready"] = time.time()

    def configure(self, spec: dict[str, Any]) -> None:
        """Serve the run `spec` describes (no-op when it already does)."""
        key = json.dumps({k: spec.get(k) for k in ("run_id", "model", "ttt", "services", "read_timeout_s")},
                         sort_keys=True, default=str)
        if key == self._spec_key:
            return
        torch.set_num_threads(spec["torch_threads"])  # a warm worker may serve a run with another setting
        model_key = json.dumps(spec["model"], sort_keys=True, default=str)
        model = None
        if spec["model"]["kind"] == "image_classifier":
            if model_key != self._model_key:
                self._pristine = load_model(spec["model"]["factory"], spec["model"]["checkpoint"],
                                            spec["model"]["factory_kwargs"], self.device)
                self._model_key = model_key
            model = copy.deepcopy(self._pristine)  # methods reconfigure and adapt their model in place
        self.run_id = spec["run_id"]
        torch.manual_seed(spec["ttt"]["seed"])
        self.adapter = build_adapter(spec["model"], self.device, threads=spec["torch_threads"],
                                     read_timeout_s=spec.get("read_timeout_s"), model=model)
        self.method = build_method(self.adapter, TTTConfig.model_validate(spec["ttt"]),
                                   build_services(spec.get("services")))
        self._seed = spec["ttt"]["seed"]
        self._spec_key = key

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device, "name": self.name,
                "method": self.method.name, "predict_from": self.method.predict_from,
                "node_id": self.node}

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return {**self._progress, "node": self.node}

    def _advance(self, n: int) -> None:
        with self._lock:
            self._progress["rows_done"] += n
            self._progress.setdefault("first_batch_at", time.time())

    def run_shard(self, task: dict[str, Any], dataset: "ray.data.Dataset", state: bytes | None,
                  spec: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Stream one shard (a Ray streaming generator): from `task["offset"]` rows in, starting from
        the committed `state` (None = the source model), yield a chunk of rows plus a checkpoint every
        `task["checkpoint_every"]` batches, and a last chunk with `done` set."""
        if spec is not None:
            self.configure(spec)
        if state is None:  # a shard starts as on a fresh worker, whatever this one served before
            torch.manual_seed(self._seed)
        shard = task["shard"]
        with self._lock:
            self._progress = {"shard": shard, "rows_done": task["offset"]}
        timeline = {**self.boot, "shard_start": time.time()}  # wall-clock stamps, for the run's summary
        start = StreamState(task["offset"], task["batch_index"], task["prev_domain"],
                            None if state is None else torch.load(io.BytesIO(state), weights_only=True))
        # whole blocks, not iter_rows: per-row iteration through Ray Data costs more than a Tent step
        blocks = dataset.iter_batches(batch_size=None, batch_format="pyarrow",
                                      prefetch_batches=task.get("prefetch_blocks", 4))
        rows = (row for block in _stamp_first(blocks, timeline, "first_input") for row in block.to_pylist())
        chunks = stream_chunks(self.adapter, self.method, rows, run_id=self.run_id, shard=shard, worker=self.name,
                               first_position=task["first_position"], start=start,
                               checkpoint_every=task["checkpoint_every"], precision=task.get("precision", "fp32"),
                               on_batch=self._advance, final_state=task.get("final_state", False),
                               save_probs=task.get("save_probs", False))
        for chunk in chunks:
            st = chunk.pop("state")
            timeline["first_batch"] = self._progress.get("first_batch_at")
            chunk.update(shard=shard, offset=st.offset, batch_index=st.batch_index, prev_domain=st.prev_domain,
                         done=st.method_state is None, method_state=_to_bytes(st.method_state), node=self.node,
                         timeline=timeline, memory=peak_memory(self.name, self.device),
                         final_state=_to_bytes(chunk.pop("final_method_state", None)))
            yield chunk


def peak_memory(worker: str, device: str) -> dict[str, Any]:
    """This process's peak resident memory (getrusage: the high-water mark, not the current RSS)
    and, on CUDA, the peak GPU memory torch allocated (torch.cuda.max_memory_allocated), in MiB."""
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = None
    if device == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.max_memory_allocated() / 2**20
    return {"worker": worker, "peak_rss_mb": rss_kib / 1024, "peak_gpu_mb": gpu}


def _stamp_first(items: Iterator[Any], timeline: dict[str, float], key: str) -> Iterator[Any]:
    """`items`, noting in `timeline[key]` when the first one arrived."""
    for item in items:
        timeline.setdefault(key, time.time())
        yield item


def _to_bytes(state: dict[str, Any] | None) -> bytes | None:
    if state is None:
        return None
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


TTTWorkerActor = ray.remote(TTTWorker)
