"""The shared actors on real Ray: the adapter cache's eviction, threshold and counter semantics,
an adapter handed from one actor to another through the object store, and the KB actor
returning what an in-process search returns."""
from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import ray
import torch

from kb_index import IndexSpec, VectorEmbedder, build_kb, load_kb
from workers.adapter_cache import fetch_adapter, get_or_create_adapter_cache, offer_adapter
from workers.kb_actor import get_or_create_kb_actor


def one_hot(i: int, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i] = 1.0
    return v


@pytest.fixture
def make_cache(ray_session):
    made = []

    def make(**kwargs):
        handle = get_or_create_adapter_cache(name=f"cache-{uuid.uuid4().hex[:8]}", **kwargs)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        ray.kill(handle)


def offer(cache, i: int, ref) -> str:
    return ray.get(cache.offer.remote(one_hot(i), f"query {i}", [ref]))


def lookup(cache, embedding):
    return ray.get(cache.lookup.remote(embedding))


def keys(cache) -> list[str]:
    return [e["key"] for e in ray.get(cache.entries.remote())]


def test_lru_evicts_least_recently_used(make_cache):
    cache, ref = make_cache(capacity=2, threshold=0.9, eviction="lru"), ray.put("adapter")
    k0 = offer(cache, 0, ref)
    offer(cache, 1, ref)
    assert lookup(cache, one_hot(0))[0] == k0  # k0 used after k1 was inserted
    k2 = offer(cache, 2, ref)
    assert keys(cache) == [k0, k2]


def test_lfu_evicts_least_frequently_used_ties_by_recency(make_cache):
    cache, ref = make_cache(capacity=2, threshold=0.9, eviction="lfu"), ray.put("adapter")
    k0 = offer(cache, 0, ref)
    offer(cache, 1, ref)
    for _ in range(2):
        lookup(cache, one_hot(0))
    lookup(cache, one_hot(1))  # k1 is the most recent but the less used (2 uses vs 3)
    k2 = offer(cache, 2, ref)
    assert keys(cache) == [k0, k2]
    # k2 (1 use, inserted last) vs k0 (3 uses): k2 goes, though it is the most recent
    k3 = offer(cache, 3, ref)
    assert keys(cache) == [k0, k3]
    lookup(cache, one_hot(3))
    lookup(cache, one_hot(3))  # k3 now 3 uses, k0 3 uses: the tie goes to the older last use
    k4 = offer(cache, 4, ref)
    assert keys(cache) == [k3, k4]


def test_random_eviction_is_seeded(make_cache):
    ref = ray.put("adapter")

    def survivors(seed: int) -> list[str]:
        cache = make_cache(capacity=3, threshold=0.9, eviction="random", seed=seed)
        for i in range(8):
            offer(cache, i, ref)
        assert ray.get(cache.stats.remote())["evictions"] == 5
        return keys(cache)

    first = survivors(seed=7)
    assert survivors(seed=7) == first
    assert any(survivors(seed=s) != first for s in (1, 2, 3))


def test_threshold_best_entry_and_counters(make_cache):
    cache, ref = make_cache(capacity=4, threshold=0.6, eviction="lru"), ray.put("adapter")
    k0 = offer(cache, 0, ref)
    # [3, 4] / 5 has cosine exactly 0.6 with e0: at the threshold is a hit
    at = np.zeros(8)
    at[0], at[1] = 3.0, 4.0
    key, _, score = lookup(cache, at)
    assert key == k0 and score == 0.6
    below = np.zeros(8)
    below[0], below[1] = 3.0, 4.001
    assert lookup(cache, below) is None
    # two entries above the threshold: the most similar wins
    near = one_hot(0) * 0.8 + one_hot(1) * 0.6
    k_near = ray.get(cache.offer.remote(near, "near", [ref]))
    q = one_hot(0) * 0.7 + one_hot(1) * 0.7
    assert lookup(cache, q)[0] == k_near
    assert lookup(cache, one_hot(5)) is None
    stats = ray.get(cache.stats.remote())
    assert {k: stats[k] for k in ("hits", "misses", "evictions", "offers", "size", "lost")} == {
        "hits": 2, "misses": 2, "evictions": 0, "offers": 2, "size": 2, "lost": 0}
    assert stats["hit_rate"] == 0.5


def test_offer_needs_a_wrapped_ref_and_one_dim(make_cache):
    cache = make_cache(capacity=2, threshold=0.9)
    with pytest.raises(TypeError, match=r"needs \[ObjectRef\].*adapter's value"):
        # a bare ref is resolved by Ray: the actor would receive the tensors themselves
        ray.get(cache.offer.remote(one_hot(0), "q", ray.put({"w": torch.ones(2)})))
    offer(cache, 0, ray.put("a"))
    with pytest.raises(ValueError, match="dim 3, the cache holds dim 8"):
        lookup(cache, np.ones(3))


def test_existing_cache_with_other_settings_is_refused(ray_session):
    name = f"cache-{uuid.uuid4().hex[:8]}"
    cache = get_or_create_adapter_cache(name=name, capacity=2, threshold=0.9)
    try:
        assert get_or_create_adapter_cache(name=name, capacity=2, threshold=0.9) == cache
        with pytest.raises(ValueError, match=f"actor '{name}' already exists with"):
            get_or_create_adapter_cache(name=name, capacity=3, threshold=0.9)
    finally:
        ray.kill(cache)


@ray.remote(num_cpus=0)
class FakeWorker:
    """A worker-like actor: trains (here: makes) an adapter and shares it through the cache."""

    def share(self, cache, embedding, seed: int) -> str:
        gen = torch.Generator().manual_seed(seed)
        state = {"lora_A": torch.randn(4, 16, generator=gen), "lora_B": torch.randn(16, 4, generator=gen)}
        return offer_adapter(cache, embedding, "the query", state)

    def reuse(self, cache, embedding, expected: dict) -> tuple[str, float, bool] | None:
        found = fetch_adapter(cache, embedding)
        if found is None:
            return None
        key, state, score = found
        same = state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
        return key, score, same


def test_adapter_stored_by_one_actor_is_reused_by_another_after_it_exits(make_cache):
    cache = make_cache(capacity=4, threshold=0.95)
    producer, consumer = FakeWorker.remote(), FakeWorker.remote()
    key = ray.get(producer.share.remote(cache, one_hot(2), 123))
    gen = torch.Generator().manual_seed(123)
    expected = {"lora_A": torch.randn(4, 16, generator=gen), "lora_B": torch.randn(16, 4, generator=gen)}
    query = one_hot(2) + 0.1 * one_hot(3)  # similar, not identical
    found_key, score, same = ray.get(consumer.reuse.remote(cache, query, expected))
    assert found_key == key and score > 0.95 and same
    assert ray.get(consumer.reuse.remote(cache, one_hot(6), expected)) is None

    # the cache adopted the adapter: it outlives the worker that made it (released or lost mid-run)
    ray.kill(producer)
    with pytest.raises(ray.exceptions.RayActorError):  # returns once Ray knows it is dead
        ray.get(producer.share.remote(cache, one_hot(2), 123))
    time.sleep(2)  # the owner's death would reach the object's other holders by now (~1 s here)
    found_key, score, same = ray.get(consumer.reuse.remote(cache, query, expected))
    assert found_key == key and same
    stats = ray.get(cache.stats.remote())
    assert (stats["lost"], stats["size"]) == (0, 1)
    ray.kill(consumer)


def test_kb_actor_search_equals_in_process(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    rows = [{"id": f"r{i}", "vector": x[i].tolist(), "label": i % 5} for i in range(400)]
    build_kb(rows, tmp_path / "kb", VectorEmbedder("vec-test", 16), IndexSpec(type="hnsw", m=8), progress=None)
    queries = rng.standard_normal((64, 16)).astype(np.float32)

    name = f"kb-{uuid.uuid4().hex[:8]}"
    actor = get_or_create_kb_actor(tmp_path / "kb", name=name, num_cpus=0.1, threads=2)
    try:
        scores, idx, payload = ray.get(actor.search.remote(queries, 5, embedder="vec-test", payload=["id", "label"]))
        kb = load_kb(tmp_path / "kb")
        want_scores, want_idx = kb.search(queries, 5)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(scores, want_scores)
        assert payload == kb.rows(want_idx, columns=["id", "label"])
        assert ray.get(actor.search.remote(queries[:1], 3, payload=False))[2] is None

        info = ray.get(actor.info.remote())
        assert (info["embedder"], info["dim"], info["count"], info["index"]["type"]) == ("vec-test", 16, 400, "hnsw")
        assert info["load_mode"] == "mmap"
        # Ray gave the 0.1-CPU actor OMP_NUM_THREADS=1; the actor widened faiss to what it was given
        assert (info["omp_num_threads_env"], info["faiss_threads"]) == ("1", 2)

        with pytest.raises(ValueError, match="built with embedder 'vec-test'"):
            ray.get(actor.search.remote(queries, 5, embedder="all-MiniLM-L6-v2"))

        # get-or-create returns the same actor (its counters carry on) and refuses another KB
        again = get_or_create_kb_actor(tmp_path / "kb", name=name)
        assert ray.get(again.stats.remote())["queries"] == 65
        build_kb(rows[:10], tmp_path / "other", VectorEmbedder("vec-test", 16), progress=None)
        with pytest.raises(ValueError, match="already serves the KB at"):
            get_or_create_kb_actor(tmp_path / "other", name=name)
    finally:
        ray.kill(actor)
