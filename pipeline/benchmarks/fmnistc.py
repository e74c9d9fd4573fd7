"""`python -m pipeline build-fmnistc`: the Fashion-MNIST-C benchmark at CIFAR-10-C's shape, offline.

Builds, each step cached under `<cache>/fmnistc/` (and the model under `<cache>/models/`):
1. the Fashion-MNIST idx files (pipeline.embedded.fashion: a user's folder, the installed Debian
   package, or `apt-get download dataset-fashion-mnist` unpacked into the cache);
2. the source model, a BatchNorm ResNet-8 trained on the 60,000 training images;
3. the canonical corruptions of the first `per_domain` test images (10,000 = all, CIFAR-10-C's
   size) with the `corrupt` machinery on Ray: the 15 benchmark corruptions and the 4 held-out ones,
   severity 5 by default (`--severities 1,2,3,4,5` for gradual streams), in the cifar-c layout;
   the images depend only on (seed, corruption, severity, image index), so a 2,000-per-domain build
   holds the first 2,000 images of the 10,000 one;
4. manifests: `continual` (the 15 at severity 5: 150,000 rows at full size), `mixed` (the same
   rows shuffled), `correlated` (Dirichlet delta 0.1, RoTTA's), `validation` (the 4 held out,
   continual) and `clean` (the clean test images: the probes' source set);
5. `train.npz` (2,000 training images under `x`, labels under `y`): EATA's Fisher data.
Prints the `--set` lines that point configs/fmnistc_*.yaml at what it built (the configs name the
default paths of `--cache-dir .cache`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.benchmarks.corrupt import CorruptError, generate, source_from_arrays
from pipeline.benchmarks.layouts import BENCHMARK_CORRUPTIONS, HELD_OUT_CORRUPTIONS, build_manifest
from pipeline.embedded.fashion import FashionDataError, ensure_fashion_model, load_fashion
from pipeline.manifest import write_manifest

SETTINGS = {"continual": ("continual", {}), "mixed": ("mixed_domains", {"seed": 0}),
            "correlated": ("correlated", {"delta": 0.1, "seed": 0})}


def bench_dir(cache_dir: str | Path, per_domain: int, severities: list[int], seed: int) -> Path:
    sev = "".join(str(s) for s in severities)
    return Path(cache_dir) / "fmnistc" / f"n{per_domain}-sev{sev}-seed{seed}"


def _corrupted(root: Path, clean_x: np.ndarray, clean_y: np.ndarray, severities: list[int], seed: int,
               num_workers: int | None, log) -> Path:
    out = root / "c"
    info = out / "corrupt.json"
    if info.is_file() and json.loads(info.read_text()).get("n_clean") == len(clean_y):
        return out
    np.save(root / "clean.npy", clean_x)
    np.save(root / "clean_labels.npy", clean_y)
    from pipeline.job.ray_start import init_ray

    init_ray()
    n = len(clean_y) * (len(BENCHMARK_CORRUPTIONS) + len(HELD_OUT_CORRUPTIONS)) * len(severities)
    log(f"[fmnistc] corrupting {len(clean_y)} test images x 19 corruptions x severities {severities} = {n} images")
    generate(source_from_arrays(root / "clean.npy", root / "clean_labels.npy"), out,
             corruptions=list(BENCHMARK_CORRUPTIONS) + list(HELD_OUT_CORRUPTIONS), severities=severities,
             seed=seed, num_workers=num_workers, batch_size=250)
    return out


def _clean_manifest(root: Path, n: int) -> Path:
    labels = np.load(root / "clean_labels.npy")
    table = pa.table({"sample_id": [f"clean-{i:05d}" for i in range(n)], "path": [str((root / "clean.npy").resolve())] * n,
                      "index": pa.array(np.arange(n), pa.int64()), "label": pa.array(labels[:n].astype(np.int64)),
                      "domain": ["clean"] * n, "corruption": ["clean"] * n, "severity": pa.array([0] * n, pa.int32()),
                      "position": pa.array(np.arange(n), pa.int64())})
    meta = {"setting": "continual", "params": {}, "reset_on_domain_change": False, "domains": ["clean"], "rows": n}
    return write_manifest(table, meta, root / "clean.parquet")


def build_fmnistc(cache_dir: str | Path = ".cache", *, per_domain: int = 10000, severities: list[int] | None = None,
                  idx_dir: str | Path | None = None, seed: int = 0, epochs: int = 3, num_workers: int | None = None,
                  log=print) -> dict[str, Any]:
    severities = severities or [5]
    if not 1 <= per_domain <= 10000:
        raise CorruptError(f"--per-domain must be in 1..10000 (Fashion-MNIST has 10,000 test images), got {per_domain}")
    data = load_fashion(cache_dir, idx_dir)
    checkpoint = ensure_fashion_model(cache_dir, data, seed=seed, epochs=epochs, log=log)
    root = bench_dir(cache_dir, per_domain, severities, seed)
    root.mkdir(parents=True, exist_ok=True)
    corrupted = _corrupted(root, data["x_test"][:per_domain], data["y_test"][:per_domain], severities, seed,
                           num_workers, log)
    top = max(severities)
    out: dict[str, Any] = {"root": str(root.resolve()), "checkpoint": str(Path(checkpoint).resolve())}
    for name, (setting, params) in SETTINGS.items():
        path, _ = build_manifest("cifar-c", corrupted, root / f"{name}.parquet", setting=setting, setting_params=params,
                                 corruptions=list(BENCHMARK_CORRUPTIONS), severities=[top])
        out[name] = str(path.resolve())
    path, _ = build_manifest("cifar-c", corrupted, root / "validation.parquet", corruptions=list(HELD_OUT_CORRUPTIONS),
                             severities=[top])
    out["validation"] = str(path.resolve())
    out["clean"] = str(_clean_manifest(root, per_domain).resolve())
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(data["y_train"]), 2000, replace=False)
    np.savez(root / "train.npz", x=data["x_train"][pick], y=data["y_train"][pick])
    out["fisher_data"] = str((root / "train.npz").resolve())
    (root / "fmnistc.json").write_text(json.dumps(out, indent=2))
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline build-fmnistc", description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--per-domain", type=int, default=10000, help="test images per domain (10,000 = all, CIFAR-10-C's)")
    p.add_argument("--severities", default="5", help="comma list (default 5)")
    p.add_argument("--idx-dir", default=None, help="a folder with your own copy of the four Fashion-MNIST idx(.gz) files")
    p.add_argument("--seed", type=int, default=0, help="source model and corruption seed")
    p.add_argument("--epochs", type=int, default=3, help="source model training epochs")
    p.add_argument("--num-workers", type=int, default=None, help="concurrent corruption tasks (default what Ray fits)")
    args = p.parse_args(argv)
    try:
        out = build_fmnistc(args.cache_dir, per_domain=args.per_domain, idx_dir=args.idx_dir, seed=args.seed,
                            severities=[int(s) for s in args.severities.split(",") if s.strip()],
                            epochs=args.epochs, num_workers=args.num_workers)
    except (FashionDataError, CorruptError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"Fashion-MNIST-C in {out['root']}\n  model      {out['checkpoint']}", flush=True)
    for key in ("continual", "mixed", "correlated", "validation", "clean"):
        print(f"  {key:<10} {out[key]}", flush=True)
    print(f"run: python -m pipeline run configs/fmnistc_tent.yaml --set data.manifest={out['continual']} "
          f"--set model.checkpoint={out['checkpoint']}", flush=True)
    return 0
