"""The model-factory guard is an allow-list (issue 26): a factory must be an nn.Module class, a
function of the user's own package, or a model builder of torchvision.models / timm / the zoo.
Every refused factory here carries a payload that would write a marker file if it ever ran (or if
its module were imported); the marker must never appear, and the refusal is one line."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import cli
from workers.models import ModelLoadError, build_model, load_model, resolve_factory

ROOT = Path(__file__).resolve().parents[1]


class _WritesMarker:
    """Unpickling it runs `open(path, 'w')` (a pickle payload: what weights_only exists to refuse)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "factory_ran"
    yield path
    assert not path.exists(), "a refused factory (or its module) ran"


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A package of the user's own on sys.path (outside site-packages), imported fresh per test."""
    root = tmp_path / "userpkgs"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m.startswith("mymodels")]:
        del sys.modules[name]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_psutil_popen_is_refused_before_it_runs(marker):
    with pytest.raises(ModelLoadError) as exc:
        build_model("psutil:Popen", {"args": ["touch", str(marker)]})
    assert "'psutil' is not a model library, not a model factory" in _one_line(exc)


def test_numpy_load_with_a_pickle_payload_is_refused(marker, tmp_path):
    payload = tmp_path / "payload.npy"
    np.save(payload, np.array([_WritesMarker(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(ModelLoadError) as exc:
        build_model("numpy:load", {"file": str(payload), "allow_pickle": True})
    assert "'numpy' is not a model library" in _one_line(exc)


def test_torch_load_without_weights_only_is_refused(marker, tmp_path):
    payload = tmp_path / "payload.pt"
    torch.save({"x": _WritesMarker(str(marker))}, payload)
    for ref in ("torch:load", "torch.serialization:load", "torch.hub:load"):
        with pytest.raises(ModelLoadError) as exc:
            build_model(ref, {"f": str(payload), "weights_only": False})
        assert "not a model factory" in _one_line(exc)


def test_a_user_module_re_exporting_numpy_load_is_refused_before_the_call(marker, tmp_path, user_pkg):
    (user_pkg / "mymodels_reexport.py").write_text("from numpy import load\nfrom torch import load as tload\n")
    payload = tmp_path / "payload.npy"
    np.save(payload, np.array([_WritesMarker(str(marker))], dtype=object), allow_pickle=True)
    for ref, kwargs in (("mymodels_reexport:load", {"file": str(payload), "allow_pickle": True}),
                        ("mymodels_reexport:tload", {"f": str(payload), "weights_only": False})):
        with pytest.raises(ModelLoadError) as exc:
            build_model(ref, kwargs)
        assert "installed package" in _one_line(exc)


@pytest.mark.parametrize("ref", ["mymodels_os.os:build", "mymodels_os.subprocess:build", "numpy.mymodule:build",
                                 "pipeline.job.outputs:write_json", "torchvision.io:read_image", "os:system"])
def test_a_module_excluded_by_its_path_is_never_imported(ref, marker, user_pkg):
    """A module's top-level code runs when it is imported: excluded paths are refused before that."""
    pkg = user_pkg / "mymodels_os"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()   # top-level code: runs on import
        def build():
            return None
    """)
    (pkg / "os.py").write_text(body)
    (pkg / "subprocess.py").write_text(body)
    with pytest.raises(ModelLoadError) as exc:
        resolve_factory(ref)
    assert "not a model factory" in _one_line(exc)
    assert ref.partition(":")[0] not in sys.modules or ref.startswith(("os:", "pipeline.", "torchvision."))


def test_what_may_be_a_factory(user_pkg):
    (user_pkg / "mymodels_ok.py").write_text(textwrap.dedent("""
        import torch
        class Net(torch.nn.Module):
            def __init__(self, width=3):
                super().__init__()
                self.fc = torch.nn.Linear(width, 2)
            @classmethod
            def small(cls):
                return cls(2)
            def forward(self, x):
                return self.fc(x)
        def build(width=3):
            return Net(width)
        class NotAModule:
            pass
    """))
    assert isinstance(build_model("mymodels_ok:build", {"width": 4}), torch.nn.Module)
    assert isinstance(build_model("mymodels_ok:Net.small"), torch.nn.Module)
    assert isinstance(build_model("torch.nn:Linear", {"in_features": 2, "out_features": 2}), torch.nn.Linear)
    assert resolve_factory("torchvision.models:resnet18").__name__ == "resnet18"
    assert resolve_factory("timm:create_model").__name__ == "create_model"
    assert resolve_factory("pipeline.benchmarks.zoo:robustbench").__name__ == "robustbench"
    for ref, why in (("mymodels_ok:NotAModule", "not a torch.nn.Module subclass"),
                     ("torch.nn.functional:relu", "installed package"),
                     ("timm.models:load_checkpoint", "neither timm.create_model nor a registered architecture"),
                     ("torchvision.models:get_weight", "not a torchvision.models architecture"),
                     ("builtins:eval", "standard library")):
        with pytest.raises(ModelLoadError, match=why):
            resolve_factory(ref)


def shipped_factories() -> dict[str, str]:
    """`config file: model.factory` of every shipped config that names one."""
    found = {p.name: ((yaml.safe_load(p.read_text()) or {}).get("model") or {}).get("factory")
             for p in sorted((ROOT / "configs").glob("*.yaml"))}
    return {name: factory for name, factory in found.items() if factory}


@pytest.mark.parametrize("config, factory", shipped_factories().items())
def test_every_shipped_config_names_a_factory_the_guard_allows(config, factory):
    """The allow-list and the configs move together: the guard once refused the Fashion-MNIST-C
    configs' own `pipeline.embedded.fashion:fashion_resnet`, so none of them could run."""
    assert callable(resolve_factory(factory)), config


@pytest.mark.parametrize("factory, kwargs, what", [
    ("torchvision.models:resnet18", {"weights": "IMAGENET1K_V1"}, "factory_kwargs.weights='IMAGENET1K_V1' would download"),
    ("torchvision.models:resnet18", {"pretrained": True}, "factory_kwargs.pretrained=True would download"),
    ("timm:create_model", {"model_name": "resnet18", "pretrained": True}, "pretrained=true would download"),
    ("timm:create_model", {"model_name": "resnet18", "checkpoint_path": "/x.pth"}, "checkpoint_path is not read"),
])
def test_a_factory_call_that_would_download_is_refused(factory, kwargs, what, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.raises(ModelLoadError) as exc:
        load_model(factory, None, kwargs)
    line = _one_line(exc)
    assert what in line and "give the weights file as model.checkpoint" in line


def test_the_cli_refuses_popen_in_one_line(marker, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"sample_id": ["a"], "pixels": [[0.0] * 784], "label": [1]}), manifest)
    code = cli.main(["run", str(ROOT / "configs" / "mnistc_tent.yaml"), "--set", "model.factory=psutil:Popen",
                     "--set", f"data.manifest={manifest}",
                     "--set", f"model.factory_kwargs={{args: [touch, {marker}]}}", "--set", "model.checkpoint=none",
                     "--set", f"output_root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'psutil' is not a model library" in err[0], err
    assert not (tmp_path / "runs").exists()
