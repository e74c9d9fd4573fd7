"""One local Ray instance for the whole test session (starting Ray costs seconds)."""
from __future__ import annotations

import os

import pytest

DOMAINS = ["shot_noise", "motion_blur", "fog"]
# A hang guard for the subprocesses and waits of the tests, never a pass condition: every wait ends
# on an event. Long, because at load 10-30 a fresh interpreter importing torch and Ray, or a worker
# starting, takes minutes (a 120 s limit failed a correct test so).
SAFETY_S = 900

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# nothing is downloaded in tests: models load from package folders or from what a fixture saved
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_default(tmp_path_factory):
    """A 150-row MNIST-C stream and a briefly trained source checkpoint (not the cached default)."""
    import torch

    from pipeline.embedded.mnistc import ensure_mnistc, split_digits
    from pipeline.embedded.model import train_source_model

    cache = tmp_path_factory.mktemp("cache")
    manifest = ensure_mnistc(cache, DOMAINS, severity=3, n_test=50, seed=0)
    split = split_digits(0)
    torch.manual_seed(0)
    state = train_source_model(split["x_train"][:1500], split["y_train"][:1500], seed=0, epochs=1)
    ckpt = cache / "cnn.pt"
    torch.save(state, ckpt)
    return {"cache": cache, "manifest": manifest, "checkpoint": ckpt}


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 with a 400-token byte-level BPE trained on pydoc
    text, saved with save_pretrained (about a second to build; not the cached default LM)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.embedded.text import chunk_document, pydoc_documents
    from pipeline.embedded.tiny_lm import train_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    texts = [c for _, doc in pydoc_documents()[:40] for c in chunk_document(doc)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    bos = tokenizer.bos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=bos, eos_token_id=bos, pad_token_id=bos,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    out = tmp_path_factory.mktemp("tiny_lm")
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
