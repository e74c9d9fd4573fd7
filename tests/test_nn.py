"""Retrieval-based TTT (`nn`): the method in-process with a real KB, then end to end through run_job."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kb_index import build_kb, load_kb
from kb_index.embedders import ImagePreprocess, TorchFeatureEmbedder
from pipeline.config import ConfigError, load_config
from pipeline.embedded.mnistc import ensure_mnistc, load_train_split, split_digits
from pipeline.embedded.model import train_source_model
from pipeline.job.runner import run_job
from ttt import TTTConfig, build_method
from ttt.methods.nn import CacheHit
from workers.adapters import ImageClassifierAdapter
from workers.models import load_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pipeline.embedded.model:small_cnn"


class InProcessKB:
    """A real faiss KB searched in this process (what the KB actor does remotely)."""

    def __init__(self, kb_dir: Path):
        self.kb = load_kb(kb_dir)

    def search(self, embeddings, k):
        scores, indices = self.kb.search(embeddings, k)
        return scores, indices, self.kb.rows(indices, ["pixels", "label"])


class DictCache:
    """An adapter cache in a dict: exact cosine >= threshold, no eviction."""

    def __init__(self, threshold: float):
        self.threshold, self.entries = threshold, {}

    def lookup(self, embedding):
        for key, (emb, query, state) in self.entries.items():
            score = float(np.dot(emb, embedding))
            if score >= self.threshold:
                return CacheHit(key, state, score, query)
        return None

    def offer(self, embedding, query, state):
        key = f"k{len(self.entries)}"
        self.entries[key] = (np.asarray(embedding), query, state)
        return key


@pytest.fixture(scope="module")
def small_nn(tmp_path_factory):
    """A 40-row stream (two domains) and a briefly trained source checkpoint (seconds to build)."""
    cache = tmp_path_factory.mktemp("cache")
    manifest = ensure_mnistc(cache, ["shot_noise", "brightness"], severity=3, n_test=20, seed=0)
    split = split_digits(0)
    torch.manual_seed(0)
    ckpt = cache / "cnn.pt"
    torch.save(train_source_model(split["x_train"][:1000], split["y_train"][:1000], seed=0, epochs=1), ckpt)
    return {"cache": cache, "manifest": manifest, "checkpoint": ckpt}


@pytest.fixture(scope="module")
def digits(small_nn, tmp_path_factory):
    """The fixture checkpoint's adapter, 40 training digits, and a KB of those same digits whose
    labels are all shifted by one class: neighbours that disagree with the model on purpose."""
    x, y = load_train_split(small_nn["manifest"])
    x, y = x[:40], y[:40]
    model = load_model(MODEL, str(small_nn["checkpoint"]), {}, "cpu")
    adapter = ImageClassifierAdapter(model)
    shifted = (y + 1) % 10
    kb_dir = tmp_path_factory.mktemp("kb")
    corpus = [{"id": i, "label": int(lbl), "pixels": img.reshape(-1).tolist()} for i, (img, lbl) in enumerate(zip(x, shifted))]
    build_kb(corpus, kb_dir, TorchFeatureEmbedder(model, "cnn", ImagePreprocess()), progress=None)
    rows = [{"sample_id": str(i), "pixels": img.reshape(-1).tolist()} for i, img in enumerate(x)]
    inputs = next(iter(adapter.build_loader(rows, batch_size=len(rows)))).inputs
    return {"adapter": adapter, "inputs": inputs, "shifted": torch.from_numpy(shifted), "kb": InProcessKB(kb_dir)}


def nn_cfg(**nn) -> TTTConfig:
    return TTTConfig(method="nn", steps=5, lr=0.02, update_filter="all", batch_size=1, nn={"k": 4, **nn})


def test_nn_fine_tunes_toward_neighbour_labels_without_ray(digits):
    method = build_method(digits["adapter"], nn_cfg(), {"kb": digits["kb"]})
    x, target = digits["inputs"][:8], digits["shifted"][:8]
    with torch.no_grad():
        source_hits = int((method.model(x).argmax(1) == target).sum())
    adapted_hits = 0
    first_losses, last_losses = [], []
    for i in range(len(x)):
        step = method.step(x[i:i + 1])
        adapted_hits += int(step.logits.argmax(1).item() == target[i])
        rec = step.record
        assert rec["adapter_source"] == "fresh" and len(rec["retrieved_indices"]) == 4 and rec["steps"] == 5
        first_losses.append(rec["losses"][0])
        last_losses.append(rec["losses"][-1])
    # Adam at lr 0.02 may overshoot on a query or two; fine-tuning must still lower the loss overall
    assert sum(b < a for a, b in zip(first_losses, last_losses)) >= 6
    assert sum(last_losses) < sum(first_losses)
    assert adapted_hits >= source_hits + 4  # the neighbours' (shifted) labels win most queries
    # every step starts from the source: the model is the source again after a reset
    method.reset()
    with torch.no_grad():
        assert int((method.model(x).argmax(1) == target).sum()) == source_hits


def test_nn_cache_hit_reuses_the_adapter(digits):
    cache = DictCache(threshold=0.999)
    method = build_method(digits["adapter"], nn_cfg(use_cache=True), {"kb": digits["kb"], "cache": cache})
    q = digits["inputs"][:1]
    fresh = method.step(q)
    hit = method.step(q)
    assert fresh.record["adapter_source"] == "fresh" and len(cache.entries) == 1
    assert hit.record["adapter_source"] == "cache" and hit.record["used_cache"]
    assert hit.record["cache_query"] == fresh.record["query"] and hit.record["timing_kb_retrieval"] == 0.0
    torch.testing.assert_close(hit.logits, fresh.logits)
    # only the updated parameters travel: not the reconstruction decoder, which CE never reaches
    (state,) = [s for _, _, s in cache.entries.values()]
    assert "head.weight" in state and not any(n.startswith("decoder.") for n in state)


def test_nn_start_up_errors_are_one_line(digits):
    with pytest.raises(ValueError, match=r"services\['kb'\]"):
        build_method(digits["adapter"], nn_cfg(), {})
    with pytest.raises(ValueError, match=r"services\['cache'\]"):
        build_method(digits["adapter"], nn_cfg(use_cache=True), {"kb": digits["kb"]})
    with pytest.raises(ValueError, match="after_update"):
        build_method(digits["adapter"], nn_cfg().model_copy(update={"predict_from": "same_forward"}), {"kb": digits["kb"]})
    with pytest.raises(ConfigError, match=r"kb\.nprobe"):
        load_config(ROOT / "configs/mnistc_nn.yaml", ["kb.nprobe=4"])


def nn_run(small_nn, tmp_path, *overrides):
    cfg = load_config(ROOT / "configs" / "mnistc_nn.yaml", [
        f"data.manifest={small_nn['manifest']}", f"model.checkpoint={small_nn['checkpoint']}",
        f"data.cache_dir={small_nn['cache']}", f"output_root={tmp_path / 'runs'}", "ttt.steps=2", "workers.num_shards=2", "workers.num_cpus=0.25", *overrides])
    run_dir = run_job(cfg)
    return (run_dir, pd.read_parquet(run_dir / "results"), pd.read_parquet(run_dir / "analysis"),
            json.loads((run_dir / "summary.json").read_text()))


STAGES = ["timing_embedding", "timing_cache_lookup", "timing_kb_retrieval", "timing_fine_tuning", "timing_forward_pass"]


def test_nn_end_to_end_fills_the_analysis_record(ray_session, small_nn, tmp_path):
    run_dir, results, analysis, summary = nn_run(small_nn, tmp_path)
    assert len(results) == 40 and results["error"].isna().all() and len(analysis) == 40
    assert set(results["adapter_source"]) == {"fresh"} and summary["cache"] is None
    assert (analysis["retrieved_indices"].map(len) == 8).all() and (analysis["retrieved_scores"].map(len) == 8).all()
    assert analysis["query"].str.startswith("x:").all() and not analysis["used_cache"].any()
    assert (analysis["losses"].map(len) == 2).all() and (analysis["steps"] == 2).all()
    timings = analysis[STAGES]
    assert (timings >= 0).all().all()
    assert (timings.sum(axis=1) <= analysis["timing_total"]).all()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["predict_from"] == "after_update" and Path(info["config"]["kb"]["dir"], "kb.json").is_file()


def test_nn_cache_hit_rate_follows_the_threshold(ray_session, small_nn, tmp_path):
    _, results, analysis, summary = nn_run(small_nn, tmp_path / "low", "ttt.nn.use_cache=true",
                                           "ttt.nn.cache_threshold=0.0", "ttt.nn.cache_capacity=4")
    cache = summary["cache"]
    assert {"hits", "misses", "evictions", "hit_rate"} <= set(cache) and cache["hit_rate"] > 0
    assert cache["hits"] + cache["misses"] == 40 and cache["hits"] == int((results["adapter_source"] == "cache").sum())
    hits = analysis[analysis["used_cache"]]
    assert hits["cache_query"].notna().all() and hits["retrieved_indices"].isna().all()

    _, results, _, summary = nn_run(small_nn, tmp_path / "exact", "ttt.nn.use_cache=true",
                                    "ttt.nn.cache_threshold=1.0", "ttt.nn.cache_capacity=4")
    cache = summary["cache"]
    assert cache["hit_rate"] == 0 and cache["misses"] == 40 and cache["evictions"] == 40 - 4
    assert set(results["adapter_source"]) == {"fresh"}
