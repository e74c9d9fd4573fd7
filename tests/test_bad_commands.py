"""A corpus of malformed input for `python -m pipeline manifest` and `corrupt`: each case is a
one-line refusal (exit 2, nothing written: no manifest, no `<corruption>.npy.tmp`, no output
folder), or, for a per-image problem in `corrupt`, a skip counted in corrupt.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.benchmarks.commands import corrupt_main, manifest_main


def refused(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def cifar(tmp_path):
    """A CIFAR-C-style root: fog.npy (5 severity blocks of 4 images) and labels.npy."""
    root = tmp_path / "cifar"
    root.mkdir()
    np.save(root / "fog.npy", np.zeros((20, 8, 8), np.uint8))
    np.save(root / "labels.npy", np.arange(20) % 3)
    return root


def folder(root: Path, classes=("a", "b"), n: int = 2, size=(12, 12), mode: str = "L") -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new(mode, size, color=0 if mode == "L" else (0, 0, 0)).save(root / c / f"{c}{i}.png")
    return root


def manifest(root: Path, out: Path, *extra: str, layout: str = "cifar-c") -> int:
    args = [layout, str(root), "--out", str(out), *extra]
    return manifest_main(args + (["--corruptions", "fog"] if layout == "cifar-c" else []))


# ------------------------------------------------------------------------------------ manifest

@pytest.mark.parametrize("labels, needle", [
    (np.zeros((20, 2), np.int64), "shape (N,)"),
    (np.arange(20) + 0.5, "whole numbers"),
    (np.full(20, -1), ">= 0"),
    (np.array(["x"] * 20), "integers"),
])
def test_manifest_refuses_bad_labels(cifar, tmp_path, capsys, labels, needle):
    np.save(cifar / "labels.npy", labels)
    refused(capsys, manifest(cifar, tmp_path / "m.parquet"), needle)
    assert not (tmp_path / "m.parquet").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '{"severities": "5"}', '{"severities": [9]}',
                                  '{"severities": [5, 5]}', '{"other": 1}'])
def test_manifest_refuses_a_malformed_corrupt_json(cifar, tmp_path, capsys, text):
    (cifar / "corrupt.json").write_text(text)
    refused(capsys, manifest(cifar, tmp_path / "m.parquet"), "corrupt.json is malformed")
    assert not (tmp_path / "m.parquet").exists()


def test_manifest_refuses_an_out_that_is_a_directory_or_under_a_file(cifar, tmp_path, capsys):
    refused(capsys, manifest(cifar, tmp_path), "is a directory")
    (tmp_path / "file").write_text("x")
    refused(capsys, manifest(cifar, tmp_path / "file" / "m.parquet"), "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_manifest_refuses_a_read_only_out(cifar, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    refused(capsys, manifest(cifar, ro / "m.parquet"), "not writable")


def test_manifest_refuses_bad_subset_files(cifar, tmp_path, capsys):
    out = tmp_path / "m.parquet"
    refused(capsys, manifest(cifar, out, "--subset-file", str(tmp_path / "none.txt")), "file not found")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    refused(capsys, manifest(cifar, out, "--subset-file", str(tmp_path / "latin1.txt")), "not UTF-8")
    (tmp_path / "dup.txt").write_text("1\n2\n1\n")
    refused(capsys, manifest(cifar, out, "--subset-file", str(tmp_path / "dup.txt")), "twice")
    (tmp_path / "blank.txt").write_text("\n\n")
    refused(capsys, manifest(cifar, out, "--subset-file", str(tmp_path / "blank.txt")), "lists nothing")
    assert not out.exists()


@pytest.mark.parametrize("severities", ["1,x", "", "1.5", "9"])
def test_manifest_refuses_bad_severities(cifar, tmp_path, capsys, severities):
    refused(capsys, manifest(cifar, tmp_path / "m.parquet", "--severities", severities), "severities")


def test_manifest_refuses_a_symlink_loop_in_a_class_folder(tmp_path, capsys):
    root = folder(tmp_path / "imgs")
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
    refused(capsys, manifest(root, tmp_path / "m.parquet", layout="folder"), "symlink loop")
    assert not (tmp_path / "m.parquet").exists()


def test_manifest_refuses_a_link_between_class_folders(tmp_path, capsys):
    """b's images reached through a/more would be labelled a as well as b."""
    root = folder(tmp_path / "imgs")
    (root / "a" / "more").symlink_to(root / "b", target_is_directory=True)
    refused(capsys, manifest(root, tmp_path / "m.parquet", layout="folder"), "already listed")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable folders")
def test_manifest_refuses_an_unreadable_class_folder(tmp_path, capsys):
    root = folder(tmp_path / "imgs")
    (root / "b").chmod(0)
    try:
        refused(capsys, manifest(root, tmp_path / "m.parquet", layout="folder"), "cannot read")
    finally:
        (root / "b").chmod(0o755)


def test_manifest_of_a_good_folder_still_works(tmp_path, capsys):
    root = folder(tmp_path / "imgs")
    assert manifest(root, tmp_path / "m.parquet", layout="folder") == 0
    import pandas as pd

    df = pd.read_parquet(tmp_path / "m.parquet")
    assert sorted(df["label"]) == [0, 0, 1, 1] and df["sample_id"].is_unique


# ------------------------------------------------------------------------------------- corrupt

def corrupt(out: Path, *source: str, extra: tuple[str, ...] = ()) -> int:
    return corrupt_main([*source, "--out", str(out), "--corruptions", "fog", "--severities", "1", *extra])


@pytest.mark.parametrize("labels, needle", [
    (np.zeros((4, 2), np.int64), "shape (N,)"),
    (np.array([0, 1, 1.5, 2]), "whole numbers"),
])
def test_corrupt_refuses_bad_labels(tmp_path, capsys, labels, needle):
    np.save(tmp_path / "x.npy", np.zeros((4, 12, 12), np.uint8))
    np.save(tmp_path / "y.npy", labels)
    refused(capsys, corrupt(tmp_path / "out", "--images", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")),
            needle)
    assert not (tmp_path / "out").exists()


def test_corrupt_refuses_tiny_array_images(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 1), np.uint8))
    np.save(tmp_path / "y.npy", np.zeros(4, np.int64))
    refused(capsys, corrupt(tmp_path / "out", "--images", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")),
            "under 8 px")


@pytest.mark.parametrize("flag, value", [("--severities", "1,x"), ("--image-shape", "28,x")])
def test_corrupt_refuses_bad_integer_lists(tmp_path, capsys, flag, value):
    args = ["--digits", "--out", str(tmp_path / "out"), "--corruptions", "fog", flag, value]
    if flag == "--image-shape":
        args[0:1] = ["--manifest", str(tmp_path / "m.parquet")]
    refused(capsys, corrupt_main(args), flag)
    assert not (tmp_path / "out").exists()


def test_corrupt_refuses_an_out_that_is_a_file_or_not_empty(tmp_path, capsys):
    root = folder(tmp_path / "imgs")
    (tmp_path / "file").write_text("x")
    refused(capsys, corrupt(tmp_path / "file", "--folder", str(root)), "is a file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.npy").write_text("x")
    refused(capsys, corrupt(tmp_path / "full", "--folder", str(root)), "not empty")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["old.npy"]


def test_corrupt_refuses_mixed_modes_in_the_cifar_layout(tmp_path, capsys, ray_session):
    root = folder(tmp_path / "imgs", classes=("a",))
    folder(root, classes=("b",), mode="RGB")
    refused(capsys, corrupt(tmp_path / "out", "--folder", str(root)), "one shape")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_corrupt_refuses_a_symlink_loop(tmp_path, capsys):
    root = folder(tmp_path / "imgs")
    (root / "b" / "again").symlink_to(root / "b", target_is_directory=True)
    refused(capsys, corrupt(tmp_path / "out", "--folder", str(root)), "symlink loop")


def test_corrupt_with_nothing_readable_refuses(tmp_path, capsys):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_text("not a png")
    refused(capsys, corrupt(tmp_path / "out", "--folder", str(tmp_path / "imgs")), "no clean images", "skipped")
    assert not (tmp_path / "out").exists()


def test_corrupt_skips_and_counts_images_it_cannot_corrupt(tmp_path, capsys, ray_session):
    """A non-image, a 1x1 image, a truncated PNG and a decompression-bomb-sized PNG among good
    images: the good ones are corrupted, the others counted in corrupt.json, nothing half-written."""
    root = folder(tmp_path / "imgs", n=2)
    (root / "a" / "text.png").write_text("not a png")
    Image.new("L", (1, 1)).save(root / "a" / "dot.png")
    Image.new("1", (10_000, 9_000)).save(root / "b" / "bomb.png")  # 90 M pixels in a few KB
    good = (root / "a" / "a0.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    code = corrupt(tmp_path / "out", "--folder", str(root))
    out = capsys.readouterr().out
    assert code == 0 and "skipped 4 clean image(s)" in out, out
    info = json.loads((tmp_path / "out" / "corrupt.json").read_text())
    assert info["n_clean"] == 4 and info["skipped"]["count"] == 4
    reasons = {Path(p).name: why for p, why in info["skipped"]["images"].items()}
    assert set(reasons) == {"text.png", "dot.png", "bomb.png", "cut.png"}
    assert "under 8 px" in reasons["dot.png"] and ("decompression" in reasons["bomb.png"])
    assert np.load(tmp_path / "out" / "fog.npy").shape == (4, 12, 12)
    assert not leftovers(tmp_path / "out")
