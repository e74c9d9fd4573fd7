"""The lm-evaluation-harness model `ttt-nn` (pipeline/harness.py) on the tiny GPT-2, real Ray,
a real faiss KB of pydoc chunks and the real sentence embedder: the three request types, one
adaptation per context (counted by the workers), the context alone as the retrieval query, and
the same numbers as `pipeline run` on the same rows.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lm_eval.api.instance import Instance

from kb_index import SentenceEmbedder, build_kb
from pipeline.config import load_config
from pipeline.embedded.text import chunk_document, pydoc_documents
from pipeline.harness import TTTHarnessLM, group_requests
from pipeline.harness import main as harness_main
from pipeline.job.runner import run_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_lm_dir):
    """A 40-chunk KB, two multiple-choice questions (3 choices each) and two texts to score."""
    chunks = [c for _, doc in pydoc_documents()[10:40] for c in chunk_document(doc)]
    kb_dir = tmp_path_factory.mktemp("harness_kb")
    build_kb([{"id": i, "text": t} for i, t in enumerate(chunks[:40])], kb_dir, SentenceEmbedder(threads=1),
             progress=None)
    q1, q2, t1, t2 = (c[:300] for c in chunks[40:44])
    questions = [{"context": q1[:200], "choices": [q1[200:240], "zebra quantum", "lorem ipsum dolor"], "label": 0},
                 {"context": q2[:200], "choices": ["x = 1", q2[200:240], "import antigravity"], "label": 1}]
    root = tmp_path_factory.mktemp("harness_runs")
    overrides = {"model.path": str(tiny_lm_dir), "model.lora.rank": 4, "model.lora.target_modules": "[c_attn]",
                 "kb.dir": str(kb_dir), "ttt.nn.k": 2, "ttt.lr": 0.01, "ttt.nn.logit_lens_top_k": 0,
                 "data.cache_dir": str(root / "cache"), "output_root": str(root / "runs")}
    return {"kb": kb_dir, "questions": questions, "texts": [t1, t2], "root": root, "overrides": overrides,
            "manifest": _manifest(root, questions, [t1, t2])}


def _manifest(root: Path, questions, texts) -> Path:
    rows = [{"sample_id": f"mc{i}", "text": q["context"], "choices": q["choices"], "label": q["label"],
             "domain": "choices"} for i, q in enumerate(questions)]
    rows += [{"sample_id": f"t{i}", "text": t, "choices": None, "label": None, "domain": "text"}
             for i, t in enumerate(texts)]
    path = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i, metadata=("t", i, 1)) for i, a in enumerate(args)]


def _harness(setting, workers: int) -> TTTHarnessLM:
    # the model args lm_eval would pass from --model_args (dotted config fields included)
    return TTTHarnessLM(config=str(ROOT / "configs" / "lm_nn.yaml"), workers=workers,
                        **{**setting["overrides"], "data.manifest": str(setting["manifest"])})


def test_requests_group_by_context_and_keep_the_choice_out():
    args = [("ctx A", " yes"), ("ctx A", " no"), ("ctx B", " yes"), ("ctx A", " maybe")]
    groups = group_requests(["loglikelihood"] * 4, args)
    assert [g["context"] for g in groups] == ["ctx A", "ctx B"]
    assert [i for i, _, _ in groups[0]["items"]] == [0, 1, 3]
    assert all(" yes" not in g["context"] and " no" not in g["context"] for g in groups)


def test_harness_answers_the_three_request_types_like_the_pipeline(ray_session, setting):
    questions, texts = setting["questions"], setting["texts"]
    lm = _harness(setting, workers=2)
    try:
        ll_args = [(q["context"], c) for q in questions for c in q["choices"]]
        logliks = lm.loglikelihood(_instances("loglikelihood", ll_args))
        assert lm.adaptations() == 2  # two questions, six choices: one adaptation per context
        rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
        assert lm.adaptations() == 4
        generated = lm.generate_until(_instances("generate_until", [(texts[0][:120], {"until": ["\n\n"],
                                                                                      "max_gen_toks": 8})]))
        run_dir = lm.run_dir
    finally:
        lm.shutdown()
    assert len(logliks) == 6 and all(isinstance(ll, float) and ll < 0 and isinstance(g, bool) for ll, g in logliks)
    assert isinstance(generated[0], str) and "\n\n" not in generated[0]

    # the retrieval query of every adaptation is the context alone (nn's query descriptor is
    # a hash of the text it embedded); no choice ever went into it
    analysis = pd.read_parquet(run_dir / "analysis").sort_values(["shard", "batch_index"])
    contexts = [q["context"] for q in questions] + texts + [texts[0][:120]]
    assert list(analysis["query"]) == [f"t:{hashlib.sha1(c.encode()).hexdigest()[:12]}" for c in contexts]
    assert (analysis["steps"] == 2).all() and (analysis["stop_reason"] == "steps_done").all()
    requests = pd.read_parquet(run_dir / "requests")
    assert len(requests) == 6 + 2 + 1 and set(requests["kind"]) == {"loglikelihood", "loglikelihood_rolling",
                                                                   "generate_until"}

    # the project's own scoring of the same rows (pipeline run, same config): equal numbers
    cfg = load_config(ROOT / "configs" / "lm_nn.yaml", [f"{k}={v}" for k, v in setting["overrides"].items()] + [
        f"data.manifest={setting['manifest']}", "workers.num_shards=1"])
    results = pd.read_parquet(run_job(cfg) / "results").set_index("sample_id")
    for i in range(2):
        assert [ll for ll, _ in logliks[3 * i:3 * i + 3]] == pytest.approx(list(results.loc[f"mc{i}", "choice_logliks"]),
                                                                          rel=1e-5)
    for i in range(2):
        assert rolling[i] == pytest.approx(-results.loc[f"t{i}", "nll"], rel=1e-5)
    harness_results = pd.read_parquet(run_dir / "results")
    assert set(harness_results["bits_per_byte"].round(6)) >= set(results.loc[["t0", "t1"], "bits_per_byte"].round(6))


def test_lm_eval_runs_the_local_task_offline(ray_session, setting, tmp_path, capsys):
    """`python -m pipeline lm-eval` (its `main`, in this process and Ray session) on a task YAML over
    a local JSON file, as the shipped tasks do over the project's own sets: lm_eval's accuracy is
    the argmax of the harness's answers per question, one adaptation per question."""
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"text": q["context"], "choices": q["choices"], "label": q["label"]})
                              for q in setting["questions"]))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) +
        "\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{text}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    args = ",".join(f"{k}={v}" for k, v in setting["overrides"].items() if k != "model.lora.target_modules")
    assert harness_main(["--tasks", "tiny_mc", "--include_path", str(tmp_path), "--model_args",
                         f"{args},data.manifest={setting['manifest']},workers=1,ttt.method=nn"]) == 0
    out = capsys.readouterr().out
    assert "1 workers, 2 adaptations" in out
    acc = float(re.search(r"tiny_mc\s+acc\s+([0-9.]+)", out).group(1))
    requests = pd.read_parquet(Path(re.search(r"run directory: (\S+)", out).group(1)) / "requests")
    assert len(requests) == 6 and (requests["kind"] == "loglikelihood").all()
    # lm_eval's acc from the harness's answers: per question, is the best choice the label?
    picks = requests.sort_values(["doc_id", "request_index"]).groupby("doc_id")["loglik"].apply(
        lambda s: int(s.to_numpy().argmax()))
    labels = [q["label"] for q in setting["questions"]]
    assert acc == pytest.approx(sum(int(picks[d] == labels[d]) for d in range(2)) / 2)
