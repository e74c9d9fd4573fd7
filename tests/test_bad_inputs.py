"""The bad-input corpus: every kind of bad file, pixel, label, manifest, config and fault the job
meets, each with its exact outcome: an error row naming the file or column, a one-line refusal
(exit 2, no run directory), or a recomputation. Row-level kinds run through the real image
adapter; run-level kinds through the real job on the session's local Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAFETY_S
from PIL import Image

from pipeline import cli
from pipeline.config import ConfigError, load_config
from pipeline.job.runner import run_job
from ttt import TTTConfig, build_method
from ttt.images import ImageSpec
from workers.adapters import ImageClassifierAdapter, ImageRowReader
from workers.models import load_model

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "pipeline.embedded.model:small_cnn"


@pytest.fixture(scope="module")
def digits(small_default):
    """Eight real test digits (uint8 28x28) and their labels, from the small stream."""
    table = pq.read_table(small_default["manifest"]).to_pandas().head(8)
    images = [np.asarray(p, dtype=np.uint8).reshape(28, 28) for p in table["pixels"]]
    return images, [int(v) for v in table["label"]]


@pytest.fixture(scope="module")
def adapter(small_default):
    model = load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")
    return ImageClassifierAdapter(model, read_timeout_s=5.0)


def decode(adapter, row):
    """(array, None) or (None, error message) for one row, as the worker sees it."""
    batch = next(iter(adapter.build_loader([{"sample_id": "x", **row}], batch_size=1)))
    if batch.errors:
        return None, batch.errors[0][1]
    return batch.inputs[0], None


def save_png(path: Path, arr: np.ndarray, **kw) -> str:
    Image.fromarray(arr, **kw).save(path)
    return str(path)


# -- row level: each case -> (row builder, expected substring of the error) ----------------------
def _rows(tmp: Path, digit: np.ndarray) -> dict[str, tuple[dict, str]]:
    flat = digit.reshape(-1).astype(np.float64)
    nan, inf = flat.copy(), flat.copy()
    nan[100], inf[200] = np.nan, np.inf
    wide = digit.reshape(14, 56)
    np.save(tmp / "wide.npy", wide)
    np.savez(tmp / "archive.npz", x=digit)
    npz_as_npy = tmp / "renamed_npz.npy"
    os.replace(tmp / "archive.npz", npz_as_npy)
    np.save(tmp / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "notes.png").write_text("these are not pixels\n")
    good_png = save_png(tmp / "good.png", digit)
    data = Path(good_png).read_bytes()
    (tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    os.mkfifo(tmp / "fifo.png")
    (tmp / "folder.png").mkdir()
    np.save(tmp / "stack.npy", np.stack([digit, digit]))
    return {
        "nan pixel": ({"pixels": nan.tolist(), "label": 1}, "NaN or infinite"),
        "inf pixel": ({"pixels": inf.tolist(), "label": 1}, "NaN or infinite"),
        "pixels above 255": ({"pixels": (flat + 300).tolist(), "label": 1}, "outside [0, 255]"),
        "negative pixels": ({"pixels": (-flat - 1).tolist(), "label": 1}, "outside [0, 255]"),
        "wrong pixel count": ({"pixels": flat[:700].tolist(), "label": 1}, "700 values"),
        "non-numeric pixels": ({"pixels": ["a"] * 784, "label": 1}, "not numbers"),
        "14x56 png": ({"path": save_png(tmp / "wide.png", wide), "label": 1}, "image is 14x56, the model takes 28x28"),
        "14x56 npy": ({"path": str(tmp / "wide.npy"), "label": 1}, "image is 14x56"),
        "npz renamed .npy": ({"path": str(npz_as_npy), "label": 1}, "an .npz archive, not a .npy array"),
        "pickled npy": ({"path": str(tmp / "objects.npy"), "label": 1}, "not a plain .npy array"),
        "zero-byte file": ({"path": str(tmp / "empty.png"), "label": 1}, "empty.png: empty file"),
        "text file as image": ({"path": str(tmp / "notes.png"), "label": 1}, "notes.png: not an image file"),
        "truncated png": ({"path": str(tmp / "truncated.png"), "label": 1}, "truncated.png: unreadable image"),
        "missing file": ({"path": str(tmp / "gone.png"), "label": 1}, "gone.png: file not found"),
        "fifo path": ({"path": str(tmp / "fifo.png"), "label": 1}, "fifo.png: a FIFO"),
        "directory path": ({"path": str(tmp / "folder.png"), "label": 1}, "folder.png: a directory"),
        "index out of range": ({"path": str(tmp / "stack.npy"), "index": 5, "label": 1}, "index 5 is outside"),
        "no payload": ({"label": 1}, "neither 'pixels' nor 'path'"),
        "label outside classes": ({"path": good_png, "label": 12}, "12 is outside the model's 10 classes"),
        "negative label": ({"path": good_png, "label": -1}, "-1 is outside the model's 10 classes"),
        "non-numeric label": ({"path": good_png, "label": "cat"}, "'cat' is not an integer class index"),
        "fractional label": ({"path": good_png, "label": 3.5}, "3.5 is not an integer class index"),
    }


def test_row_level_bad_inputs_become_error_rows_naming_the_problem(adapter, digits, tmp_path):
    cases = _rows(tmp_path, digits[0][0])
    assert len(cases) >= 20
    for kind, (row, expected) in cases.items():
        x, err = decode(adapter, row)
        assert x is None, f"{kind}: decoded instead of refused"
        assert expected in err, f"{kind}: {err!r}"
        assert len(err.splitlines()) == 1


def test_images_that_need_conversion_read_as_intensities(adapter, digits, tmp_path):
    """16-bit PNG, palette GIF, RGB and RGBA PNG, HWC and CHW arrays, 0-1 floats and a label stored as
    text all give the input the plain 8-bit digit gives."""
    digit = digits[0][0]
    want, err = decode(adapter, {"path": save_png(tmp_path / "d.png", digit), "label": 7})
    assert err is None
    rgb = np.repeat(digit[..., None], 3, axis=2)
    np.save(tmp_path / "hwc.npy", digit[..., None])
    np.save(tmp_path / "chw.npy", digit[None])
    np.save(tmp_path / "unit.npy", digit.astype(np.float32) / 255.0)
    Image.fromarray(digit).convert("P").save(tmp_path / "d.gif")
    variants = {
        "16-bit png": {"path": save_png(tmp_path / "d16.png", digit.astype(np.uint16) * 257)},
        "palette gif": {"path": str(tmp_path / "d.gif")},
        "rgb png": {"path": save_png(tmp_path / "rgb.png", rgb)},
        "rgba png": {"path": save_png(tmp_path / "rgba.png", np.dstack([rgb, np.full_like(digit, 255)]))},
        "hwc npy": {"path": str(tmp_path / "hwc.npy")},
        "chw npy": {"path": str(tmp_path / "chw.npy")},
        "0-1 floats": {"path": str(tmp_path / "unit.npy")},
        "label as text": {"pixels": digit.reshape(-1).tolist(), "label": "7"},
    }
    for kind, row in variants.items():
        got, err = decode(adapter, {"label": 7, **row})
        assert err is None, f"{kind}: {err}"
        torch.testing.assert_close(got, want, atol=2.5e-2 if kind == "rgb png" else 1e-5, rtol=0, msg=kind)


def test_a_read_that_blocks_times_out_as_an_error_row(small_default, digits):
    """Fault injection: a row whose read never returns (a stalled network file system) becomes an
    error row after data.read_timeout_s; the other rows of the batch are read as usual."""
    import threading

    release = threading.Event()

    class StallingReader(ImageRowReader):
        def decode(self, record):
            if record["sample_id"] == "stalls":
                release.wait(30)
            return super().decode(record)

    model = load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")
    stalling = ImageClassifierAdapter(model)
    stalling.reader = StallingReader(stalling.spec, num_classes=10, read_timeout_s=2.0)
    good = {"pixels": digits[0][0].reshape(-1).tolist(), "label": 1}
    rows = [{"sample_id": "a", "path": "unused", **good}, {"sample_id": "stalls", "path": "/slow/fs/x.png", **good},
            {"sample_id": "b", "path": "unused", **good}]
    batch = next(iter(stalling.build_loader(rows, batch_size=3)))
    release.set()
    assert [r["sample_id"] for r in batch.records] == ["a", "b"]
    (row, msg), = batch.errors
    assert row["sample_id"] == "stalls" and "/slow/fs/x.png" in msg and "read_timeout_s=2" in msg


def test_every_stalled_read_of_a_block_times_out_alone(tmp_path: Path, digits):
    """Two stalled reads in one block (one of them its last row): each is a TimeoutError row, every
    other row is read, in order, by the fresh thread that takes over after a stall."""
    import threading

    release = threading.Event()
    for i in range(4):
        Image.fromarray(digits[0][i].reshape(28, 28)).save(tmp_path / f"{i}.png")

    class StallingReader(ImageRowReader):
        def decode(self, record):
            if "stalls" in record["path"]:
                release.wait(30)
            return super().decode(record)

    reader = StallingReader(ImageSpec(shape=(1, 28, 28)), num_classes=10, read_timeout_s=1.5)
    paths = [tmp_path / "0.png", "/slow/stalls-1.png", tmp_path / "1.png", tmp_path / "2.png",
             tmp_path / "3.png", "/slow/stalls-2.png"]
    try:
        got = reader.read([{"path": str(p), "label": 1} for p in paths])
    finally:
        release.set()
    assert [isinstance(g, str) for g in got] == [False, True, False, False, False, True]
    assert "stalls-1.png" in got[1] and "stalls-2.png" in got[5] and "read_timeout_s=1.5" in got[5]
    want = [ImageRowReader(ImageSpec(shape=(1, 28, 28)), read_timeout_s=None).decode({"path": str(p)})
            for p in (paths[0], *paths[2:5])]
    for g, w in zip([got[0], *got[2:5]], want):
        np.testing.assert_array_equal(g, w)


def test_a_nan_image_does_not_touch_the_other_rows_of_its_tent_batch(adapter, digits):
    """Under Tent a NaN image used to poison the whole batch's BN statistics; now it is an error row
    and the batch adapts exactly as it would without it."""
    images, labels = digits
    rows = [{"sample_id": str(i), "pixels": img.reshape(-1).tolist(), "label": lab}
            for i, (img, lab) in enumerate(zip(images, labels))]
    poisoned = [dict(r) for r in rows]
    bad = np.asarray(poisoned[3]["pixels"], dtype=np.float64)
    bad[5] = np.nan
    poisoned[3]["pixels"] = bad.tolist()
    cfg = TTTConfig(method="tent", batch_size=8)

    def run(batch_rows):
        model = load_model(FACTORY, None, {}, "cpu")
        model.load_state_dict(adapter.get_model().state_dict())
        a = ImageClassifierAdapter(model)
        batch = next(iter(a.build_loader(batch_rows, batch_size=len(batch_rows))))
        return batch, build_method(a, cfg).step(batch.inputs).logits

    clean_batch, clean_logits = run(rows[:3] + rows[4:])
    batch, logits = run(poisoned)
    assert [r["sample_id"] for r, _ in batch.errors] == ["3"] and "NaN" in batch.errors[0][1]
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, clean_logits)


# -- run level: the real job ------------------------------------------------------------------
def _cfg(small_default, tmp_path, *overrides):
    base = [f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
            f"output_root={tmp_path / 'runs'}", "ttt.batch_size=10", "workers.num_shards=2",
            "workers.progress_interval_s=0.5"]
    return load_config(ROOT / "configs" / "mnistc_tent.yaml", base + list(overrides))


def test_bad_rows_in_a_run_are_error_rows_in_place(ray_session, small_default, digits, tmp_path):
    """A manifest mixing good rows with bad pixels, bad labels (a text label column) and an integer
    domain column: every row once, in its place, bad rows as error rows, the rest predicted."""
    images, labels = digits
    rows = []
    for i in range(40):
        img = images[i % len(images)].reshape(-1).astype(np.float64)
        label = str(labels[i % len(labels)])
        if i == 5:
            img[0] = np.nan
        if i == 17:
            label = "seven"
        if i == 23:
            label = "99"
        rows.append({"sample_id": f"s{i:03d}", "pixels": img.tolist(), "label": label, "domain": i // 20})
    manifest = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    run_dir = run_job(_cfg(small_default, tmp_path, f"data.manifest={manifest}"))
    df = pd.read_parquet(run_dir / "results").sort_values("position").reset_index(drop=True)
    assert list(df["sample_id"]) == [r["sample_id"] for r in rows]
    errors = df[df["error"].notna()]
    assert list(errors["sample_id"]) == ["s005", "s017", "s023"]
    assert "NaN" in errors["error"].iloc[0] and "'seven'" in errors["error"].iloc[1]
    assert "99 is outside" in errors["error"].iloc[2]
    assert errors["prediction"].isna().all() and errors["confidence"].isna().all()
    assert df["error"].isna().sum() == 37 and df.loc[df["error"].isna(), "confidence"].notna().all()
    assert set(df["domain"]) == {"0", "1"}
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def _cli(capsys, *args) -> tuple[int, list[str]]:
    code = cli.main(["run", str(ROOT / "configs" / "mnistc_tent.yaml"), *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_manifest_and_config_problems_are_one_line_and_leave_nothing(small_default, tmp_path, capsys):
    """Refused before Ray starts: exit 2, one line naming the problem, no run directory."""
    out = tmp_path / "runs"
    base = ["--set", f"data.manifest={small_default['manifest']}", "--set", f"model.checkpoint={small_default['checkpoint']}",
            "--set", f"output_root={out}"]
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(small_default["manifest"]).slice(0, 0), empty)
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "a_file").write_text("x")
    pickled = tmp_path / "pickled.pt"
    torch.save({"weights": os.system}, pickled)  # a payload weights_only refuses
    marker = tmp_path / "factory_ran"
    cases = {
        "empty manifest": (["--set", f"data.manifest={empty}"], "has no rows"),
        "empty manifest dir": (["--set", f"data.manifest={tmp_path / 'emptydir'}"], "holds no Parquet files"),
        "output_root under a file": (["--set", f"output_root={tmp_path / 'a_file' / 'runs'}"], "is a file, not a directory"),
        "factory TypeError": (["--set", "model.factory=torch.nn:Linear", "--set", "model.factory_kwargs={width: 3}"],
                              "failed: TypeError"),
        "stdlib factory": (["--set", "model.factory=os:system", "--set", f"model.factory_kwargs={{command: 'touch {marker}'}}"],
                           "'os' is the standard library, not a model factory"),
        "builtin factory": (["--set", "model.factory=builtins:eval"], "not a model factory"),
        "pickle checkpoint": (["--set", f"model.checkpoint={pickled}"], "refused by torch.load(weights_only=True)"),
        "user factory, no checkpoint": (["--set", "model.factory=torch.nn:Flatten", "--set", "model.checkpoint=null"],
                                        "model.checkpoint is not set"),
        "tent without norm layers": (["--set", "model.factory=torch.nn:Flatten", "--set", "model.checkpoint=none"],
                                     "update_filter=norm_only"),
        "nn without embed": (["--set", "model.factory=torch.nn:Flatten", "--set", "model.checkpoint=none",
                              "--set", "ttt.method=nn"], "needs hook(s) ['embed']"),
        "mean per channel mismatch": (["--set", "model.mean=[0.1, 0.2]"], "model.mean has 2 values"),
    }
    for kind, (args, expected) in cases.items():
        code, lines = _cli(capsys, *base, *args)
        assert code == 2, f"{kind}: exit {code}, {lines}"
        assert len(lines) == 1 and expected in lines[0], f"{kind}: {lines}"
        assert not out.exists() or not any(out.iterdir()), f"{kind} left {list(out.iterdir())}"
    assert not marker.exists()  # the refused factory never ran


def test_no_gpu_refuses_before_writing(ray_session, small_default, tmp_path):
    with pytest.raises(ConfigError, match=r"workers.num_gpus=1 but the cluster has 0 GPU"):
        run_job(_cfg(small_default, tmp_path, "workers.num_gpus=1"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_stale_manifest_is_refused_and_corrupt_part_recomputed(ray_session, small_default, tmp_path):
    manifest = tmp_path / "m.parquet"
    table = pq.read_table(small_default["manifest"]).slice(0, 40)
    pq.write_table(table, manifest)
    cfg = _cfg(small_default, tmp_path, f"data.manifest={manifest}", "run_id=fp")
    run_dir = run_job(cfg)
    first = pd.read_parquet(run_dir / "results").sort_values("position").reset_index(drop=True)
    # a corrupt part (truncated by a crash or a bad copy) is recomputed, not trusted
    part = run_dir / "results" / "part-00001-00000.parquet"
    part.write_bytes(part.read_bytes()[:100])
    kept = (run_dir / "results" / "part-00000-00000.parquet").stat().st_mtime_ns
    run_job(cfg)
    again = pd.read_parquet(run_dir / "results").sort_values("position").reset_index(drop=True)
    pd.testing.assert_frame_equal(again.drop(columns="run_id"), first.drop(columns="run_id"))
    assert (run_dir / "results" / "part-00000-00000.parquet").stat().st_mtime_ns == kept
    # the same path with other rows: refused, the old results stay
    pq.write_table(pq.read_table(small_default["manifest"]).slice(40, 40), manifest)
    with pytest.raises(ConfigError, match="the manifest's content changed"):
        run_job(cfg)
    assert len(pd.read_parquet(run_dir / "results")) == 40


FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, os, resource, signal, sys
    import pyarrow.parquet as pq
    import ray
    from pipeline.config import load_config
    from pipeline.job import outputs
    from pipeline.job.outputs import DiskFullError
    from pipeline.job.runner import run_job
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024**2)
    cfg = load_config(sys.argv[1], sys.argv[3:])
    limit = int(sys.argv[2])
    if limit:
        # Parquet parts this driver writes may not grow past `limit` bytes (the kernel refuses with
        # EFBIG, as a full disk refuses with ENOSPC): a disk that fills mid-run. Only the parts:
        # run.json must still take its `failed` mark, whatever its size.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        write_table = pq.write_table

        def full_disk_write(*args, **kwargs):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            try:
                return write_table(*args, **kwargs)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

        outputs.pq.write_table = full_disk_write
    try:
        run_job(cfg)
    except DiskFullError as exc:
        print("DISKFULL", exc)
        sys.exit(3)
""")


def test_full_disk_fails_in_one_line_and_resumes(small_default, tmp_path):
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT)
    args = [str(ROOT / "configs" / "mnistc_tent.yaml"), f"data.manifest={small_default['manifest']}",
            f"model.checkpoint={small_default['checkpoint']}", f"output_root={tmp_path / 'runs'}", "run_id=full",
            "ttt.batch_size=50", "workers.num_shards=3"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(script), args[0], "2000", *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=SAFETY_S)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("DISKFULL")][0]
    assert "no space left writing" in line and "rerun with the same run_id" in line
    run_dir = tmp_path / "runs" / "full"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert not list(run_dir.rglob("*.tmp"))
    proc = subprocess.run([sys.executable, str(script), args[0], "0", *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=SAFETY_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == pq.read_metadata(small_default["manifest"]).num_rows and df["sample_id"].is_unique
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


SHARDS_SCRIPT = textwrap.dedent("""
    import sys
    import ray
    from pipeline.config import load_config
    from pipeline.job.runner import run_job
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024**2)
    for shards in [int(s) for s in sys.argv[2].split(",")]:
        run_dir = run_job(load_config(sys.argv[1], sys.argv[3:] + [f"workers.num_shards={shards}", f"run_id=s{shards}"]))
        print("DONE", shards, flush=True)
""")


def test_any_shard_count_finishes_on_a_two_cpu_cluster(small_default, tmp_path):
    """Default worker settings on a 2-CPU local Ray: the pool leaves Ray Data its decode CPUs for
    every shard count (3+ used to hang at start; 1-8 were run by hand, see the issue note)."""
    script = tmp_path / "shards.py"
    script.write_text(SHARDS_SCRIPT)
    args = [f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
            f"output_root={tmp_path / 'runs'}", "data.limit=40", "ttt.batch_size=5"]
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "configs" / "mnistc_tent.yaml"), "3,8", *args],
                          cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                          timeout=SAFETY_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("DONE")] == ["3", "8"]
    for shards in (3, 8):
        df = pd.read_parquet(tmp_path / "runs" / f"s{shards}" / "results")
        assert len(df) == 40 and df["sample_id"].is_unique and df["shard"].nunique() == shards


def test_bulk_pixel_decoding_equals_row_by_row(small_default, tmp_path, monkeypatch):
    """The Ray Data decode task reads a block's inline pixels in bulk; a block with bad rows gives
    the same arrays and the same error messages, byte for byte, as reading every row alone."""
    import pipeline.job.inputs as inputs_module
    from pipeline.job.inputs import InputSpec, prepare_block

    rows = pq.read_table(small_default["manifest"]).slice(0, 60).to_pylist()
    rows[3]["pixels"] = [float("nan")] + list(rows[3]["pixels"][1:])
    rows[5]["label"] = 42
    rows[9]["pixels"] = [v + 300 for v in rows[9]["pixels"]]
    manifest = tmp_path / "block.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    spec = InputSpec(manifest=str(manifest), kind="image_classifier",
                     model={"image_shape": [1, 28, 28], "mean": 0.1307, "std": 0.3081}, num_classes=10,
                     read_timeout_s=60)
    block = {"lo": np.array([0]), "hi": np.array([60])}
    bulk = prepare_block(block, inputs=spec)
    monkeypatch.setattr(inputs_module, "_inline_pixels", lambda table, spec: None)  # row by row
    alone = prepare_block(block, inputs=spec)
    assert bulk.column("_image").to_pylist() == alone.column("_image").to_pylist()
    errors = bulk.column("_error").to_pylist()
    assert errors == alone.column("_error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [3, 5, 9]


def test_bulk_array_rows_equal_row_by_row(tmp_path, monkeypatch):
    """Rows that point into a CIFAR-C-style uint8 .npy (HWC colour, HW grey) read in bulk give the
    arrays the row-by-row path gives; a bad label stays an error row."""
    import pipeline.job.inputs as inputs_module
    from pipeline.job.inputs import InputSpec, prepare_block

    rng = np.random.default_rng(0)
    for name, shape, arr in (("colour", [3, 32, 32], rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)),
                             ("grey", [1, 28, 28], rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))):
        np.save(tmp_path / f"{name}.npy", arr)
        labels = [i % 10 for i in range(20)]
        labels[4] = 11
        pq.write_table(pa.table({"sample_id": [f"{name}{i}" for i in range(20)], "path": [str(tmp_path / f"{name}.npy")] * 20,
                                 "index": list(range(5, 25)), "label": labels}), tmp_path / f"{name}.parquet")
        spec = InputSpec(manifest=str(tmp_path / f"{name}.parquet"), kind="image_classifier",
                         model={"image_shape": shape, "mean": 0.5, "std": 0.25}, num_classes=10, read_timeout_s=60)
        block = {"lo": np.array([0]), "hi": np.array([20])}
        bulk = prepare_block(block, inputs=spec)
        with monkeypatch.context() as m:
            m.setattr(inputs_module, "_array_rows", lambda *a: None)
            alone = prepare_block(block, inputs=spec)
        assert bulk.column("_image").to_pylist() == alone.column("_image").to_pylist(), name
        assert bulk.column("_error").to_pylist() == alone.column("_error").to_pylist(), name
        assert [i for i, e in enumerate(bulk.column("_error").to_pylist()) if e] == [4]
