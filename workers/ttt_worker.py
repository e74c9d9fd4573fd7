"""The TTT worker actor: one model replica + one method, consuming whole shards in order.

Ray Data's actor pools give no order or affinity, so continual methods run on plain actors,
one shard at a time (DESIGN.md, Stream order). Each shard starts from the source model, so a
shard rerun on a fresh actor (after its worker died) gives the same rows.
"""
from __future__ import annotations

import os
import socket
import threading
from typing import Any

import ray
import torch

from ttt import TTTConfig, build_method
from workers.adapters import ImageClassifierAdapter
from workers.models import load_model
from workers.stream import run_stream


def build_adapter(model_spec: dict[str, Any], device: str):
    if model_spec["kind"] == "image_classifier":
        model = load_model(model_spec["factory"], model_spec["checkpoint"], model_spec["factory_kwargs"], device)
        return ImageClassifierAdapter(model, device=device, image_shape=tuple(model_spec["image_shape"]),
                                      mean=model_spec["mean"], std=model_spec["std"])
    raise ValueError(f"model.kind={model_spec['kind']!r} has no adapter yet")


class TTTWorker:
    def __init__(self, spec: dict[str, Any], name: str):
        torch.set_num_threads(spec["torch_threads"])
        torch.manual_seed(spec["ttt"]["seed"])
        self.device = "cuda" if spec["num_gpus"] > 0 and torch.cuda.is_available() else "cpu"
        self.name = name
        self.run_id = spec["run_id"]
        self.adapter = build_adapter(spec["model"], self.device)
        self.method = build_method(self.adapter, TTTConfig.model_validate(spec["ttt"]))
        self._lock = threading.Lock()
        self._progress = {"shard": None, "rows_done": 0}

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device, "name": self.name,
                "method": self.method.name, "predict_from": self.method.predict_from}

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._progress)

    def _advance(self, n: int) -> None:
        with self._lock:
            self._progress["rows_done"] += n

    def run_shard(self, shard: int, dataset: "ray.data.Dataset", first_position: int) -> dict[str, Any]:
        with self._lock:
            self._progress = {"shard": shard, "rows_done": 0}
        # whole blocks, not iter_rows: per-row iteration through Ray Data costs more than a Tent step
        rows = (row for block in dataset.iter_batches(batch_size=None, batch_format="pandas")
                for row in block.to_dict("records"))
        results, analysis = run_stream(self.adapter, self.method, rows, run_id=self.run_id, shard=shard,
                                       worker=self.name, first_position=first_position, on_batch=self._advance)
        return {"results": results, "analysis": analysis}


TTTWorkerActor = ray.remote(TTTWorker)
