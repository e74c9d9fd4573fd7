"""`python -m pipeline corrupt`: the canonical ImageNet-C corruptions of any image set, on Ray.

The corruption functions are those of PyPI `imagecorruptions-imaug` (import `imagecorruptions`;
Michaelis et al.'s packaging of Hendrycks & Dietterich's ImageNet-C code, kept working on current
NumPy / scikit-image): the 15 benchmark corruptions and the 4 held-out validation ones
(speckle_noise, gaussian_blur, spatter, saturate), severities 1-5. Their constants are ImageNet-C's,
tuned for 224-px images: on 28-32 px images blur radii and noise levels are relatively harsher than
in CIFAR-10-C, whose generator used its own smaller constants. Results are comparable across runs
of this tool, not with the published CIFAR-10-C arrays.

Work is spread as Ray Data tasks: `ray.data.range(jobs x images)` mapped in batches, each row one
(corruption, severity, clean image). Determinism: the functions draw from NumPy's global RNG
(glass_blur and impulse_noise take a seed argument), so every image is corrupted right after
seeding from SeedSequence(seed, corruption's place in the canonical 19, severity, image index):
the output depends on neither batching nor the number of workers nor which corruptions run.

How the package's own entry point is adapted (it refuses images under 32 px and returns RGB):
- grey images (H x W or H x W x 1) are stacked to RGB as the package's `corrupt()` does, corrupted,
  and turned back to grey with PIL's "L" conversion (ITU-R 601 luma; exact for the corruptions
  that keep R = G = B). motion_blur needs this: on a 2-D image it raises IndexError. spatter, frost
  and saturate add colour; their grey output is the luma of the coloured result.
- images under 32 px: passed to the corruption functions as they are (no padding or resizing):
  all 19 run on sizes from 8 px up (checked at 8-31 px; tests run them at 28 px). The 32-px check
  exists only in the package's wrapper.
- output: `np.uint8` of the function's float result, as the package's `corrupt()` does (truncation).

Outputs:
- `--layout cifar-c` (small images of one shape): `<out>/<corruption>.npy` (N_blocks x N x H x W [x C]
  uint8, stacked severity-major like CIFAR-10-C), `<out>/labels.npy` (labels tiled per block),
  `<out>/corrupt.json` (severities present, seed, source), and `<out>/manifest.parquet`. The driver
  writes the arrays from the batches the tasks return.
- `--layout files`: `<out>/<corruption>/<severity>/<class>/<stem>.png` written by the tasks (the
  output directory must be on storage every node can reach), `<out>/classes.txt` and
  `<out>/manifest.parquet` (ImageNet-C layout: `manifest imagenet-c <out>` rebuilds it with any setting).
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.benchmarks.layouts import ALL_CORRUPTIONS, HELD_OUT_CORRUPTIONS, SEVERITIES, build_manifest
from pipeline.benchmarks.sources import (  # noqa: F401 - the sources are part of this module's interface
    MAX_PIXELS,
    MIN_SIDE,
    CleanSource,
    CorruptError,
    scan_image,
    source_from_arrays,
    source_from_digits,
    source_from_folder,
    source_from_manifest,
)

SEED_FUNCTIONS = ("glass_blur", "impulse_noise")  # take their own seed: they ignore NumPy's global RNG


# --------------------------------------------------------------------------------- one image

def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The seed of one (corruption, severity, image); the corruption's place in the canonical list,
    not in the run's selection, so a subset of corruptions reproduces the full run's images."""
    return int(np.random.SeedSequence([seed, ALL_CORRUPTIONS.index(corruption), severity, index]).generate_state(1)[0])


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """One canonical corruption of one uint8 image (H x W, H x W x 1 or H x W x 3), same shape back."""
    from imagecorruptions import corruption_dict  # numba JIT start-up: import only where images are corrupted

    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise CorruptError(f"expected a uint8 H x W [x 1|3] image, got {image.shape} {image.dtype}")
    grey = image.ndim == 2 or image.shape[2] == 1
    rgb = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2) if grey else image
    np.random.seed(seed)
    kwargs = {"seed": seed} if corruption in SEED_FUNCTIONS else {}
    out = np.uint8(corruption_dict[corruption](Image.fromarray(rgb), severity, **kwargs))
    if grey:
        out = np.asarray(Image.fromarray(out).convert("L"))
        return out.reshape(image.shape)
    return out


# -------------------------------------------------------------------------------- Ray tasks

def _corrupt_batch(batch: dict[str, np.ndarray], *, source: CleanSource, jobs: list[tuple[str, int]], seed: int,
                   out_dir: str | None) -> dict[str, np.ndarray]:
    """Rows `id` = job * N + image. Returns the images (cifar-c layout) or writes files and returns
    their paths (files layout)."""
    import cv2

    cv2.setNumThreads(1)  # one task, one CPU: OpenCV's own pool would fight the other tasks
    n = len(source)
    ids = np.asarray(batch["id"], dtype=np.int64)
    images = source.load(ids % n)
    outs = []
    for row, img in zip(ids, images):
        corruption, severity = jobs[row // n]
        index = int(row % n)
        out = corrupt_image(img, corruption, severity, image_seed(seed, corruption, severity, index))
        if out_dir is None:
            outs.append(out)
            continue
        target = Path(out_dir) / corruption / str(severity) / source.classes[source.labels[index]] / f"{source.names[index]}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="PNG")
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, target)
        outs.append(str(target))
    if out_dir is None:
        return {"id": ids, "image": np.stack(outs)}
    return {"id": ids, "path": np.asarray(outs, dtype=object)}


def run_corruptions(source: CleanSource, corruptions: Sequence[str], severities: Sequence[int], *, seed: int = 0,
                    out_dir: str | None = None, num_workers: int | None = None, batch_size: int = 64):
    """The lazy Ray dataset of every (corruption, severity, image); `num_workers` caps concurrent tasks."""
    import ray

    jobs = [(c, s) for c in corruptions for s in severities]
    shipped = source
    if source.array is not None and isinstance(source.array, np.ndarray):
        # one copy in the object store, fetched by each task, instead of one per task's arguments
        shipped = CleanSource(**{**source.__dict__, "array": ray.put(source.array)})
    compute = ray.data.TaskPoolStrategy(size=num_workers) if num_workers else None
    total = len(jobs) * len(source)
    # one block per task-sized batch: a single range block would run as a single task
    ds = ray.data.range(total, override_num_blocks=-(-total // batch_size)).map_batches(
        _corrupt_batch, batch_size=batch_size, compute=compute, num_cpus=1,
        fn_kwargs={"source": shipped, "jobs": jobs, "seed": seed, "out_dir": out_dir})
    # Ray Data otherwise reserves part of the cluster for each operator (here the id range and the
    # corruption tasks): on 2 CPUs the second worker then got no CPU (1.04x for 2 workers; 1.71x without: bench/corrupt_throughput.py)
    ds.context.op_resource_reservation_enabled = False
    return ds


def check_selection(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    unknown = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    if unknown or not corruptions:
        raise CorruptError(f"unknown corruption(s) {unknown}; known: {', '.join(ALL_CORRUPTIONS)}")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise CorruptError(f"severities must be a non-empty subset of {list(SEVERITIES)}, got {list(severities)}")


def write_cifar_layout(dataset, source: CleanSource, corruptions: Sequence[str], severities: Sequence[int],
                       out: Path) -> None:
    """Collect the tasks' images into `<corruption>.npy` files, severity blocks stacked in order."""
    n = len(source)
    first = source.load(np.asarray([0]))[0]
    shapes = source.shapes or {source.load(np.asarray([i]))[0].shape for i in (0, n - 1)}
    if len(shapes) != 1:
        raise CorruptError(f"the cifar-c layout needs images of one shape (and mode), found {sorted(shapes)}; "
                           "use --layout files")
    arrays = {c: np.lib.format.open_memmap(out / f"{c}.npy.tmp", mode="w+", dtype=np.uint8,
                                            shape=(len(severities) * n,) + first.shape) for c in corruptions}
    n_sev = len(severities)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        ids = batch["id"]
        job, index = ids // n, ids % n
        for c_i, corruption in enumerate(corruptions):
            mine = (job // n_sev) == c_i
            if mine.any():
                # job % n_sev is the severity's block: rows block*n + index
                arrays[corruption][(job[mine] % n_sev) * n + index[mine]] = batch["image"][mine]
    for corruption in list(arrays):
        arrays.pop(corruption).flush()  # the last reference: the map closes before the rename
        os.replace(out / f"{corruption}.npy.tmp", out / f"{corruption}.npy")
    np.save(out / "labels.npy", np.tile(source.labels, n_sev))


def _quiet_ray_data() -> None:
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def generate(source: CleanSource, out: str | Path, *, corruptions: Sequence[str] = ALL_CORRUPTIONS,
             severities: Sequence[int] = SEVERITIES, layout: str = "cifar-c", seed: int = 0,
             num_workers: int | None = None, batch_size: int = 64, include_held_out: bool = False) -> Path:
    """Corrupt every image of `source` with each corruption x severity into `out`; returns the manifest.

    The test manifest (`<out>/manifest.parquet`) leaves the 4 held-out validation corruptions out
    (hyperparameters chosen on them would leak into the test numbers) unless `include_held_out` or
    only held-out ones were asked for; they get `<out>/manifest_held_out.parquet` of their own."""
    check_selection(corruptions, severities)
    if len(source) == 0:
        why = f" ({len(source.skipped)} skipped, e.g. {next(iter(source.skipped.values()))})" if source.skipped else ""
        raise CorruptError(f"no clean images to corrupt{why}")
    if layout not in ("cifar-c", "files"):
        raise CorruptError(f"layout must be cifar-c or files, got {layout!r}")
    out = check_out_dir(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _generate(source, out, corruptions, severities, layout, seed, num_workers, batch_size, include_held_out)
    except BaseException as exc:  # never a partial output: what this call wrote goes
        shutil.rmtree(out, ignore_errors=True) if created else [_remove(p) for p in out.iterdir()]
        if isinstance(exc, OSError):
            raise CorruptError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise


def check_out_dir(out: str | Path) -> Path:
    """--out must be a new or empty directory that can be written (a partial earlier output is never mixed in)."""
    p = Path(out).resolve()
    if p.exists() and not p.is_dir():
        raise CorruptError(f"--out {out} is a file; give a new or empty directory")
    if p.is_dir() and any(p.iterdir()):
        raise CorruptError(f"--out {out} is not empty; give a new or empty directory")
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise CorruptError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CorruptError(f"--out {out}: {existing} is not writable")
    return p


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _generate(source: CleanSource, out: Path, corruptions: Sequence[str], severities: Sequence[int], layout: str,
              seed: int, num_workers: int | None, batch_size: int, include_held_out: bool) -> Path:
    _quiet_ray_data()
    t0 = time.perf_counter()
    if layout == "cifar-c":
        ds = run_corruptions(source, corruptions, severities, seed=seed, num_workers=num_workers, batch_size=batch_size)
        write_cifar_layout(ds, source, corruptions, severities, out)
    else:
        ds = run_corruptions(source, corruptions, severities, seed=seed, out_dir=str(out),
                             num_workers=num_workers, batch_size=batch_size)
        written = sum(len(b["id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
        expected = len(source) * len(corruptions) * len(severities)
        if written != expected:
            raise CorruptError(f"wrote {written} images, expected {expected}")
        (out / "classes.txt").write_text("".join(f"{c}\n" for c in source.classes))
    info = {"layout": layout, "corruptions": list(corruptions), "severities": list(severities), "seed": seed,
            "n_clean": len(source), "source": source.description, "classes": source.classes,
            "skipped": {"count": len(source.skipped), "images": source.skipped},
            "seconds": round(time.perf_counter() - t0, 2)}
    (out / "corrupt.json").write_text(json.dumps(info, indent=2))
    options = {"corruptions": list(corruptions), "severities": list(severities)}
    if layout == "files":
        options["classes"] = "imagenet" if source.description.get("labels") == "imagenet" else source.classes
    kind = "cifar-c" if layout == "cifar-c" else "imagenet-c"
    held = [c for c in corruptions if c in HELD_OUT_CORRUPTIONS]
    test = list(corruptions) if include_held_out or len(held) == len(corruptions) else \
        [c for c in corruptions if c not in HELD_OUT_CORRUPTIONS]
    manifest, _ = build_manifest(kind, out, out / "manifest.parquet", **{**options, "corruptions": test})
    if set(held) - set(test):
        build_manifest(kind, out, out / "manifest_held_out.parquet", **{**options, "corruptions": held})
    return manifest


# ---------------------------------------------------------------------------------- command
