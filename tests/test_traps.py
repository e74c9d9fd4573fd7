"""Issue 23's silent traps, each made correct by default or said out loud (pure parts; the job's
own refusals and warnings are in tests/test_local.py, which runs real jobs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.benchmarks.commands import manifest_main
from pipeline.config import load_config
from pipeline.job.protocol import error_row_verdict, no_update_note, protocol, resolve_shards

ROOT = Path(__file__).resolve().parents[1]
STATEFUL = ["tent", "cotta", "eata", "sar", "rotta", "deyo", "roid", "mim", "nn_cache"]


@pytest.mark.parametrize("name", STATEFUL)
def test_an_order_dependent_config_runs_as_one_stream(name: str) -> None:
    cfg = resolve_shards(load_config(ROOT / "configs" / f"mnistc_{name}.yaml"))
    assert cfg.workers.num_shards == 1
    proto = protocol(cfg, {"setting": "continual"})
    assert proto["independent_streams"] == 1 and proto["order_matters"]


def test_shards_asked_for_are_kept_and_counted_as_streams() -> None:
    cfg = resolve_shards(load_config(ROOT / "configs/mnistc_tent.yaml", ["workers.num_shards=4"]))
    assert protocol(cfg, {"setting": "continual"})["independent_streams"] == 4
    # order-free runs keep running in parallel: shards change nothing there
    for name, extra in (("source", []), ("norm", []), ("tent", ["ttt.episodic=true"])):
        cfg = resolve_shards(load_config(ROOT / f"configs/mnistc_{name}.yaml", extra))
        assert cfg.workers.num_shards == 2 and protocol(cfg, None)["independent_streams"] == 1


def _class_folder(root: Path, classes=("a", "b", "c"), per_class=6) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / c / f"{j}.png")
    return root


def test_manifest_prints_one_stream_and_a_folder_is_shuffled(tmp_path: Path, capsys) -> None:
    root = _class_folder(tmp_path / "clean")
    out = tmp_path / "m.parquet"
    assert manifest_main(["folder", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--set workers.num_shards=1" in printed and "seeded shuffle" in printed
    labels = pq.read_table(out).column("label").to_pylist()
    assert labels != sorted(labels)  # not class by class: every batch one class is the worst case
    assert manifest_main(["folder", str(root), "--out", str(out), "--folder-order", "class-sorted"]) == 0
    assert pq.read_table(out).column("label").to_pylist() == sorted(labels)
    assert "class by class" in capsys.readouterr().out


def test_corrupt_keeps_held_out_corruptions_out_of_the_test_manifest(ray_session, tmp_path: Path) -> None:
    from pipeline.benchmarks.corrupt import generate, source_from_folder

    source = source_from_folder(_class_folder(tmp_path / "clean", classes=("a", "b"), per_class=1))
    manifest = generate(source, tmp_path / "out", corruptions=["fog", "spatter", "saturate"], severities=[1])
    assert set(pq.read_table(manifest).column("corruption").to_pylist()) == {"fog"}
    held = pq.read_table(tmp_path / "out" / "manifest_held_out.parquet").column("corruption").to_pylist()
    assert set(held) == {"spatter", "saturate"}
    asked = generate(source, tmp_path / "out2", corruptions=["fog", "spatter"], severities=[1], include_held_out=True)
    assert set(pq.read_table(asked).column("corruption").to_pylist()) == {"fog", "spatter"}


def test_error_rows_fail_or_warn() -> None:
    top = {"image is 32x32, the model takes 28x28": 150}
    failure, warning = error_row_verdict({"overall": {"n": 150, "errors_rows": 150}}, top)
    assert failure == "every row (150) is an error row; most common (150 x): image is 32x32, the model takes 28x28"
    _, warning = error_row_verdict({"overall": {"n": 100, "errors_rows": 10}}, top)
    assert warning.startswith("10 of 100 rows (10.0%) are error rows")
    assert error_row_verdict({"overall": {"n": 100, "errors_rows": 2}}, top) == (None, None)


def test_one_batch_per_domain_with_same_forward_is_said() -> None:
    cfg = load_config(ROOT / "configs/mnistc_tent.yaml", ["ttt.reset_on_domain_change=true", "ttt.batch_size=200"])
    note = no_update_note(cfg, "same_forward", {"fog": 50, "rotate": 50})
    assert note.startswith("no update reached a prediction: each domain is one batch")
    assert "predict_from=after_update" in note
    assert no_update_note(cfg, "after_update", {"fog": 50}) is None
    assert no_update_note(cfg, "same_forward", {"fog": 500}) is None  # several batches: updates reach later ones
    continual = load_config(ROOT / "configs/mnistc_tent.yaml", ["ttt.batch_size=200"])
    assert no_update_note(continual, "same_forward", {"fog": 50, "rotate": 50}) is None


def test_progress_never_passes_100_percent_nor_says_0_rows_per_s() -> None:
    from pipeline.job.progress import Progress

    lines: list[str] = []
    p = Progress({"s0": 100}, {}, lines.append, 0.0)
    assert "waiting for the first batch" in p._overall() and "rows/s" not in p._overall()
    p.seen["s0"] = 130  # a worker's count that runs ahead of the shard's rows
    text = p._overall()
    assert text.startswith("100/100 rows (100%)") and "ETA 0s" in text


def test_sweep_cell_counter_only_goes_up(tmp_path: Path, monkeypatch) -> None:
    import pipeline.campaigns.sweep as sweep
    from pipeline.campaigns.spec import parse_sweep

    raw = {"name": "order", "config": {"output_root": str(tmp_path)},
           "axes": {"ttt.batch_size": [10, 20, 30]}}
    lines: list[str] = []
    monkeypatch.setattr(sweep, "log", lines.append)
    monkeypatch.setattr("pipeline.campaigns.campaign.Campaign.report", lambda self, out=None, baseline=None: tmp_path)

    def executor(cfgs, on_done):  # cells finish out of order: the last first
        for i in reversed(range(len(cfgs))):
            on_done(i, tmp_path / cfgs[i].run_id)

    sweep.run_sweep(parse_sweep(raw), executor=executor)
    counts = [int(line.split("campaign ")[1].split("/")[0]) for line in lines if "cells, " in line]
    assert counts == [1, 2, 3]
    assert "order-batch_size30 finished" in lines[1]  # the whole run id, never cut
