"""Every registered method through the real job on both model families (issue 22): a torchvision
ResNet-18 (BatchNorm) and a timm ViT (LayerNorm, patch 8 at 32 px), random weights saved then loaded
by `model.checkpoint`, on a tiny CIFAR-C-layout stream. The methods come from `ttt.methods.METHODS`,
so a new one is covered without an edit here. Each method either runs (every row predicted, the
parameter set its reference adapts) or is refused at start-up in one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.benchmarks.layouts import build_manifest
from pipeline.config import ConfigError, load_config
from pipeline.job.checks import prepare
from pipeline.job.runner import run_jobs
from ttt.methods import METHODS as REGISTRY
from workers.models import load_model

N_PER = 8
BATCH = 8
CORRUPTIONS = ["gaussian_noise", "fog"]
METHODS = list(REGISTRY)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAMILIES = {
    "resnet18": {"factory": "torchvision.models:resnet18", "factory_kwargs": {"num_classes": 10}, "file": "r18.pt",
                 "preprocess": "explicit", "image_shape": [3, 32, 32], "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225]},
    # the preprocessing from timm's data config of the model (32 px via pretrained_cfg_overlay)
    "vit": {"factory": "timm:create_model", "file": "model.safetensors", "preprocess": "auto",
            "factory_kwargs": {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 4,
                               "num_classes": 10, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}},
}
HOOK = "needs hook(s) ['{}'] that model"
REFUSED = {  # (family, method) -> the one line's gist: where the method is not defined
    ("resnet18", "mim"): HOOK.format("reconstruct"),
    ("vit", "mim"): HOOK.format("reconstruct"),
    ("resnet18", "ttt"): HOOK.format("rotation_logits"),
    ("vit", "ttt"): HOOK.format("rotation_logits"),
    ("vit", "norm"): "no BatchNorm layer",
    ("vit", "rotta"): "no BatchNorm layer to make robust",
    ("vit", "bn_alpha"): "has no BatchNorm layer",
}
# Small versions of the costly knobs (the test's cost, not the references' values): 2 augmented views
# for CoTTA / MEMO instead of 32, a 16-sample RMT warm-up, short queues; flips off as for digits.
# The filter margins of EATA / SAR / DeYO are opened wide (their references' 0.4 - 0.5 x ln C keep
# no sample of a random-weight model, so no step would be taken and the parameter set never shown).
KNOBS = {
    "cotta": {"n_augmentations": 2, "flips": False}, "memo": {"n_augmentations": 2, "flips": False},
    "rotta": {"update_frequency": 4, "memory_size": 8, "flips": False}, "roid": {"flips": False},
    "cmf": {"flips": False}, "lame": {"affinity": "knn", "knn": 2}, "nn": {"k": 2},
    "rmt": {"warmup_samples": 16, "projection_dim": 16, "flips": False},
    "santa": {"projection_dim": 16, "flips": False},
    "adacontrast": {"queue_size": 32, "refine_after": 8, "flips": False},
    "eata": {"fisher_samples": 20, "e_margin": 2.0, "d_margin": 1.0},
    "sar": {"e_margin": 2.0}, "deyo": {"margin": 2.0, "plpd_threshold": -1.0},
}
SOURCE_FIELDS = {"eata": "fisher_data", "rmt": "source_data", "santa": "source_data"}  # -> the source npz
# the parameter set each method adapts (analysis updated_param_count); a method not listed must
# update no more than the whole model
EXPECTED = {
    "none": ("source", "norm", "lame", "t3a", "bn_alpha"),
    "norm": ("tent", "rpl", "eata", "roid", "cmf", "santa", "nn"),  # BN affine on the CNN, LN affine on the ViT
    "norm_below_top": ("sar", "deyo"),  # without layer4 (ResNet) / the final norm (ViT), as their references
    "all": ("cotta", "rmt", "adacontrast", "memo"),
    "all_but_head": ("shot_im",),
}


def reference_filter(method: str) -> str:
    """The update filter of the method's reference config (configs/mnistc_<method>.yaml), else norm_only."""
    path = CONFIGS / f"mnistc_{method}.yaml"
    ttt = yaml.safe_load(path.read_text()).get("ttt", {}) if path.is_file() else {}
    return ttt.get("update_filter", "norm_only")


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("CIFAR-10-C")
    rng = np.random.default_rng(0)
    for c in CORRUPTIONS:
        np.save(root / f"{c}.npy", rng.integers(0, 256, size=(5 * N_PER, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(rng.integers(0, 10, size=N_PER), 5).astype(np.int64))
    manifest, _ = build_manifest("cifar-c", root, root / "manifest.parquet", corruptions=CORRUPTIONS, severities=[5])
    # the clean training split beside the manifest, as the MNIST-C default writes it: grey H x W digits
    # (the RGB models get them converted), every class twice (prototypes need all); EATA's Fisher
    # samples, RMT's / SANTA's source data and the default KB nn builds and retrieves from
    source = root / "train.npz"
    np.savez(source, x=rng.integers(0, 256, size=(20, 32, 32), dtype=np.uint8), y=np.arange(20) % 10)
    return root, manifest, source


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("ckpt")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    paths = {}
    for family, spec in FAMILIES.items():
        model = load_model(spec["factory"], "none", spec["factory_kwargs"])
        if family == "resnet18":
            torch.save(model.state_dict(), out / spec["file"])
        else:
            save_file(model.state_dict(), out / spec["file"])
        paths[family] = out / spec["file"]
    return paths


def _ttt(method: str, source: Path) -> dict:
    block = dict(KNOBS.get(method, {}))
    if method in SOURCE_FIELDS:
        block[SOURCE_FIELDS[method]] = str(source)
    ttt = {"method": method, "batch_size": BATCH, "lr": 1e-3, "steps": 1, "update_filter": reference_filter(method)}
    return {**ttt, method: block} if block else ttt


def _cfg(family, method, stream, checkpoints, tmp_path):
    spec = FAMILIES[family]
    model = {k: v for k, v in spec.items() if k != "file"}
    model.update(kind="image_classifier", checkpoint=str(checkpoints[family]))
    cfg = {"experiment": "real-models", "run_id": f"{family}-{method}",
           "data": {"manifest": str(stream[1]), "cache_dir": str(tmp_path / "cache")},
           "model": model, "ttt": _ttt(method, stream[2]), "output_root": str(tmp_path / "runs"),
           "workers": {"num_shards": 1, "progress_interval_s": 0.5}}
    path = tmp_path / f"{family}-{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def expected_counts(family: str) -> dict[str, int]:
    """Parameter elements per EXPECTED set, counted on a fresh model by module type and name."""
    model = load_model(FAMILIES[family]["factory"], "none", FAMILIES[family]["factory_kwargs"])
    norm_type = torch.nn.BatchNorm2d if family == "resnet18" else torch.nn.LayerNorm
    norms = {n: sum(p.numel() for p in m.parameters(recurse=False))
             for n, m in model.named_modules() if isinstance(m, norm_type)}
    # SAR's / DeYO's exclusions: ResNet layer4; on a 4-block ViT no blocks.9-11, only the final norm
    below_top = (lambda n: not n.startswith("layer4.")) if family == "resnet18" else (lambda n: n != "norm")
    head = model.fc if family == "resnet18" else model.head
    n_all = sum(p.numel() for p in model.parameters())
    counts = {"none": 0, "norm": sum(norms.values()), "all": n_all,
              "norm_below_top": sum(v for n, v in norms.items() if below_top(n)),
              "all_but_head": n_all - sum(p.numel() for p in head.parameters())}
    assert 0 < counts["norm_below_top"] < counts["norm"] < counts["all_but_head"] < counts["all"]
    return counts


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_runs_or_is_refused_in_one_line(family, ray_session, stream, checkpoints, tmp_path):
    torch.set_num_threads(1)
    runnable = []
    for method in METHODS:
        if (family, method) in REFUSED:
            with pytest.raises(ConfigError) as exc:
                prepare(_cfg(family, method, stream, checkpoints, tmp_path), log=lambda _m: None)
            assert REFUSED[(family, method)] in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
        else:
            runnable.append(_cfg(family, method, stream, checkpoints, tmp_path))
    assert {c.ttt.method for c in runnable} | {m for f, m in REFUSED if f == family} == set(METHODS)
    run_dirs = run_jobs(runnable)  # one pool for all of them; each a real run of its own
    n_rows = len(CORRUPTIONS) * N_PER
    counts = expected_counts(family)
    expected = {m: counts[k] for k, ms in EXPECTED.items() for m in ms}
    for cfg, run_dir in zip(runnable, run_dirs):
        method = cfg.ttt.method
        results = pd.read_parquet(run_dir / "results")
        analysis = pd.read_parquet(run_dir / "analysis")
        assert len(results) == n_rows and results["error"].isna().all(), (method, results["error"].dropna()[:2].tolist())
        assert results["prediction"].between(0, 9).all() and len(analysis) == n_rows // BATCH, method
        updated = analysis["updated_param_count"]
        if method in expected:  # every batch changed exactly the parameter set of the reference
            assert (updated == expected[method]).all(), (method, updated.tolist(), expected[method])
        else:
            assert updated.between(0, counts["all"]).all(), (method, updated.tolist())
        run = json.loads((run_dir / "run.json").read_text())
        assert run["status"] == "finished"
        if family == "vit":  # run.json records the preprocessing `auto` took from timm's data config
            m = run["config"]["model"]
            assert (m["resize"], m["center_crop"], m["interpolation"], m["mean"]) == (35, 32, "bicubic", [0.5] * 3)
            assert m["preprocess_from"].startswith("timm data config of vit_tiny_patch16_224")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["workers"] and summary["workers"][0]["peak_rss_mb"] > 0
        assert summary["workers"][0]["peak_gpu_mb"] is None  # no CUDA here


def test_nn_default_kb_it_cannot_convert_is_refused_in_one_line(stream, checkpoints, tmp_path):
    """The default KB's training split goes through the model's conversion rules (grey -> RGB above);
    one that no rule fits (20 x 20 digits, a 32 x 32 model without resize) is a one-line refusal."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.parquet").write_bytes(Path(stream[1]).read_bytes())
    np.savez(other / "train.npz", x=np.zeros((10, 20, 20), dtype=np.uint8), y=np.arange(10))
    cfg = _cfg("resnet18", "nn", stream, checkpoints, tmp_path)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": str(other / "manifest.parquet")})})
    with pytest.raises(ConfigError) as exc:
        prepare(cfg, log=lambda _m: None)
    msg = str(exc.value)
    assert "default KB's training split" in msg and "image is 20x20, the model takes 32x32" in msg and "\n" not in msg
    assert not (tmp_path / "cache" / "kb").exists()  # nothing half-built left behind
