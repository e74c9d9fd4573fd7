"""The field's real models (issue 22): torchvision and timm by name with local checkpoints,
RobustBench's checkpoint layout, preprocessing taken from the model and equal to the libraries'
own transforms, the parameters each method adapts per architecture, class subsets, SAR's momentum
across a recovery, LAME's exact distances. All offline, random weights, small models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, ModelConfig
from pipeline.job.checks import resolve_preprocess
from ttt import TTTConfig, build_method
from ttt.classes import SubsetLogits, class_subset_indices, imagenet_wnids
from ttt.images import ImageSpec, read_row
from ttt.methods.lame import affinity_matrix
from workers.adapters import ImageClassifierAdapter, ImageRowReader
from workers.models import ModelLoadError, load_model

TINY_VIT = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 4, "num_classes": 10,
            "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


# -- factories and checkpoints --------------------------------------------------------------
def test_torchvision_by_name_loads_a_state_dict(tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(load_model("torchvision.models:resnet18", "none", {"num_classes": 10}))
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    torch.manual_seed(1)
    loaded = load_model("torchvision.models:resnet18", str(tmp_path / "r18.pt"), {"num_classes": 10})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(ModelLoadError, match="does not fit torchvision.models:resnet18"):
        load_model("torchvision.models:resnet18", str(tmp_path / "r18.pt"), {"num_classes": 5})


def test_timm_by_name_loads_safetensors_and_a_training_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = load_model("timm:create_model", "none", TINY_VIT)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pth")
    x = torch.rand(2, 3, 32, 32)
    for ckpt in ("model.safetensors", "ckpt.pth"):
        torch.manual_seed(1)
        loaded = load_model("timm:create_model", str(tmp_path / ckpt), TINY_VIT)
        with torch.no_grad():
            assert torch.equal(model(x), loaded(x)), ckpt
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_model("timm:create_model", str(tmp_path / "bad.safetensors"), TINY_VIT)


@pytest.mark.parametrize("name, dataset, n_params", [
    ("Standard", "cifar10", 36_479_194),                      # WRN-28-10
    ("Hendrycks2020AugMix_ResNeXt", "cifar100", 6_900_132),   # ResNeXt-29 32x4d
])
def test_a_robustbench_checkpoint_in_its_own_layout_loads(name, dataset, n_params, tmp_path):
    """`<model_dir>/<dataset>/<threat_model>/<name>.pt` holding {"state_dict": {"module.<name>": ...}},
    as RobustBench's download is (its load_model strips `module.`), without the robustbench package."""
    from pipeline.benchmarks.zoo import robustbench, robustbench_checkpoint

    kwargs = {"name": name, "dataset": dataset, "threat_model": "corruptions"}
    torch.manual_seed(0)
    model = _randomise_bn(robustbench(**kwargs))
    assert sum(p.numel() for p in model.parameters()) == n_params
    path = tmp_path / "models" / dataset / "corruptions" / f"{name}.pt"
    assert str(path) == robustbench_checkpoint(str(tmp_path / "models"), name, dataset, "corruptions")
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = load_model("pipeline.benchmarks.zoo:robustbench", str(path), kwargs)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.preprocess_cfg["mean"] == 0.0 and loaded.preprocess_cfg["std"] == 1.0


def test_the_zoo_resnet50_is_torchvisions():
    from torchvision.models import resnet50

    from pipeline.benchmarks.zoo import resnet50 as zoo_resnet50

    assert list(zoo_resnet50(num_classes=7).state_dict()) == list(resnet50(num_classes=7).state_dict())


# -- preprocessing from the model, equal to the libraries' transforms ------------------------
@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real image files of odd sizes and modes, written by Pillow."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = []
    for i, (mode, size, ext) in enumerate([("RGB", (301, 257), "png"), ("L", (233, 345), "png"),
                                           ("RGB", (500, 231), "jpg"), ("RGBA", (260, 260), "png"),
                                           ("P", (255, 303), "png")]):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(mode) if mode != "P" else Image.fromarray(arr).quantize(64)
        path = root / f"img{i}_{mode}.{ext}"
        img.save(path)
        files.append(path)
    return files


def _ours(path, model_cfg: ModelConfig) -> torch.Tensor:
    spec = ImageSpec.from_model_config(model_cfg.model_dump())
    x = torch.from_numpy(read_row({"path": str(path)}, spec))[None]
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std  # ttt.images.normalise, written out


def test_auto_preprocessing_equals_torchvisions_weights_transforms(image_files):
    from torchvision.models import ResNet50_Weights

    cfg = ModelConfig(factory="torchvision.models:resnet50", checkpoint="none", preprocess="auto",
                      weights_enum="ResNet50_Weights.IMAGENET1K_V2")
    resolved = resolve_preprocess(cfg, load_model(cfg.factory, None, {}))
    assert (resolved.image_shape, resolved.resize, resolved.center_crop, resolved.interpolation) == \
        ([3, 224, 224], 232, 224, "bilinear")
    assert "ResNet50_Weights.IMAGENET1K_V2" in resolved.preprocess_from
    reference = ResNet50_Weights.IMAGENET1K_V2.transforms()
    for path in image_files:  # the loader of torchvision's ImageFolder: PIL, converted to RGB
        want = reference(Image.open(path).convert("RGB")).unsqueeze(0)
        assert torch.equal(_ours(path, resolved), want), path.name  # exact: same Pillow resize, same float ops


def test_auto_preprocessing_equals_timms_eval_transform(image_files):
    from timm.data import create_transform, resolve_data_config

    model = load_model("timm:create_model", None, {"model_name": "vit_base_patch16_224"})
    cfg = ModelConfig(factory="timm:create_model", checkpoint="none", preprocess="auto",
                      factory_kwargs={"model_name": "vit_base_patch16_224"})
    resolved = resolve_preprocess(cfg, model)
    assert (resolved.image_shape, resolved.resize, resolved.center_crop, resolved.interpolation) == \
        ([3, 224, 224], 248, 224, "bicubic")
    reference = create_transform(**resolve_data_config({}, model=model), is_training=False)
    for path in image_files:
        want = reference(Image.open(path).convert("RGB")).unsqueeze(0)
        assert torch.equal(_ours(path, resolved), want), path.name


def test_explicit_fields_override_auto_and_robustbench_is_identity():
    model = load_model("pipeline.benchmarks.zoo:robustbench", None, {})
    cfg = ModelConfig.model_validate({"factory": "pipeline.benchmarks.zoo:robustbench", "checkpoint": "none",
                                      "preprocess": "auto", "resize": 40, "center_crop": 32})
    resolved = resolve_preprocess(cfg, model)
    assert (resolved.image_shape, resolved.mean, resolved.std, resolved.resize, resolved.center_crop) == \
        ([3, 32, 32], 0.0, 1.0, 40, 32)
    assert "set in the config: center_crop, resize" in resolved.preprocess_from
    tv = ModelConfig(factory="torchvision.models:resnet18", checkpoint="none", preprocess="auto")
    with pytest.raises(ModelLoadError, match="model.weights_enum"):
        resolve_preprocess(tv, load_model(tv.factory, None, {}))


# -- which parameters each method adapts, per architecture -----------------------------------
def _method_param_names(model: torch.nn.Module, method: str, shape) -> list[str]:
    adapter = ImageClassifierAdapter(model, spec=ImageSpec(shape=shape, mean=(0.5,), std=(0.5,)))
    m = build_method(adapter, TTTConfig(method=method, update_filter="norm_only", optimizer="sgd"))
    return m.param_names


def test_parameter_sets_follow_the_references_on_resnet50_and_vit_b16():
    from torchvision.models import resnet50

    # construction only: the adapter's class-counting forward is all that runs
    r50 = resnet50()
    bn = [f"{n}.{p}" for n, m in r50.named_modules() if isinstance(m, torch.nn.BatchNorm2d) for p in ("weight", "bias")]
    assert _method_param_names(r50, "tent", (3, 32, 32)) == bn
    sar = _method_param_names(resnet50(), "sar", (3, 32, 32))
    assert sar == [n for n in bn if not n.startswith("layer4.")] and len(sar) == len(bn) - 2 * 10
    assert _method_param_names(resnet50(), "deyo", (3, 32, 32)) == sar

    vit = load_model("timm:create_model", None, {"model_name": "vit_base_patch16_224"})
    ln = [f"{n}.{p}" for n, m in vit.named_modules() if isinstance(m, torch.nn.LayerNorm) for p in ("weight", "bias")]
    assert len(ln) == 2 * (2 * 12 + 1)  # norm1, norm2 per block, the final norm
    assert _method_param_names(vit, "tent", (3, 8, 8)) == ln
    kept = [n for n in ln if n.startswith("blocks.") and int(n.split(".")[1]) <= 8]
    assert _method_param_names(vit, "sar", (3, 8, 8)) == kept and len(kept) == 2 * 2 * 9
    assert _method_param_names(vit, "deyo", (3, 8, 8)) == kept


def test_batchnorm_methods_are_refused_on_a_vit():
    vit = load_model("timm:create_model", None, TINY_VIT)
    for method, why in (("norm", "no BatchNorm layer"), ("rotta", "no BatchNorm layer to make robust")):
        adapter = ImageClassifierAdapter(vit, spec=ImageSpec(shape=(3, 32, 32), mean=(0.5,), std=(0.5,)))
        with pytest.raises(ValueError, match=why):
            build_method(adapter, TTTConfig(method=method))


# -- faithful details ------------------------------------------------------------------------
def test_sar_keeps_the_base_optimisers_momentum_across_a_recovery():
    torch.manual_seed(0)
    model = _randomise_bn(load_model("torchvision.models:resnet18", "none", {"num_classes": 10}))
    adapter = ImageClassifierAdapter(model, spec=ImageSpec(shape=(3, 32, 32), mean=(0.5,), std=(0.5,)))
    cfg = TTTConfig(method="sar", optimizer="sgd", lr=0.01, momentum=0.9,
                    sar={"e_margin": 10.0, "reset_constant": 100.0})  # every sample reliable, recovery every step
    sar = build_method(adapter, cfg)
    x = torch.rand(4, 3, 32, 32)
    result = sar.step(x)
    assert result.record["recovered"] and result.record["stop_reason"] == "model_recovery"
    source = sar.source_params()
    assert all(torch.equal(p, s) for p, s in zip(sar.params, source))  # back to the source weights
    buffers = [sar.optimizer.state[p]["momentum_buffer"] for p in sar.params if "momentum_buffer" in sar.optimizer.state[p]]
    assert buffers and any(float(b.abs().sum()) > 0 for b in buffers)  # ... with the momentum kept
    sar.reset()  # any other reset (a shard's start, episodic) starts the optimiser afresh
    assert not sar.optimizer.state


def test_lame_distances_are_exact():
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(300, 512), dim=1)
    f = torch.cat([f, f[:1] + 1e-4])  # a near-duplicate of sample 0: its true nearest neighbour
    kernel = affinity_matrix(f, "knn", 1)
    assert kernel[0].nonzero().flatten().tolist() == [300] and kernel[300].nonzero().flatten().tolist() == [0]
    dist = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(dist.diagonal().abs().max()) == 0.0


# -- class subsets (ImageNet-R / -A) ---------------------------------------------------------
def test_imagenet_r_and_a_subsets_are_timms_lists():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    r, a = class_subset_indices("imagenet_r"), class_subset_indices("imagenet_a")
    assert len(r) == len(a) == 200 and list(r) == sorted(r) and r != a


def test_class_subset_masks_logits_predictions_and_labels(tmp_path):
    indices = (3, 7, 1)
    (tmp_path / "subset.txt").write_text("".join(f"{imagenet_wnids()[i]}\n" for i in indices))
    assert class_subset_indices(str(tmp_path / "subset.txt")) == indices
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    spec = ImageSpec.from_model_config({"image_shape": [3, 2, 2], "mean": 0.5, "std": 0.5,
                                        "class_subset": str(tmp_path / "subset.txt")})
    adapter = ImageClassifierAdapter(model, spec=spec)
    assert isinstance(adapter.get_model(), SubsetLogits) and adapter.num_classes == 10
    x = torch.rand(5, 3, 2, 2)
    inputs = (x - 0.5) / 0.5  # as the adapter normalises the rows below
    full = model(inputs).detach()
    masked = adapter.forward(inputs).detach()
    assert torch.equal(masked, full[:, list(indices)])  # what methods, predictions and entropies see
    from workers.stream import run_stream

    method = build_method(adapter, TTTConfig(method="source"))
    rows = [{"sample_id": str(i), "pixels": x[i].numpy().reshape(-1).tolist(), "label": [3, 7, 1, 7, 3][i]}
            for i in range(5)]
    rows.append({"sample_id": "outside", "pixels": rows[0]["pixels"], "label": 0})
    out = run_stream(adapter, method, rows, run_id="r", shard=0, worker="w")["results"]
    want = [indices[int(k)] for k in masked.argmax(1)]
    assert [r["prediction"] for r in out[:5]] == want  # reported as the model's class indices
    assert [r["correct"] for r in out[:5]] == [p == y["label"] for p, y in zip(want, rows)]
    assert "not one of the 3 classes of model.class_subset" in out[5]["error"]
    reader = ImageRowReader(spec, num_classes=10)
    assert reader.read_labels([3, 2]) == [None, "ValueError: column 'label': 2 is not one of the 3 classes of "
                                                "model.class_subset"]


def test_a_class_subset_that_is_not_there_is_a_config_error(tmp_path):
    from pipeline.config import load_config

    with pytest.raises(ConfigError, match="model.class_subset"):
        load_config(None, ["model.class_subset=imagenet_x"])


# -- precision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["resnet18", "vit"])
def test_bf16_tent_step_runs_on_both_families(family):
    from workers.stream import autocast

    torch.manual_seed(0)
    model = load_model("torchvision.models:resnet18", "none", {"num_classes": 10}) if family == "resnet18" else \
        load_model("timm:create_model", "none", TINY_VIT)
    adapter = ImageClassifierAdapter(model, spec=ImageSpec(shape=(3, 32, 32), mean=(0.5,), std=(0.5,)))
    tent = build_method(adapter, TTTConfig(method="tent"))
    x = torch.rand(4, 3, 32, 32)
    with autocast("bf16", x):
        result = tent.step(x)
    assert result.logits.dtype == torch.bfloat16 and torch.isfinite(result.logits.float()).all()
    assert result.record["steps"] == 1 and result.record["updated_param_count"] > 0
