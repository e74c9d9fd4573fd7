"""One local Ray instance for the whole test session (starting Ray costs seconds)."""
from __future__ import annotations

import os

import pytest

DOMAINS = ["shot_noise", "motion_blur", "fog"]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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

    from pipeline.data.mnistc import ensure_mnistc, split_digits
    from pipeline.default_model import train_source_model

    cache = tmp_path_factory.mktemp("cache")
    manifest = ensure_mnistc(cache, DOMAINS, severity=3, n_test=50, seed=0)
    split = split_digits(0)
    torch.manual_seed(0)
    state = train_source_model(split["x_train"][:1500], split["y_train"][:1500], seed=0, epochs=1)
    ckpt = cache / "cnn.pt"
    torch.save(state, ckpt)
    return {"cache": cache, "manifest": manifest, "checkpoint": ckpt}
