"""Throughput of `python -m pipeline corrupt`: images/s per corruption type in one process, and the
whole generator on Ray with 1 vs 2 workers (concurrent tasks), side by side in one run.

Images: tiles of scikit-learn's two sample photographs (real RGB content, shipped offline), at CIFAR
size (32 px) and ImageNet-C size (224 px). Severities cycle 1..5 over the images.

    RAY_AUTH_MODE=disabled .venv/bin/python bench/corrupt_throughput.py [--n32 200] [--n224 20] [--ray-n 8 --ray-size 224] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import cv2
import numpy as np
from sklearn.datasets import load_sample_images

from pipeline.benchmarks.corrupt import CleanSource, corrupt_image, generate, image_seed
from pipeline.benchmarks.layouts import ALL_CORRUPTIONS


def tiles(size: int, n: int, seed: int = 0) -> np.ndarray:
    """n random size x size crops of the two sample photographs (427 x 640 RGB)."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        out.append(photo[y:y + size, x:x + size])
    return np.stack(out)


def per_corruption(images: np.ndarray) -> dict[str, float]:
    """images/s of each corruption in this process (one thread), severities cycling 1..5."""
    corrupt_image(images[0], "glass_blur", 1, 0)  # numba compiles glass blur's shuffle once per process
    rates = {}
    for name in ALL_CORRUPTIONS:
        t0 = time.perf_counter()
        for i, img in enumerate(images):
            severity = i % 5 + 1
            corrupt_image(img, name, severity, image_seed(0, name, severity, i))
        rates[name] = len(images) / (time.perf_counter() - t0)
    return rates


def ray_rate(source: CleanSource, workers: int, corruptions: list[str], severities: list[int], batch: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        generate(source, out, corruptions=corruptions, severities=severities, seed=0, num_workers=workers,
                 batch_size=batch)
        return len(source) * len(corruptions) * len(severities) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n32", type=int, default=200, help="32-px images per corruption")
    parser.add_argument("--n224", type=int, default=20, help="224-px images per corruption")
    parser.add_argument("--ray-n", type=int, default=8, help="clean images for the Ray comparison")
    parser.add_argument("--ray-size", type=int, default=224, help="their size in px")
    parser.add_argument("--batch", type=int, default=8, help="images per Ray task")
    parser.add_argument("--repeats", type=int, default=2, help="alternating 1- and 2-worker runs each")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    small, large = tiles(32, args.n32), tiles(224, args.n224, seed=1)
    r32, r224 = per_corruption(small), per_corruption(large)
    print(f"{'corruption':18s} {'32px img/s':>11s} {'224px img/s':>12s}")
    for name in ALL_CORRUPTIONS:
        print(f"{name:18s} {r32[name]:11.0f} {r224[name]:12.1f}")
    print(f"{'all 19 (harmonic)':18s} {len(r32) / sum(1 / r for r in r32.values()):11.0f} "
          f"{len(r224) / sum(1 / r for r in r224.values()):12.1f}")

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2)
    source = CleanSource(labels=np.zeros(args.ray_n, np.int64), names=[str(i) for i in range(args.ray_n)],
                         classes=["0"], array=tiles(args.ray_size, args.ray_n, seed=2))
    corruptions, severities = list(ALL_CORRUPTIONS), [1, 3, 5]
    ray_rate(source, 2, corruptions, severities, args.batch)  # warm-up: worker processes start, numba compiles
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for w in (1, 2):
            rates[w].append(ray_rate(source, w, corruptions, severities, args.batch))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    n = args.ray_n * len(corruptions) * len(severities)
    print(f"\nRay generator, {n} images (19 corruptions x severities 1,3,5 x {args.ray_n} {args.ray_size}-px images), "
          f"batch {args.batch}, cifar-c layout:")
    print(f"  1 worker : {one:7.0f} img/s  (runs {[round(r) for r in rates[1]]})")
    print(f"  2 workers: {two:7.0f} img/s  (runs {[round(r) for r in rates[2]]})")
    print(f"  2 vs 1 workers: {two / one:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
