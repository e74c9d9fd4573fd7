"""Forgetting and transfer probes: score a stream's committed adaptation state, without adapting,
on fixed probe sets (a clean source set and a sample of every domain), away from the stream's worker.

`score_state(method, adapter, state, sets)` restores the checkpoint `state` (ttt.checkpoint.capture's
form; None = the source model) into a method built like the worker's, predicts every probe set with
`method.predict_only` (the current model, no update; BatchNorm in batch-statistics mode where the
method uses it, so a probe batch is normalised by its own statistics) in batches of the run's
`ttt.batch_size`, and returns one row per set: n, error, ECE, NLL, Brier. `ProbeScorer` is the Ray
actor the driver feeds states to (pipeline/job/probes.py): it builds its method and reads its probe
rows from the manifests once, so a probe costs only the forwards.
"""
from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import ray
import torch

from ttt import TTTConfig, build_method
from ttt.calibration import brier, ece, nll, row_scores
from ttt.checkpoint import restore as restore_method
from workers.clients import build_services
from workers.models import load_model
from workers.stream import _label
from workers.ttt_worker import build_adapter


def score_state(method: Any, adapter: Any, state: dict[str, Any] | None, sets: dict[str, list[dict[str, Any]]],
                batch_size: int) -> list[dict[str, Any]]:
    method.reset()
    if state is not None:
        restore_method(method, state)
    rows = []
    for name, records in sets.items():
        conf, correct, label_prob, briers = [], [], [], []
        for batch in adapter.build_loader(records, batch_size=batch_size):
            if not batch.records:
                continue
            probs = method.predict_only(batch.inputs).logits.float().softmax(1).cpu().numpy()
            labels = [_label(r) for r in batch.records]
            keep = [i for i, y in enumerate(labels) if y is not None]
            lp, br = row_scores(probs[keep], [labels[i] for i in keep])
            conf += probs[keep].max(1).tolist()
            correct += [bool(probs[i].argmax() == labels[i]) for i in keep]
            label_prob += lp
            briers += br
        n = len(correct)
        rows.append({"probe_set": name, "n": n, "error": 1.0 - float(np.mean(correct)) if n else None,
                     "ece": ece(conf, correct) if n else None, "nll": nll(label_prob), "brier": brier(briers)})
    return rows


class ProbeScorer:
    """One run's probe scorer: the worker's model and method, and the probe sets' rows."""

    def __init__(self, spec: dict[str, Any], sources: dict[str, Any], threads: int = 1):
        torch.set_num_threads(threads)
        model = load_model(spec["model"]["factory"], spec["model"]["checkpoint"], spec["model"]["factory_kwargs"], "cpu")
        self.adapter = build_adapter(spec["model"], "cpu", threads=threads, model=model)
        self.cfg = TTTConfig.model_validate(spec["ttt"])
        self.method = build_method(self.adapter, self.cfg, build_services(spec.get("services")))
        self.sets = probe_sets(**sources)

    def score(self, state: bytes | None, where: dict[str, Any]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        loaded = None if state is None else torch.load(io.BytesIO(state), weights_only=True)
        torch.manual_seed(self.cfg.seed)
        rows = score_state(self.method, self.adapter, loaded, self.sets, self.cfg.batch_size)
        seconds = time.perf_counter() - t0
        return [{**where, **r, "seconds": seconds} for r in rows]


ProbeActor = ray.remote(ProbeScorer)


def probe_sets(manifest: str, per_domain: int, clean: str | None, clean_n: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The fixed probe sets: `clean` (the first `clean_n` rows of the clean manifest) and, per domain
    of the run's manifest, `per_domain` rows drawn with `seed` (in stream order)."""
    import pyarrow.parquet as pq

    sets: dict[str, list[dict[str, Any]]] = {}
    if clean is not None:
        sets["clean"] = pq.read_table(clean).slice(0, clean_n).to_pylist()
    if per_domain > 0:
        table = pq.read_table(manifest)
        domains = np.asarray(table.column("domain").to_pylist(), dtype=object)
        rng = np.random.default_rng(seed)
        for domain in dict.fromkeys(domains.tolist()):
            rows = np.flatnonzero(domains == domain)
            pick = np.sort(rng.choice(rows, min(per_domain, len(rows)), replace=False))
            sets[str(domain)] = table.take(pick).to_pylist()
    return sets
