"""kb_index on real faiss and real models: build / save / load round trips per index type,
embedder identity checks, the offline sentence model, the CNN feature embedder, the CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kb_index import (
    IndexSpec,
    SentenceEmbedder,
    TorchFeatureEmbedder,
    VectorEmbedder,
    build_kb,
    l2_normalize,
    load_kb,
    torch_checkpoint_name,
)
from pipeline.embedded.model import small_cnn

DIM = 32
N = 1500


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    # clustered, as real embeddings are: approximate indexes have real neighbours to find
    centres = rng.standard_normal((20, DIM))
    x = (centres[rng.integers(0, 20, N)] + 0.6 * rng.standard_normal((N, DIM))).astype(np.float32)
    rows = [{"id": f"doc{i}", "vector": x[i].tolist(), "label": i % 7, "text": f"row {i}"} for i in range(N)]
    queries = l2_normalize(centres[rng.integers(0, 20, 40)] + 0.6 * rng.standard_normal((40, DIM)))
    return rows, x, queries


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q.astype(np.float64) @ l2_normalize(x).astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_round_trip_matches_brute_force(tmp_path, corpus, index_type):
    rows, x, queries = corpus
    spec = IndexSpec(type=index_type, nlist=16, nprobe=4, m=16, ef_search=48)
    meta = build_kb(rows, tmp_path / "kb", VectorEmbedder("vec-test", DIM), spec, batch_size=400, item_column="vector",
                    progress=None)

    on_disk = json.loads((tmp_path / "kb" / "kb.json").read_text())
    assert on_disk == meta
    assert (meta["embedder"], meta["dim"], meta["count"], meta["index"]["type"]) == ("vec-test", DIM, N, index_type)
    assert meta["build_seconds"] >= 0 and meta["created"]
    np.testing.assert_allclose(np.load(tmp_path / "kb" / "vectors.npy"), l2_normalize(x), rtol=1e-6)
    assert pq.read_table(tmp_path / "kb" / "rows.parquet").column("id").to_pylist() == [r["id"] for r in rows]

    kb = load_kb(tmp_path / "kb")
    assert kb.mmapped, kb.load_mode  # faiss 1.15 maps flat, IVF and HNSW
    scores, idx = kb.search(queries, 10)
    assert scores.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (len(queries), 10)
    true_scores, true_idx = brute_force(x, queries, 10)
    if index_type == "flat":
        np.testing.assert_array_equal(idx, true_idx)
        np.testing.assert_allclose(scores, true_scores, atol=1e-5)
    else:
        assert recall(idx, true_idx) >= 0.9
    # searching every list / a wide beam is exact again
    if index_type == "ivf":
        np.testing.assert_array_equal(kb.search(queries, 10, nprobe=16)[1], true_idx)
    if index_type == "hnsw":
        assert recall(kb.search(queries, 10, ef_search=400)[1], true_idx) >= 0.99

    payload = kb.rows(idx[:2, :3])
    assert [[r["id"] for r in q] for q in payload] == [[f"doc{i}" for i in q] for q in idx[:2, :3]]
    assert payload[0][0]["label"] == int(idx[0, 0]) % 7
    assert kb.rows([int(idx[0, 0])], columns=["id"]) == [{"id": f"doc{idx[0, 0]}"}]

    in_memory = load_kb(tmp_path / "kb", mmap=False)
    assert not in_memory.mmapped
    np.testing.assert_array_equal(in_memory.search(queries, 10)[1], idx)


def test_missing_neighbours_are_minus_one(tmp_path, corpus):
    rows, _, queries = corpus
    build_kb(rows[:5], tmp_path / "kb", VectorEmbedder("vec-test", DIM), item_column="vector", progress=None)
    kb = load_kb(tmp_path / "kb")
    scores, idx = kb.search(queries[:2], 8)
    assert (idx[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert (idx[:, :5] >= 0).all()
    assert kb.rows(idx)[0][5:] == [None, None, None]


def test_embedder_and_dim_mismatch_are_refused(tmp_path, corpus):
    rows, _, queries = corpus
    build_kb(rows[:50], tmp_path / "kb", VectorEmbedder("vec-test", DIM), item_column="vector", progress=None)
    kb = load_kb(tmp_path / "kb")
    with pytest.raises(ValueError, match=r"built with embedder 'vec-test'.*embedder 'all-MiniLM-L6-v2'"):
        kb.search(queries, 3, embedder="all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match=rf"dim {DIM + 1} but .* has dim {DIM}"):
        kb.search(np.ones((2, DIM + 1), np.float32), 3)
    kb.search(queries, 3, embedder="vec-test")  # its own embedder is fine
    with pytest.raises(ValueError, match="nprobe applies to ivf"):
        kb.search(queries, 3, nprobe=4)


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a"}], "no 'id' column"),
    ([{"id": 1, "body": "a"}], "none of the columns text, pixels, vector"),
    ([{"id": 1, "text": "a"}, {"id": 1, "text": "b"}], "duplicate"),
    ([{"id": 1, "text": "a", "vector": [1.0, 2.0, 3.0]}], "several columns to embed"),
])
def test_bad_corpus_is_named(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        build_kb(rows, tmp_path / "kb", VectorEmbedder("v", 3), progress=None)


def test_cnn_feature_embedder_on_pixels(tmp_path):
    torch.manual_seed(0)
    model = small_cnn()
    model.train()  # a live TTT model may be in train mode: embedding must not change that
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (60, 784))
    embedder = TorchFeatureEmbedder(model, "small_cnn@test")
    vecs = embedder.embed(list(pixels))
    assert vecs.shape == (60, embedder.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert model.training and all(m.training for m in model.modules())
    # a worker embeds already-normalised batch tensors: same vectors as raw pixels
    inputs = (torch.from_numpy(pixels.astype(np.float32)).view(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(embedder.embed(inputs), vecs, atol=1e-5)

    rows = [{"id": i, "pixels": p.tolist(), "label": i % 10} for i, p in enumerate(pixels)]
    build_kb(rows, tmp_path / "kb", embedder, IndexSpec(type="hnsw", m=8), batch_size=16, progress=None)
    scores, idx = load_kb(tmp_path / "kb").search(vecs[:5], 1, embedder="small_cnn@test")
    np.testing.assert_array_equal(idx[:, 0], np.arange(5))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)


@pytest.fixture(scope="module")
def sentence_embedder():
    return SentenceEmbedder(threads=2)


def test_sentence_embedder_offline_paraphrases(sentence_embedder, tmp_path):
    assert (sentence_embedder.name, sentence_embedder.dim) == ("all-MiniLM-L6-v2", 384)
    texts = ["A man is playing the guitar.", "Someone strums a guitar.",
             "The stock market fell sharply today.", "Share prices dropped steeply this morning.",
             "Preheat the oven before baking bread."]
    v = sentence_embedder.embed(texts)
    assert v.shape == (5, 384) and v.dtype == np.float32
    sims = v @ v.T
    assert sims[0, 1] > max(sims[0, 2], sims[0, 3], sims[0, 4]) + 0.2
    assert sims[2, 3] > max(sims[2, 0], sims[2, 1], sims[2, 4]) + 0.2

    rows = [{"id": i, "text": t} for i, t in enumerate(texts[::2])]  # one sentence per topic
    build_kb(rows, tmp_path / "kb", sentence_embedder, IndexSpec(type="flat"), progress=None)
    kb = load_kb(tmp_path / "kb")
    _, idx = kb.search(sentence_embedder.embed(["Equities slid on the exchange."]), 1, embedder=sentence_embedder.name)
    assert kb.rows(idx)[0][0]["text"] == "The stock market fell sharply today."


def test_cli_builds_and_names_errors(tmp_path, capsys):
    from pipeline.embedded.kb import main

    torch.manual_seed(0)
    ckpt = tmp_path / "cnn.pt"
    torch.save(small_cnn().state_dict(), ckpt)
    rng = np.random.default_rng(2)
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(80)],
                             "pixels": [rng.integers(0, 256, 784).tolist() for _ in range(80)],
                             "label": [i % 10 for i in range(80)]}), tmp_path / "digits.parquet")
    rc = main(["--corpus", str(tmp_path / "digits.parquet"), "--out", str(tmp_path / "kb"),
               "--embedder", f"cnn:{ckpt}", "--index", "ivf", "--nlist", "2", "--batch-size", "32", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "embedded 80/80 rows" in out
    kb = load_kb(tmp_path / "kb")
    assert kb.embedder == torch_checkpoint_name("small_cnn", ckpt) and len(kb) == 80
    assert kb.meta["index"] == {"type": "ivf", "nlist": 2, "nprobe": 2}

    assert main(["--corpus", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: corpus file not found: {tmp_path / 'nope.jsonl'}"
    assert main(["--corpus", str(tmp_path / "digits.parquet"), "--out", str(tmp_path / "x"), "--column", "body"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no 'body' column" in err


def test_checkpoint_name_follows_the_file_content(tmp_path):
    """The digest is memoised per file identity, so a rewritten checkpoint must get a new name."""
    from kb_index.embedders import torch_checkpoint_name

    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"weights v1")
    first = torch_checkpoint_name("small_cnn", ckpt)
    assert torch_checkpoint_name("small_cnn", ckpt) == first
    ckpt.write_bytes(b"weights version 2")
    os.utime(ckpt, ns=(1, 2))  # a distinct mtime even on coarse file-system clocks
    assert torch_checkpoint_name("small_cnn", ckpt) != first
