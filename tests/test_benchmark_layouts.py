"""Manifests from tiny directories in the exact CIFAR-C and ImageNet-C layouts (built here)."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.benchmarks.commands import manifest_main
from pipeline.benchmarks.layouts import (
    LayoutError,
    build_manifest,
    cifar_c_pool,
    folder_pool,
    imagenet_c_pool,
)
from pipeline.manifest import read_manifest_meta


def image_folder_samples(directory):
    """(path, class index) in the order torchvision's ImageFolder lists them: class folders sorted,
    index = rank in that order, files sorted within each class (written out by hand: torchvision's
    PyPI wheel cannot load beside the CPU build of torch pinned here)."""
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    return [(str(f), i) for i, c in enumerate(classes) for f in sorted((directory / c).iterdir())]

CIFAR_CORRUPTIONS = ["gaussian_noise", "fog", "jpeg_compression"]
N_PER = 6  # images per severity block (10,000 in CIFAR-10-C)
WNIDS = ["n02085620", "n01440764", "n10148035"]  # created unsorted: the class index must be sorted order


@pytest.fixture(scope="module")
def cifar_c(tmp_path_factory):
    """<root>/<corruption>.npy: 5 severity blocks of N_PER 8x8x3 images, pixel (0,0) = (corruption,
    severity, i) so a row's index can be checked; <root>/labels.npy tiled per block."""
    root = tmp_path_factory.mktemp("CIFAR-10-C")
    labels = np.asarray([3, 1, 4, 1, 5, 9], dtype=np.int64)
    for c_i, c in enumerate(CIFAR_CORRUPTIONS):
        arr = np.zeros((5 * N_PER, 8, 8, 3), np.uint8)
        for s in range(1, 6):
            for i in range(N_PER):
                arr[(s - 1) * N_PER + i, 0, 0] = (c_i, s, i)
        np.save(root / f"{c}.npy", arr)
    np.save(root / "labels.npy", np.tile(labels, 5))
    return root, labels


@pytest.fixture(scope="module")
def imagenet_c(tmp_path_factory):
    """<root>/<corruption>/<severity>/<wnid>/*.JPEG, 3 images per class, 2 corruptions x 2 severities."""
    root = tmp_path_factory.mktemp("ImageNet-C")
    for c in ("fog", "snow"):
        for s in (3, 5):
            for w_i, wnid in enumerate(WNIDS):
                folder = root / c / str(s) / wnid
                folder.mkdir(parents=True)
                for j in range(3):
                    Image.new("RGB", (4, 4), (w_i, j, s)).save(folder / f"ILSVRC2012_val_{w_i * 10 + j:08d}.JPEG")
    return root


def test_cifar_c_rows_point_into_the_arrays(cifar_c):
    root, labels = cifar_c
    pool = cifar_c_pool(root, CIFAR_CORRUPTIONS, severities=[2, 5])
    assert pool.num_rows == len(CIFAR_CORRUPTIONS) * 2 * N_PER
    rows = pool.to_pylist()
    counts = {}
    for r in rows:
        counts[r["domain"]] = counts.get(r["domain"], 0) + 1
        arr = np.load(r["path"], mmap_mode="r")
        c_i, s, i = arr[r["index"], 0, 0]
        assert (CIFAR_CORRUPTIONS[c_i], int(s)) == (r["corruption"], r["severity"])
        assert r["label"] == labels[i] and r["sample_id"] == f"{r['corruption']}-{s}-{i:05d}"
    assert counts == {f"{c}-{s}": N_PER for c in CIFAR_CORRUPTIONS for s in (2, 5)}
    assert "pixels" not in pool.column_names  # no pixels copied into Parquet


def test_cifar_c_subsets(cifar_c):
    root, _ = cifar_c
    first = cifar_c_pool(root, ["fog"], per_domain=4, subset="first")
    assert [r % N_PER for r in first.column("index").to_pylist()] == [0, 1, 2, 3]
    seeded = cifar_c_pool(root, CIFAR_CORRUPTIONS, per_domain=4, subset="seeded", seed=7)
    again = cifar_c_pool(root, CIFAR_CORRUPTIONS, per_domain=4, subset="seeded", seed=7)
    assert seeded.equals(again)
    picked = [[i % N_PER for i in seeded.column("index").to_pylist()[k * 4:(k + 1) * 4]] for k in range(3)]
    assert picked[0] == picked[1] == picked[2]  # the same images in every domain
    assert picked[0] != [0, 1, 2, 3]
    other = cifar_c_pool(root, ["fog"], per_domain=4, subset="seeded", seed=8)
    assert [i % N_PER for i in other.column("index").to_pylist()] != picked[0]


def test_cifar_c_bad_input_names_the_problem(cifar_c, tmp_path):
    root, _ = cifar_c
    with pytest.raises(LayoutError, match="missing file .*snow.npy"):
        cifar_c_pool(root, ["snow"])
    with pytest.raises(LayoutError, match="asked for 7 samples per domain, the data hold 6"):
        cifar_c_pool(root, ["fog"], per_domain=7)
    with pytest.raises(LayoutError, match="severities must be"):
        cifar_c_pool(root, ["fog"], severities=[6])
    np.save(tmp_path / "labels.npy", np.zeros(10, np.int64))
    np.save(tmp_path / "fog.npy", np.zeros((12, 8, 8, 3), np.uint8))
    with pytest.raises(LayoutError, match="labels.npy has 10"):
        cifar_c_pool(tmp_path, ["fog"])


IMAGENET_INDEX = {"n01440764": 0, "n02085620": 151, "n10148035": 982}  # their places among the 1,000 wnids


def test_imagenet_c_class_index_is_the_models_imagenet_index(imagenet_c):
    """wnid folders are labelled with the model's ImageNet-1k index, not their rank among the folders found."""
    pool = imagenet_c_pool(imagenet_c, ["fog"], severities=[3])
    assert {(r["path"].split("/")[-2], r["label"]) for r in pool.to_pylist()} == set(IMAGENET_INDEX.items())
    assert pool.equals(imagenet_c_pool(imagenet_c, ["fog"], severities=[3], classes="imagenet"))
    folder = folder_pool(imagenet_c / "fog" / "3")
    assert {(r["path"].split("/")[-2], r["label"]) for r in folder.to_pylist()} == set(IMAGENET_INDEX.items())
    with pytest.raises(LayoutError, match="not an ImageNet-1k wnid"):
        folder_pool(imagenet_c / "fog", classes="imagenet")  # folders 3 and 5


def test_imagenet_c_class_index_is_imagefolders(imagenet_c):
    pool = imagenet_c_pool(imagenet_c, ["fog", "snow"], severities=[3, 5], classes="found")
    assert pool.num_rows == 2 * 2 * len(WNIDS) * 3
    for c in ("fog", "snow"):
        for s in (3, 5):
            reference = image_folder_samples(imagenet_c / c / str(s))
            assert [y for p, y in reference if WNIDS[0] in p] == [1, 1, 1]  # n02... is second in sorted order
            mine = [(r["path"], r["label"]) for r in pool.to_pylist() if r["domain"] == f"{c}-{s}"]
            assert mine == reference


def test_imagenet_c_seeded_subset_and_subset_file(imagenet_c, tmp_path):
    seeded = imagenet_c_pool(imagenet_c, ["fog", "snow"], per_domain=5, subset="seeded", seed=0)
    assert seeded.equals(imagenet_c_pool(imagenet_c, ["fog", "snow"], per_domain=5, subset="seeded", seed=0))
    keys = [sid.split("/", 1)[1] for sid in seeded.column("sample_id").to_pylist()]
    assert keys[:5] == keys[5:] and len(set(keys[:5])) == 5  # same images in each domain
    listed = ["n10148035/ILSVRC2012_val_00000021.JPEG", "n01440764/ILSVRC2012_val_00000010.JPEG"]
    from_file = imagenet_c_pool(imagenet_c, ["snow"], subset="file", subset_keys=listed)
    assert [sid.split("/", 1)[1] for sid in from_file.column("sample_id").to_pylist()] == listed
    assert from_file.column("label").to_pylist() == [982, 0]
    with pytest.raises(LayoutError, match="not in the data"):
        imagenet_c_pool(imagenet_c, ["snow"], subset="file", subset_keys=["n0/none.JPEG"])


def test_folder_layout_is_one_domain(imagenet_c):
    pool = folder_pool(imagenet_c / "fog" / "3", domain="clean", classes="found", order="class-sorted")
    assert set(pool.column("domain").to_pylist()) == {"clean"}
    assert pool.column("label").to_pylist() == [y for _, y in image_folder_samples(imagenet_c / "fog" / "3")]
    shuffled = folder_pool(imagenet_c / "fog" / "3", domain="clean")  # the default: a seeded shuffle
    assert sorted(shuffled.column("sample_id").to_pylist()) == sorted(pool.column("sample_id").to_pylist())
    assert shuffled.column("label").to_pylist() != pool.column("label").to_pylist()


def test_manifest_command_writes_the_setting(cifar_c, tmp_path, capsys):
    root, _ = cifar_c
    out = tmp_path / "m.parquet"
    assert manifest_main(["cifar-c", str(root), "--out", str(out), "--corruptions", "fog,gaussian_noise",
                          "--severities", "1,2,3,4,5", "--setting", "gradual", "--per-domain", "3"]) == 0
    assert "ttt.reset_on_domain_change=false" in capsys.readouterr().out
    meta = read_manifest_meta(out)
    assert meta["setting"] == "gradual" and meta["source"]["layout"] == "cifar-c"
    assert pq.read_table(out).num_rows == meta["rows"] == 3 * (5 + 9)
    assert manifest_main(["cifar-c", str(root), "--out", str(out), "--corruptions", "smoke"]) == 2
    assert "missing file" in capsys.readouterr().err
    _, meta = build_manifest("cifar-c", root, tmp_path / "r.parquet", setting="reset_each_shift", corruptions=["fog"])
    assert meta["reset_on_domain_change"] is True


@pytest.mark.parametrize("config, n_params, n_keys, shape", [
    ("configs/cifar10c_wrn28_tent.yaml", 36_479_194, 155, [3, 32, 32]),     # WRN-28-10 as RobustBench's Standard
    ("configs/imagenetc_resnet50_tent.yaml", 25_557_032, 320, [3, 224, 224]),  # torchvision's resnet50
    ("configs/imagenetc_vit_sar.yaml", 86_567_656, 152, [3, 224, 224]),     # timm's vit_base_patch16_224
])
def test_model_configs_build_their_model_and_load_a_saved_state_dict(config, n_params, n_keys, shape, tmp_path):
    import torch

    from pipeline.config import load_config
    from pipeline.job.checks import resolve_preprocess
    from workers.models import load_model

    torch.set_num_threads(1)
    model_cfg = load_config(config).model
    torch.manual_seed(0)
    model = load_model(model_cfg.factory, None, model_cfg.factory_kwargs)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(model.state_dict()) == n_keys
    resolved = resolve_preprocess(model_cfg, model)  # `preprocess: auto`, from the model itself
    assert resolved.image_shape == shape and resolved.preprocess_from
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)
    fresh = load_model(model_cfg.factory, str(tmp_path / "w.pt"), model_cfg.factory_kwargs)
    x = torch.rand(1, *shape)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh(x))
    assert model(x).shape == (1, model_cfg.factory_kwargs.get("num_classes", 10))
