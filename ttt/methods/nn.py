"""`nn`: retrieval-based test-time training for classifiers (Hardt & Sun 2024; CT3).

The per-batch flow (`NN.step`) is shared with the causal-LM variant in `nn_lm.py`, which
overrides the hooks under it (describe, fine_tune, adapter_state, load_adapter, predict).

Per batch: embed the queries, look the batch up in the adapter cache, else retrieve k
labelled neighbours per query from the KB, fine-tune the source model with cross-entropy on
them, predict the batch with the fine-tuned model, and offer the updated parameters to the cache.

Decisions (why):
- The unit of adaptation is the batch the stream hands over. With `batch_size: 1` (the
  shipped config) this is the papers' per-query protocol; larger batches pool their queries'
  neighbours (deduplicated, best score kept) into one fine-tuning set, trading fidelity for speed.
- Every batch starts from the source model, whatever `episodic` says: a cached adapter is a
  set of parameters fine-tuned from the source, so it is only meaningful applied to the source.
- Cache key: the L2-normalised mean of the batch's unit query embeddings (the query itself
  at batch size 1), so one cache lookup and one offer per batch.
- Only `after_update` prediction: the "same forward" of nn is the neighbours' forward, which
  says nothing about the queries.
- The model stays in eval mode: BatchNorm keeps the source running statistics, so fine-tuning
  on a handful of clean neighbours does not replace them with a tiny batch's statistics.

Services are plain objects (no Ray here): `services["kb"]` a `KnowledgeBaseService`,
`services["cache"]` an `AdapterCacheService` (needed only with `nn.use_cache`).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ttt.losses import class_distribution
from ttt.methods.base import GradientMethod, StepResult


@runtime_checkable
class KnowledgeBaseService(Protocol):
    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[dict | None]]]:
        """Top-k per query: (scores [n, k], indices [n, k], payload rows per query; -1 / None = no neighbour)."""
        ...


@dataclass
class CacheHit:
    key: str
    state: dict[str, torch.Tensor]  # the updated parameters, by state_dict name
    score: float  # cosine similarity of the lookup to the entry
    query: Any  # the entry's query descriptor (what it was fine-tuned for)


@runtime_checkable
class AdapterCacheService(Protocol):
    def lookup(self, embedding: np.ndarray) -> CacheHit | None: ...

    def offer(self, embedding: np.ndarray, query: Any, state: dict[str, torch.Tensor]) -> str: ...


def query_descriptor(inputs: torch.Tensor) -> str:
    """A short content hash of the batch's inputs: joins a cache hit's `cache_query` to the
    analysis row of the query that made the entry."""
    data = inputs.detach().float().cpu().contiguous().numpy().tobytes()
    return f"x:{hashlib.sha1(data).hexdigest()[:12]}"


def cache_key(embeddings: np.ndarray) -> np.ndarray:
    mean = embeddings.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


class NN(GradientMethod):
    name = "nn"
    analysis_columns = ("losses", "grad_norm", "query", "used_cache", "cache_query", "retrieved_indices",
                        "retrieved_scores", "timing_embedding", "timing_cache_lookup", "timing_kb_retrieval")
    required_hooks = ("embed",)
    default_predict_from = "after_update"
    kb_payload: tuple[str, ...] = ("pixels", "label")  # what a KB row must carry to be fine-tuned on

    def configure(self) -> None:
        if self.predict_from != "after_update":
            raise ValueError("method 'nn' predicts only after its update (predict_from=after_update): "
                             "its same forward is the neighbours', not the queries'")
        kb = self.services.get("kb")
        if not isinstance(kb, KnowledgeBaseService):
            raise ValueError("method 'nn' needs services['kb'] with search(embeddings, k) (the KB retrieval client)")
        if self.cfg.nn.use_cache and not isinstance(self.services.get("cache"), AdapterCacheService):
            raise ValueError("method 'nn' with nn.use_cache needs services['cache'] with lookup() and offer()")
        super().configure()
        self.kb: KnowledgeBaseService = kb
        self.cache: AdapterCacheService | None = self.services.get("cache") if self.cfg.nn.use_cache else None
        self._targets: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def loss(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        labels, weights = self._targets
        logits = self.model(inputs)
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        loss = per_sample.mean() if weights is None else (per_sample * weights).sum() / weights.sum()
        return loss, logits, {"cross_entropy": float(loss.detach())}

    def embed(self, inputs: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            feats = self.adapter.embed(inputs).reshape(len(inputs), -1).float().cpu().numpy()
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def neighbours(self, embeddings: np.ndarray) -> tuple[list[int], list[float], list[dict]]:
        """The batch's retrieved neighbours above min_score: (indices, scores, rows), deduplicated
        across queries (first = best score kept), in retrieval order. k = 0 asks the KB nothing
        (the no-neighbour baseline of the k sweeps)."""
        if self.cfg.nn.k == 0:
            return [], [], []
        scores, indices, rows = self.kb.search(embeddings.astype(np.float32), self.cfg.nn.k)
        best: dict[int, tuple[float, dict]] = {}
        for q in range(len(indices)):
            for idx, score, row in zip(indices[q], scores[q], rows[q]):
                idx, score = int(idx), float(score)
                if idx < 0 or row is None or (self.cfg.nn.min_score is not None and score < self.cfg.nn.min_score):
                    continue
                if idx not in best or score > best[idx][0]:
                    best[idx] = (score, row)
        keep = list(best)
        return keep, [best[i][0] for i in keep], [best[i][1] for i in keep]

    def training_batch(self, rows: list[dict], scores: list[float]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Neighbour rows -> (inputs, labels, weights) through the adapter's own decoding; None if none decode."""
        batch = next(iter(self.adapter.build_loader(rows, batch_size=len(rows))), None)
        if batch is None or batch.inputs is None:
            return None
        kept = {id(r) for r in batch.records}
        device = batch.inputs.device
        labels = torch.tensor([int(r["label"]) for r in batch.records], dtype=torch.long, device=device)
        weights = None
        if self.cfg.nn.score_weighted:
            w = [max(s, 0.0) for r, s in zip(rows, scores) if id(r) in kept]
            weights = torch.tensor(w, dtype=torch.float32, device=device)
            if float(weights.sum()) <= 0.0:
                weights = None  # all neighbours at or below cosine 0: weight them equally
        return batch.inputs, labels, weights

    # -- the per-batch flow; the hooks below it are what differs between model kinds --------
    def step(self, inputs: Any) -> StepResult:
        self.reset()  # adapters are fine-tuned from, and cached relative to, the source
        t = time.perf_counter()
        embeddings = self.embed(inputs)
        key = cache_key(embeddings)
        query = self.describe(inputs)
        rec: dict[str, Any] = {"query": query, "used_cache": False, "cache_query": None, "losses": [],
                               "steps": 0, "updated_param_count": 0, "timing_embedding": time.perf_counter() - t,
                               "timing_cache_lookup": 0.0, "timing_kb_retrieval": 0.0, "timing_fine_tuning": 0.0}

        if self.cache is not None:
            t = time.perf_counter()
            hit = self.cache.lookup(key)
            rec["timing_cache_lookup"] = time.perf_counter() - t
            if hit is not None:
                self.load_adapter(hit.state)
                rec.update(used_cache=True, cache_query=hit.query, stop_reason="cache_hit",
                           adapter_source="cache", updated_param_count=sum(v.numel() for v in hit.state.values()))
                return self.predict(inputs, rec)

        t = time.perf_counter()
        indices, scores, rows = self.neighbours(embeddings)
        rec.update(retrieved_indices=indices, retrieved_scores=scores, timing_kb_retrieval=time.perf_counter() - t)
        t = time.perf_counter()
        out = self.fine_tune(rows, scores) if rows else None
        if out is None:
            rec.update(stop_reason="no_neighbours", adapter_source="none")
            return self.predict(inputs, rec)
        rec.update(losses=out["losses"], steps=out["steps"], stop_reason=out["stop_reason"],
                   grad_norm=out["grad_norm"], updated_param_count=self.updated_param_count,
                   adapter_source="fresh" if out["steps"] > 0 else "none",
                   timing_fine_tuning=time.perf_counter() - t)
        if self.cache is not None and out["steps"] > 0:
            t = time.perf_counter()
            self.cache.offer(key, query, self.adapter_state())
            rec["timing_cache_lookup"] += time.perf_counter() - t
        return self.predict(inputs, rec)

    def describe(self, inputs: torch.Tensor) -> str:
        return query_descriptor(inputs)

    def fine_tune(self, rows: list[dict], scores: list[float]) -> dict[str, Any] | None:
        """Fine-tune the source on the neighbour rows; None when none of them decodes."""
        train = self.training_batch(rows, scores)
        if train is None:
            return None
        x, labels, weights = train
        self._targets = (labels, weights)
        try:
            with torch.enable_grad():
                return self._adapt(x)
        finally:
            self._targets = None

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters the fine-tuning changed (those off the loss path, e.g. a
        decoder, keep their source values and need not travel)."""
        return {n: p.detach().cpu().clone() for n, p in zip(self.param_names, self.params)
                if not torch.equal(p.detach(), self.source_state[n])}

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters())
        unknown = set(state) - set(own)
        if unknown:
            raise ValueError(f"cached adapter names parameters this model lacks: {sorted(unknown)[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)

    def predict(self, inputs: torch.Tensor, rec: dict[str, Any]) -> StepResult:
        t = time.perf_counter()
        logits = self.predict_after_update(inputs)
        rec["timing_forward_pass"] = time.perf_counter() - t
        return StepResult(logits.detach(), {**rec, **class_distribution(logits)})
