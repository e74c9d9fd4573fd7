"""Every method through the real job on both model families (issue 22): a torchvision ResNet-18
(BatchNorm) and a timm ViT (LayerNorm, patch 8 at 32 px), random weights saved then loaded by
`model.checkpoint`, on a tiny CIFAR-C-layout stream. Each method either runs (every row predicted,
the parameter set its reference adapts) or is refused at start-up in one line."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml

from kb_index import IndexSpec, build_kb
from kb_index.embedders import ImagePreprocess, TorchFeatureEmbedder
from pipeline.benchmarks.layouts import build_manifest
from pipeline.config import ConfigError, load_config
from pipeline.job.checks import prepare
from pipeline.job.runner import run_jobs
from ttt.images import ImageSpec
from workers.models import load_model
from workers.ttt_worker import embedder_name

N_PER = 8
CORRUPTIONS = ["gaussian_noise", "fog"]
METHODS = ["source", "norm", "tent", "mim", "cotta", "nn", "eata", "sar", "rotta", "lame", "deyo", "roid"]
FAMILIES = {
    "resnet18": {"factory": "torchvision.models:resnet18", "factory_kwargs": {"num_classes": 10}, "file": "r18.pt",
                 "preprocess": "explicit", "image_shape": [3, 32, 32], "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225]},
    # the preprocessing from timm's data config of the model (32 px via pretrained_cfg_overlay)
    "vit": {"factory": "timm:create_model", "file": "model.safetensors", "preprocess": "auto",
            "factory_kwargs": {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 4,
                               "num_classes": 10, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}},
}
REFUSED = {  # (family, method) -> the one line's gist
    ("resnet18", "mim"): "needs hook(s) ['reconstruct']",
    ("vit", "mim"): "needs hook(s) ['reconstruct']",
    ("vit", "norm"): "no BatchNorm layer",
    ("vit", "rotta"): "no BatchNorm layer to make robust",
}
TTT = {"batch_size": 8, "lr": 1e-3, "steps": 1, "update_filter": "norm_only",
       "cotta": {"n_augmentations": 2, "flips": False}, "rotta": {"update_frequency": 4, "memory_size": 8, "flips": False},
       "roid": {"flips": False}, "lame": {"affinity": "knn", "knn": 2}, "nn": {"k": 2}}


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("CIFAR-10-C")
    rng = np.random.default_rng(0)
    for c in CORRUPTIONS:
        np.save(root / f"{c}.npy", rng.integers(0, 256, size=(5 * N_PER, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(rng.integers(0, 10, size=N_PER), 5).astype(np.int64))
    manifest, _ = build_manifest("cifar-c", root, root / "manifest.parquet", corruptions=CORRUPTIONS, severities=[5])
    return root, manifest


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


def _cfg(family, method, stream, checkpoints, tmp_path, kb=None):
    spec = FAMILIES[family]
    model = {k: v for k, v in spec.items() if k != "file"}
    model.update(kind="image_classifier", checkpoint=str(checkpoints[family]))
    cfg = {"experiment": "real-models", "run_id": f"{family}-{method}", "data": {"manifest": str(stream[1])},
           "model": model, "ttt": {"method": method, **TTT}, "output_root": str(tmp_path / "runs"),
           "workers": {"num_shards": 1, "progress_interval_s": 0.5}}
    if kb is not None:
        cfg["kb"] = {"dir": str(kb)}
    path = tmp_path / f"{family}-{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _kb(family, stream, checkpoints, tmp_path):
    """A labelled KB of 16 clean-ish images embedded by the model's own features (what nn retrieves)."""
    cfg = prepare(_cfg(family, "source", stream, checkpoints, tmp_path), log=lambda _m: None)
    model_spec = cfg.model.model_dump()
    model = load_model(cfg.model.factory, cfg.model.checkpoint, cfg.model.factory_kwargs)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(16, 3, 32, 32)).astype(np.float32)
    corpus = pa.table({"id": list(range(16)), "label": [int(i % 10) for i in range(16)],
                       "pixels": [img.reshape(-1).tolist() for img in images]})
    embedder = TorchFeatureEmbedder(model, embedder_name(model_spec),
                                    ImagePreprocess(spec=ImageSpec.from_model_config(model_spec)))
    out = tmp_path / f"kb-{family}"
    build_kb(corpus, out, embedder, IndexSpec(type="flat"))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_runs_or_is_refused_in_one_line(family, ray_session, stream, checkpoints, tmp_path):
    torch.set_num_threads(1)
    runnable = []
    for method in METHODS:
        if (family, method) in REFUSED:
            with pytest.raises(ConfigError) as exc:
                prepare(_cfg(family, method, stream, checkpoints, tmp_path), log=lambda _m: None)
            assert REFUSED[(family, method)] in str(exc.value) and "\n" not in str(exc.value)
        else:
            kb = _kb(family, stream, checkpoints, tmp_path) if method == "nn" else None
            runnable.append(_cfg(family, method, stream, checkpoints, tmp_path, kb))
    run_dirs = run_jobs(runnable)  # one pool for all of them; each a real run of its own
    n_rows = len(CORRUPTIONS) * N_PER
    model = load_model(FAMILIES[family]["factory"], "none", FAMILIES[family]["factory_kwargs"])
    norm_type = torch.nn.BatchNorm2d if family == "resnet18" else torch.nn.LayerNorm
    n_norm = sum(p.numel() for m in model.modules() if isinstance(m, norm_type) for p in m.parameters(recurse=False))
    assert n_norm > 0
    for cfg, run_dir in zip(runnable, run_dirs):
        method = cfg.ttt.method
        results = pd.read_parquet(run_dir / "results")
        analysis = pd.read_parquet(run_dir / "analysis")
        assert len(results) == n_rows and results["error"].isna().all(), (method, results["error"].dropna()[:2].tolist())
        assert results["prediction"].between(0, 9).all() and len(analysis) == n_rows // 8, method
        if method == "tent":  # BN affine on the CNN, LayerNorm affine on the ViT
            assert (analysis["updated_param_count"] == n_norm).all()
        if method in ("source", "norm", "lame"):
            assert (analysis["updated_param_count"] == 0).all()
        run = json.loads((run_dir / "run.json").read_text())
        assert run["status"] == "finished"
        if family == "vit":  # run.json records the preprocessing `auto` took from timm's data config
            m = run["config"]["model"]
            assert (m["resize"], m["center_crop"], m["interpolation"], m["mean"]) == (35, 32, "bicubic", [0.5] * 3)
            assert m["preprocess_from"].startswith("timm data config of vit_tiny_patch16_224")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["workers"] and summary["workers"][0]["peak_rss_mb"] > 0
        assert summary["workers"][0]["peak_gpu_mb"] is None  # no CUDA here
