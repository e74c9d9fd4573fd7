"""Zoo and library models through the real job: a tiny WRN (pipeline.benchmarks.zoo) and torchvision's
ResNet-50 (random weights, saved with torch.save(state_dict), loaded by `model.checkpoint`) on a
tiny CIFAR-C-layout directory built here, with per-channel normalisation, resize and centre crop
checked against a forward of torchvision's own transforms."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms
from torchvision.models import resnet50

from pipeline.benchmarks.layouts import build_manifest
from pipeline.benchmarks.zoo import wide_resnet
from pipeline.config import load_config
from pipeline.job.runner import run_job

CORRUPTIONS = ["gaussian_noise", "fog"]
N_PER = 4  # images per severity block (10,000 in CIFAR-10-C)
SEVERITIES = (3, 5)
NUM_CLASSES = 10
# far from the default scalar 0.1307 / 0.3081 and from each other, so a wrong normalisation shows
MEAN = [0.9, 0.1, 0.5]
STD = [0.1, 0.5, 0.25]

MODELS = {
    # RobustBench's WRN at depth 10, width 1: the same blocks and names as WRN-28-10, 78k parameters
    "wrn": {"factory": "pipeline.benchmarks.zoo:wide_resnet", "factory_kwargs": {"depth": 10, "widen_factor": 1, "num_classes": NUM_CLASSES},
            "build": lambda: wide_resnet(depth=10, widen_factor=1, num_classes=NUM_CLASSES), "resize": None, "center_crop": None,
            "fc_scale": 4.0},
    # the full ResNet-50 (torchvision's names), fed 32 px crops of 40 px resizes to stay cheap
    "resnet50": {"factory": "torchvision.models:resnet50", "factory_kwargs": {"num_classes": NUM_CLASSES},
                 "build": lambda: resnet50(num_classes=NUM_CLASSES), "resize": 40, "center_crop": 32,
                 "fc_scale": 0.05},
}


@pytest.fixture(scope="module")
def cifar_c_dir(tmp_path_factory):
    """<root>/<corruption>.npy (5 stacked severity blocks of N_PER random 32x32x3 uint8 images) and
    <root>/labels.npy, as CIFAR-10-C ships them."""
    root = tmp_path_factory.mktemp("CIFAR-10-C")
    rng = np.random.default_rng(0)
    for c in CORRUPTIONS:
        np.save(root / f"{c}.npy", rng.integers(0, 256, size=(5 * N_PER, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(rng.integers(0, NUM_CLASSES, size=N_PER), 5).astype(np.int64))
    manifest, _ = build_manifest("cifar-c", root, root / "manifest.parquet", setting="continual",
                                 corruptions=CORRUPTIONS, severities=SEVERITIES)
    return root, manifest


def _saved_model(name: str, path) -> torch.nn.Module:
    """Random weights and random BatchNorm statistics (so eval-mode BN is not an identity), saved."""
    torch.manual_seed(0)
    model = MODELS[name]["build"]()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    with torch.no_grad():  # logits of a few units, so softmax is neither saturated nor flat
        model.fc.weight.mul_(MODELS[name]["fc_scale"])
    torch.save(model.state_dict(), path)
    return model.eval()


def _config(name: str, manifest, checkpoint, tmp_path, method: str):
    spec = MODELS[name]
    cfg = {
        "experiment": "zoo-job",
        "data": {"manifest": str(manifest)},
        "model": {"kind": "image_classifier", "factory": spec["factory"], "factory_kwargs": spec["factory_kwargs"],
                  "checkpoint": str(checkpoint), "image_shape": [3, 32, 32], "mean": MEAN, "std": STD,
                  "resize": spec["resize"], "center_crop": spec["center_crop"], "color_mode": "strict"},
        "ttt": {"method": method, "batch_size": 4, "lr": 1e-3, "optimizer": "adam", "steps": 1,
                "update_filter": "norm_only"},
        "workers": {"num_shards": 1, "progress_interval_s": 0.5},
        "output_root": str(tmp_path / "runs"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _by_hand(image_hwc: np.ndarray, resize: int | None, crop: int | None, mean, std) -> torch.Tensor:
    """torchvision's Resize(int) -> CenterCrop -> ToTensor -> Normalize on the PIL image."""
    steps = ([transforms.Resize(resize)] if resize is not None else []) + \
        ([transforms.CenterCrop(crop)] if crop is not None else [])
    t = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
    return t(Image.fromarray(image_hwc)).unsqueeze(0)


def _confidence_entropy(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float, int]:
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    return float(probs.max()), float(-(probs * probs.clamp_min(1e-12).log()).sum()), int(probs.argmax())


@pytest.mark.parametrize("name", ["wrn", "resnet50"])
def test_zoo_model_runs_through_the_job_with_per_channel_normalisation(ray_session, cifar_c_dir, tmp_path, name):
    torch.set_num_threads(1)
    root, manifest = cifar_c_dir
    model = _saved_model(name, tmp_path / f"{name}.pt")
    run_dir = run_job(_config(name, manifest, tmp_path / f"{name}.pt", tmp_path, "source"))

    results = pd.read_parquet(run_dir / "results")
    assert len(results) == len(CORRUPTIONS) * len(SEVERITIES) * N_PER
    assert results["error"].isna().all(), results["error"].dropna().tolist()[:3]
    assert sorted(results["domain"].unique()) == sorted(f"{c}-{s}" for c in CORRUPTIONS for s in SEVERITIES)
    labels = np.load(root / "labels.npy")
    assert (results["label"].to_numpy() == labels[results["sample_id"].str.rsplit("-", n=1).str[1].astype(int)]).all()

    # every row's confidence, entropy and prediction equal the hand-computed forward
    spec = MODELS[name]
    for _, row in results.iterrows():
        corruption, severity, i = row["sample_id"].rsplit("-", 2)
        image = np.load(root / f"{corruption}.npy")[(int(severity) - 1) * N_PER + int(i)]
        conf, ent, pred = _confidence_entropy(model, _by_hand(image, spec["resize"], spec["center_crop"], MEAN, STD))
        assert row["confidence"] == pytest.approx(conf, rel=1e-4, abs=1e-6)
        assert row["entropy"] == pytest.approx(ent, rel=1e-4, abs=1e-6)
        assert row["prediction"] == pred
    # ... and would not with the default scalar normalisation (the check can tell them apart)
    row = results.iloc[0]
    corruption, severity, i = row["sample_id"].rsplit("-", 2)
    image = np.load(root / f"{corruption}.npy")[(int(severity) - 1) * N_PER + int(i)]
    wrong, _, _ = _confidence_entropy(model, _by_hand(image, spec["resize"], spec["center_crop"], [0.1307] * 3, [0.3081] * 3))
    assert abs(row["confidence"] - wrong) > 1e-3

    run = json.loads((run_dir / "run.json").read_text())
    assert run["manifest_meta"]["setting"] == "continual"


def test_zoo_wrn_adapts_with_tent_through_the_job(ray_session, cifar_c_dir, tmp_path):
    """Tent on the WRN's BatchNorm affine parameters: every row predicted, each batch updated."""
    torch.set_num_threads(1)
    _, manifest = cifar_c_dir
    _saved_model("wrn", tmp_path / "wrn.pt")
    run_dir = run_job(_config("wrn", manifest, tmp_path / "wrn.pt", tmp_path, "tent"))
    results = pd.read_parquet(run_dir / "results")
    analysis = pd.read_parquet(run_dir / "analysis")
    assert len(results) == len(CORRUPTIONS) * len(SEVERITIES) * N_PER and results["error"].isna().all()
    n_bn_affine = sum(2 * m.num_features for m in wide_resnet(depth=10, widen_factor=1).modules()
                      if isinstance(m, torch.nn.BatchNorm2d))
    assert (analysis["updated_param_count"] == n_bn_affine).all()
    assert len(analysis) == len(results) // 4
