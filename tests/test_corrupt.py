"""`corrupt`: the canonical ImageNet-C corruptions (imagecorruptions-imaug) on Ray, deterministic by
seed, written in the CIFAR-C layout or as image files with a manifest."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.benchmarks.commands import corrupt_main
from pipeline.benchmarks.corrupt import (
    CorruptError,
    corrupt_image,
    generate,
    image_seed,
    source_from_digits,
    source_from_folder,
)
from pipeline.benchmarks.layouts import ALL_CORRUPTIONS, cifar_c_pool
from pipeline.manifest import read_manifest_meta


@pytest.fixture(scope="module")
def digits():
    return source_from_digits(seed=0, n=6)


def test_every_corruption_runs_on_small_grey_and_rgb_images_deterministically(digits):
    grey = digits.array[0]  # 28 x 28: under the package's 32-px minimum
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for name in ALL_CORRUPTIONS:
        for image in (grey, rgb):
            a = corrupt_image(image, name, 5, seed=11)
            assert a.shape == image.shape and a.dtype == np.uint8, name
            assert np.array_equal(a, corrupt_image(image, name, 5, seed=11)), name
            assert not np.array_equal(a, image), name
    # random corruptions depend on the seed, including the two with their own seed argument
    for name in ("gaussian_noise", "glass_blur", "impulse_noise", "frost"):
        assert not np.array_equal(corrupt_image(rgb, name, 3, 1), corrupt_image(rgb, name, 3, 2)), name
    with pytest.raises(CorruptError, match="uint8"):
        corrupt_image(grey.astype(np.float32), "fog", 1, 0)


def test_generate_cifar_layout_is_deterministic_and_independent_of_batching(ray_session, digits, tmp_path):
    names = ["gaussian_noise", "motion_blur", "spatter"]
    manifest = generate(digits, tmp_path / "a", corruptions=names, severities=[1, 5], seed=3, batch_size=4)
    for name in names:
        arr = np.load(tmp_path / "a" / f"{name}.npy")
        assert arr.shape == (2 * len(digits), 28, 28) and arr.dtype == np.uint8
        # block 1 (severity 5) row i is image i corrupted with its own seed
        for i in (0, len(digits) - 1):
            expected = corrupt_image(digits.array[i], name, 5, image_seed(3, name, 5, i))
            assert np.array_equal(arr[len(digits) + i], expected)
    assert np.array_equal(np.load(tmp_path / "a" / "labels.npy"), np.tile(digits.labels, 2))
    # another batching, one worker, a subset of corruptions: the same images
    generate(digits, tmp_path / "b", corruptions=["motion_blur"], severities=[1, 5], seed=3, batch_size=5, num_workers=1)
    assert np.array_equal(np.load(tmp_path / "a" / "motion_blur.npy"), np.load(tmp_path / "b" / "motion_blur.npy"))
    generate(digits, tmp_path / "c", corruptions=["gaussian_noise"], severities=[1, 5], seed=4)
    assert not np.array_equal(np.load(tmp_path / "a" / "gaussian_noise.npy"), np.load(tmp_path / "c" / "gaussian_noise.npy"))
    # the manifest points into the arrays; the cifar-c reader takes the blocks' severities from corrupt.json
    # spatter is one of the 4 held-out validation corruptions: it gets a manifest of its own
    rows = pq.read_table(manifest).to_pylist()
    assert len(rows) == 2 * 2 * len(digits)
    assert {r["domain"] for r in rows} == {f"{n}-{s}" for n in names if n != "spatter" for s in (1, 5)}
    held = pq.read_table(tmp_path / "a" / "manifest_held_out.parquet").to_pylist()
    assert {r["domain"] for r in held} == {"spatter-1", "spatter-5"}
    assert cifar_c_pool(tmp_path / "a", ["spatter"], severities=[5]).column("index").to_pylist() == list(range(6, 12))
    assert read_manifest_meta(manifest)["setting"] == "continual"


def test_generate_files_layout_from_a_class_folder(ray_session, tmp_path):
    clean = tmp_path / "clean"
    rng = np.random.default_rng(0)
    for cls in ("dog", "cat"):
        (clean / cls).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(clean / cls / f"img{j}.png")
    source = source_from_folder(clean)
    manifest = generate(source, tmp_path / "out", corruptions=["fog", "pixelate"], severities=[2], layout="files", seed=1)
    rows = pq.read_table(manifest).to_pylist()
    assert len(rows) == 2 * 4
    assert [r["label"] for r in rows[:4]] == [0, 0, 1, 1]  # cat before dog: sorted class folders
    first = rows[0]
    assert first["path"].endswith("out/fog/2/cat/img0.png")
    expected = corrupt_image(np.asarray(Image.open(clean / "cat" / "img0.png")), "fog", 2, image_seed(1, "fog", 2, 0))
    assert np.array_equal(np.asarray(Image.open(first["path"])), expected)
    assert (tmp_path / "out" / "classes.txt").read_text().split() == ["cat", "dog"]


def test_corrupt_command_refuses_unknown_corruptions(capsys, tmp_path):
    assert corrupt_main(["--digits", "--out", str(tmp_path), "--corruptions", "fog,rain"]) == 2
    assert "unknown corruption(s) ['rain']" in capsys.readouterr().err
