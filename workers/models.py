"""Load a model replica from a factory reference and a local checkpoint, never from a hub.

The factory reference (`package.module:function`) is the only thing a config may cause to be
executed. Naming it imports its module (whose top-level code runs: a config is code), so what the
rule below excludes by its module path alone is refused before anything is imported, and the
callable is checked before it is ever called. A factory must be
  - a class that is a `torch.nn.Module` subclass (e.g. `torch.nn:Linear`, `mypkg.models:Net`), or
  - a function from the user's own package (a module outside site-packages and the standard
    library, and outside this project's own code), or
  - a model builder of an allow-listed model library: `torchvision.models:<arch>` (an entry of
    `torchvision.models.list_models()`), `timm:create_model` or a registered timm architecture,
    and this project's `pipeline.benchmarks.zoo` / `pipeline.embedded.model` / `pipeline.embedded.fashion`;
never a callable of numpy, torch's I/O (`torch:load`, `torch.hub`, `torch.serialization`),
process or OS modules of any package (`psutil:Popen`, `os:system`, `subprocess:run`), or anything
that is not a plain Python function or class. A call that would download weights
(torchvision `weights=...`, timm `pretrained=True`, `checkpoint_path=...`) is refused in one line
saying how to give the file as `model.checkpoint`.

Checkpoints: `*.safetensors` load with safetensors; anything else with `torch.load(weights_only=True)`.
A training checkpoint's `{"state_dict": ...}` / `{"model": ...}` is unwrapped and the `module.` /
`model.` prefixes RobustBench strips (DataParallel) are removed when the model's own names lack them.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelLoadError(ValueError):
    pass


NO_CHECKPOINT = "none"  # model.checkpoint: none = evaluate the factory's own (e.g. random) weights on purpose

# this project's own packages: only the zoo and the embedded source models (MNIST, Fashion-MNIST) are factories
PROJECT_PACKAGES = ("pipeline", "workers", "ttt", "kb_index")
PROJECT_FACTORY_MODULES = ("pipeline.benchmarks.zoo", "pipeline.embedded.model", "pipeline.embedded.fashion")
# libraries whose model builders are factories (functions are checked against their registries)
MODEL_LIBRARIES = ("torchvision", "timm")
# refused by name before import: packages that hold no models and do I/O, run processes or load pickles
DENIED_PACKAGES = frozenset({
    "numpy", "psutil", "scipy", "pandas", "pyarrow", "ray", "faiss", "yaml", "dill", "cloudpickle", "joblib",
    "setuptools", "pip", "pkg_resources", "_distutils_hack", "sh", "plumbum", "pexpect", "ptyprocess", "fabric",
    "paramiko", "invoke", "requests", "urllib3", "httpx", "aiohttp", "fsspec", "smart_open", "boto3", "botocore",
    "IPython", "jupyter_client", "nbconvert", "safetensors", "huggingface_hub", "h5py", "mlflow", "pydantic",
})
# refused in any package: module path components that are process, OS or serialisation modules
DENIED_COMPONENTS = frozenset({
    "os", "sys", "subprocess", "multiprocessing", "process", "processes", "popen", "shell", "shutil", "pty",
    "signal", "socket", "pickle", "serialization", "hub", "io", "cpp_extension", "distutils", "ctypes",
    "_utils_internal", "_C", "download", "downloads", "_hub", "_builder", "_helpers",
})


def _installed_roots() -> list[str]:
    """Folders of installed and standard-library code (a module under one is not the user's own)."""
    roots = set(site.getsitepackages()) | {site.getusersitepackages()}
    for key in ("purelib", "platlib", "stdlib", "platstdlib"):
        try:
            roots.add(sysconfig.get_paths()[key])
        except KeyError:
            pass
    return sorted(os.path.realpath(r) for r in roots if r)


def _is_installed(path: str | None) -> bool:
    if not path:
        return True  # a built-in or frozen module has no file
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r + os.sep) for r in _installed_roots())


def _refuse(ref: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"model.factory {ref!r}: {why}, not a model factory "
                          "(name an nn.Module class, a function of your own package, e.g. mypkg.models:build, "
                          "torchvision.models:<arch> or timm:create_model)")


def check_module_path(ref: str, module_name: str) -> None:
    """Refuse, before importing anything, a module the rule excludes by its path alone."""
    parts = module_name.split(".")
    top = parts[0]
    if top == "__main__":
        raise _refuse(ref, "'__main__' is not a package")
    if top == "builtins" or top in sys.stdlib_module_names:
        raise _refuse(ref, f"{top!r} is the standard library")
    if top in DENIED_PACKAGES:
        raise _refuse(ref, f"{top!r} is not a model library")
    bad = [p for p in parts[1:] if p in DENIED_COMPONENTS]
    if bad:
        raise _refuse(ref, f"{module_name!r} is a process, OS, I/O or download module ({bad[0]!r})")
    if top in PROJECT_PACKAGES and module_name not in PROJECT_FACTORY_MODULES:
        raise _refuse(ref, f"{module_name!r} is this project's own code (factories: {', '.join(PROJECT_FACTORY_MODULES)})")
    if top == "torchvision" and module_name != "torchvision.models" and not module_name.startswith("torchvision.models."):
        raise _refuse(ref, f"{module_name!r} is torchvision outside torchvision.models")
    if top == "torch" and not (module_name == "torch.nn" or module_name.startswith("torch.nn.")):
        # torch itself offers no model builders outside torch.nn's classes; torch:load, torch.hub, ... are I/O
        raise _refuse(ref, f"{module_name!r} is torch outside torch.nn")
    try:
        spec = importlib.util.find_spec(top)  # locates the top-level package without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelLoadError(f"model.factory {ref!r}: cannot import {module_name!r} (no module named {top!r})")


def _function_allowed(func: Any) -> str | None:
    """None when `func` (a plain Python function) may be a factory, else why not."""
    origin = getattr(func, "__module__", None) or ""
    top = origin.split(".")[0]
    if origin in PROJECT_FACTORY_MODULES:
        return None
    if top in PROJECT_PACKAGES:
        return f"{origin}.{func.__qualname__} is this project's own code"
    if top == "torchvision":
        import torchvision.models

        if origin.startswith("torchvision.models") and func.__name__ in torchvision.models.list_models():
            return None
        return f"torchvision's {origin}.{func.__qualname__} is not a torchvision.models architecture"
    if top == "timm":
        import timm

        if func is timm.create_model or (origin.startswith("timm.models") and timm.is_model(func.__name__)):
            return None
        return f"timm's {origin}.{func.__qualname__} is neither timm.create_model nor a registered architecture"
    module = sys.modules.get(origin)
    if origin in ("", "builtins", "__main__") or top in sys.stdlib_module_names:
        return f"{func.__qualname__} is {origin or 'an unknown module'}'s, the standard library's"
    if _is_installed(getattr(module, "__file__", None)):
        return f"{origin}.{func.__qualname__} is a function of an installed package ({top}), not of your own package"
    return None


def resolve_factory(ref: str):
    """The callable a `package.module:function` reference names, refused (ModelLoadError, one line)
    before it is ever called, and before its module is imported where the module path already
    excludes it (see the module docstring for the rule)."""
    module_name, _, func_name = ref.partition(":")
    if not module_name or not func_name:
        raise ModelLoadError(f"model.factory must look like package.module:function, got {ref!r}")
    check_module_path(ref, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"model.factory {ref!r}: cannot import {module_name!r} ({exc})") from None
    func = module
    for part in func_name.split("."):  # e.g. timm:create_model, pkg.mod:Class.from_config
        func = getattr(func, part, None)
    if not callable(func):
        raise ModelLoadError(f"model.factory {ref!r}: {module_name} has no callable {func_name!r}")
    if inspect.isclass(func):
        if not issubclass(func, nn.Module):
            raise _refuse(ref, f"class {func.__module__}.{func.__qualname__} is not a torch.nn.Module subclass")
        return func
    if inspect.ismethod(func):  # a classmethod of a Module subclass, e.g. mypkg.models:Net.from_config
        owner = func.__self__
        if not (inspect.isclass(owner) and issubclass(owner, nn.Module)):
            raise _refuse(ref, f"{func.__qualname__} is not a classmethod of an nn.Module subclass")
        why = _function_allowed(func.__func__)
        if why:
            raise _refuse(ref, why)
        return func
    if not inspect.isfunction(func):
        raise _refuse(ref, f"{type(func).__name__} is not a Python function or class")
    why = _function_allowed(func)
    if why:
        raise _refuse(ref, why)
    return func


def check_no_download(factory: str, build: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a factory call that would fetch weights from a hub (before calling it)."""
    origin = (getattr(build, "__module__", None) or "").split(".")[0]
    how = "give the weights file as model.checkpoint (a state_dict .pt or model.safetensors) instead"
    if origin == "torchvision":
        for key in ("weights", "weights_backbone", "pretrained", "pretrained_backbone"):
            if kwargs.get(key) not in (None, False):
                raise ModelLoadError(f"model.factory {factory!r} with factory_kwargs.{key}={kwargs[key]!r} would download "
                                     f"weights: {how} (model.weights_enum names a weights enum for its preprocessing only)")
    if origin == "timm":
        if kwargs.get("pretrained"):
            raise ModelLoadError(f"model.factory {factory!r} with factory_kwargs.pretrained=true would download weights "
                                 f"from the Hugging Face hub: {how}")
        if kwargs.get("checkpoint_path"):  # timm loads it with its own torch.load, outside this module's rule
            raise ModelLoadError(f"model.factory {factory!r}: factory_kwargs.checkpoint_path is not read: {how}")


def build_model(factory: str, factory_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """`factory(**factory_kwargs)` after the factory guard and the no-download check."""
    kwargs = dict(factory_kwargs or {})
    build = resolve_factory(factory)
    check_no_download(factory, build, kwargs)
    try:
        model = build(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"model.factory {factory!r} with model.factory_kwargs={kwargs} failed: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model.factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors: safetensors, or torch.load(weights_only=True), unwrapped from
    a training checkpoint's `state_dict` / `model` entry."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"model.checkpoint {path}: not a readable safetensors file: {_first_line(exc)}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"model.checkpoint {path}: refused by torch.load(weights_only=True): "
                             f"{_first_line(exc)}") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # training checkpoints (RobustBench, timm's train.py)
        if isinstance(state, dict) and isinstance(state.get(key), dict) and \
                not isinstance(state.get(key), torch.Tensor):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"model.checkpoint {path} holds a {type(state).__name__} that is not a state_dict of tensors")
    return state


def fit_names(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Strip the `module.` (DataParallel) and `model.` prefixes RobustBench strips, one at a time,
    where every key carries it and the model's own names do not."""
    own = set(model.state_dict())
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    ignored = getattr(model, "checkpoint_ignores", ())  # e.g. RobustBench's mu / sigma normalisation buffers
    return {k: v for k, v in state.items() if k not in ignored}


def load_checkpoint(model: nn.Module, checkpoint: str, factory: str) -> None:
    path = Path(checkpoint)
    if not path.is_file():
        raise ModelLoadError(f"model.checkpoint not found: {path}")
    state = fit_names(read_state_dict(path), model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"model.checkpoint {path} does not fit {factory}: {_first_line(exc)}") from None


def load_model(factory: str, checkpoint: str | None, factory_kwargs: dict[str, Any] | None = None,
               device: str = "cpu") -> nn.Module:
    """Build the model with `factory(**factory_kwargs)` and load `checkpoint` (a state_dict file).
    `checkpoint` None (or "none") keeps the factory's own weights. A model without an `embed`
    feature hook gets one where its features are well defined (attach_embed)."""
    model = build_model(factory, factory_kwargs)
    if checkpoint is not None and str(checkpoint).lower() != NO_CHECKPOINT:
        load_checkpoint(model, checkpoint, factory)
    attach_embed(model)
    return model.to(device).eval()


def _timm_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _head_input_features(model: nn.Module, head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    grabbed: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: grabbed.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return grabbed[-1].flatten(1)


def attach_embed(model: nn.Module) -> None:
    """Give `model` an `embed(x)` hook (the features its classifier head reads: LAME's affinity,
    nn's KB look-ups) when it has none: timm models' `forward_head(forward_features(x),
    pre_logits=True)`; otherwise the input of the last `nn.Linear` (torchvision's `fc` /
    `heads.head`, the zoo's `fc` / `classifier`). A plain attribute, so the state_dict and the
    parameter names stay the model's own; deep copies carry it over to the copy."""
    if callable(getattr(model, "embed", None)):
        return
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
        model.embed = functools.partial(_timm_features, model)
        return
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        model.embed = functools.partial(_head_input_features, model, linears[-1])


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


PREPROCESS_FIELDS = ("image_shape", "mean", "std", "resize", "center_crop", "interpolation")


def model_preprocess(model: nn.Module, factory: str, weights_enum: str | None = None) -> tuple[dict[str, Any], str]:
    """What the model itself says about its input (`model.preprocess: auto`): (fields, where from).
    timm: its data config (`timm.data.resolve_data_config(model=...)`: input size, mean / std,
    interpolation, and resize = floor(size / crop_pct) before the centre crop, as timm's eval
    transform); torchvision: the transforms metadata of the weights enum `weights_enum` names
    (nothing is downloaded); the zoo's RobustBench models: their `preprocess_cfg` ([0, 1] inputs)."""
    base = getattr(model, "model", model) if type(model).__name__ == "SubsetLogits" else model
    if weights_enum:
        return _torchvision_preprocess(weights_enum)
    if isinstance(getattr(base, "preprocess_cfg", None), dict):
        cfg = dict(base.preprocess_cfg)
        return {k: cfg[k] for k in PREPROCESS_FIELDS if k in cfg}, cfg.get("source", f"{factory}'s preprocess_cfg")
    if isinstance(getattr(base, "pretrained_cfg", None), dict):
        return _timm_preprocess(base)
    if (getattr(base, "__module__", "") or "").startswith("torchvision."):
        raise ModelLoadError(f"model.preprocess: auto on {factory}: name the torchvision weights whose transforms to "
                             "use in model.weights_enum (e.g. ResNet50_Weights.IMAGENET1K_V2), or set "
                             "model.image_shape / mean / std / resize / center_crop")
    raise ModelLoadError(f"model.preprocess: auto: {factory} says nothing about its input (no timm data config, no "
                         "preprocess_cfg); set model.image_shape / mean / std (model.preprocess: explicit)")


def _torchvision_preprocess(name: str) -> tuple[dict[str, Any], str]:
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"model.weights_enum {name!r} is not a torchvision weights enum "
                             f"(e.g. ResNet50_Weights.IMAGENET1K_V2): {_first_line(exc)}") from None
    t = weights.transforms()  # a transform object built from the enum's metadata: no download
    needed = ("crop_size", "resize_size", "mean", "std", "interpolation")
    if not all(hasattr(t, k) for k in needed):
        raise ModelLoadError(f"model.weights_enum {name}: its transforms ({type(t).__name__}) are not an image "
                             "classification preset; set the preprocessing fields explicitly")
    crop, resize = t.crop_size[0], t.resize_size[0]
    fields = {"image_shape": [3, crop, crop], "mean": list(t.mean), "std": list(t.std), "resize": resize,
              "center_crop": crop, "interpolation": t.interpolation.value}
    return fields, f"torchvision {name}.transforms()"


def _timm_preprocess(model: nn.Module) -> tuple[dict[str, Any], str]:
    import math

    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    c, h, w = cfg["input_size"]
    arch = model.pretrained_cfg.get("architecture") or type(model).__name__
    if h != w:
        raise ModelLoadError(f"model.preprocess: auto: timm {arch} takes {h}x{w} inputs; only square inputs are "
                             "derived, set model.image_shape / resize / center_crop")
    if cfg.get("crop_mode", "center") != "center":
        raise ModelLoadError(f"model.preprocess: auto: timm {arch}'s crop_mode {cfg['crop_mode']!r} is not supported "
                             "(center only); set model.resize / center_crop")
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and tuple(img_size) != (h, w) and not getattr(model.patch_embed, "dynamic_img_size", False):
        raise ModelLoadError(f"model.preprocess: auto: timm {arch} was built for {tuple(img_size)} inputs but its data "
                             f"config says {h}x{w}; pass factory_kwargs.pretrained_cfg_overlay: "
                             f"{{input_size: [3, {img_size[0]}, {img_size[1]}]}} or set model.image_shape")
    crop_pct = cfg.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT when the config has none
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ModelLoadError(f"model.preprocess: auto: timm {arch}'s interpolation {interpolation!r} is not supported; "
                             "set model.interpolation")
    fields = {"image_shape": [c, h, w], "mean": list(cfg["mean"]), "std": list(cfg["std"]),
              "resize": math.floor(h / crop_pct), "center_crop": h, "interpolation": interpolation}
    return fields, f"timm data config of {arch} (crop_pct {crop_pct:g})"
