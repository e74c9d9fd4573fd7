"""Your own method by reference (`ttt.method: pkg.module:Class`): refused like model factories when
it is not a method class; the example in examples/ runs in the job."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.job.checks import prepare_run
from ttt.methods import method_class

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples.confident_tent:ConfidentTent"


@pytest.mark.parametrize("ref, message", [
    ("os:system", "'os' is not your package"),
    ("builtins:eval", "'builtins' is not your package"),
    ("nopkg.nomod:Thing", "cannot import 'nopkg.nomod'"),
    ("examples.confident_tent:torch", "module is not a method"),
    ("examples.confident_tent:softmax_entropy", "function is not a method"),
    ("ttt.methods.base:StepResult", "class StepResult is not a method"),
])
def test_what_is_not_a_method_class_is_refused(ref: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        method_class(ref)


def test_a_refused_method_stops_the_run_in_one_line(small_default, tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/mnistc_tent.yaml",
                      [f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
                       f"output_root={tmp_path}", "ttt.method=os:system"])
    with pytest.raises(ConfigError, match="ttt.method 'os:system'"):
        prepare_run(cfg, log=lambda _: None)
    with pytest.raises(ConfigError, match="ttt.method"):
        load_config(ROOT / "configs/mnistc_tent.yaml", ["ttt.method=not a reference"])


def test_the_example_method_runs_in_the_job(small_default, tmp_path: Path, ray_session) -> None:
    from pipeline.job.runner import run_job

    cfg = load_config(ROOT / "configs/mnistc_tent.yaml", [
        f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
        f"output_root={tmp_path / 'runs'}", "ttt.batch_size=25", "workers.num_cpus=0.25",
        f"ttt.method={EXAMPLE}", "ttt.method_kwargs.threshold=0.3", "run_id=mine"])
    run_dir = run_job(cfg)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["method"] == EXAMPLE
    assert info["protocol"]["order_matters"] and info["config"]["ttt"]["method_kwargs"] == {"threshold": 0.3}
    results = pd.read_parquet(run_dir / "results")
    assert len(results) == 150 and results["error"].isna().all() and (results["method"] == EXAMPLE).all()
    analysis = pd.read_parquet(run_dir / "analysis")
    assert analysis["n_reliable"].notna().all() and (analysis["steps"] > 0).any()
