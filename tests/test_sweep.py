"""Campaigns: grid expansion and cell naming, selection on the validation stream only, the
campaign table and report, and kill-then-resume of a real sweep driver."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import SAFETY_S

from pipeline.analysis.runs import query_runs
from pipeline.analysis.stats import hierarchical_bootstrap
from pipeline.campaigns.campaign import Campaign
from pipeline.campaigns.spec import SweepError, expand, parse_sweep
from pipeline.campaigns.sweep import run_sweep, write_campaign
from ttt.schema import RESULTS_SCHEMA

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("fog", "rotate")


def spec_dict(root: Path, **extra) -> dict:
    raw = {"name": "camp", "config": {"output_root": str(root), "ttt": {"lr": 1e-4}},
           "axes": {"method": {"source": {"ttt.method": "source"}, "tent": {"ttt.method": "tent"}},
                    "seed": {"fields": ["data.seed", "ttt.seed"], "values": [0, 1]}},
           "select": {"tent": {"ttt.lr": [0.001, 0.01]}},
           "validation": {"data.corruptions": ["spatter", "fog"]}}
    raw.update(extra)
    return raw


def test_grid_expansion_and_cell_names(tmp_path: Path) -> None:
    cells = expand(parse_sweep(spec_dict(tmp_path)))
    names = [(c.role, c.name) for c in cells]
    # axes vary last-fastest; source: one test cell per seed; tent: test + validation per grid point, plus its default lr 1e-4
    assert names == [
        ("test", "source-seed0"), ("test", "source-seed1"),
        ("test", "tent-seed0-lr0.001"), ("validation", "val-tent-seed0-lr0.001"),
        ("test", "tent-seed0-lr0.01"), ("validation", "val-tent-seed0-lr0.01"),
        ("test", "tent-seed0-lr0.0001"), ("validation", "val-tent-seed0-lr0.0001"),
        ("test", "tent-seed1-lr0.001"), ("validation", "val-tent-seed1-lr0.001"),
        ("test", "tent-seed1-lr0.01"), ("validation", "val-tent-seed1-lr0.01"),
        ("test", "tent-seed1-lr0.0001"), ("validation", "val-tent-seed1-lr0.0001"),
    ]
    by = {c.name: c for c in cells}
    tent = by["tent-seed1-lr0.01"]
    assert tent.run_id == "camp-tent-seed1-lr0.01" and tent.config.tag == "camp"
    assert (tent.config.ttt.lr, tent.config.ttt.seed, tent.config.data.seed) == (0.01, 1, 1)
    assert tent.config.data.corruptions is None  # the test stream is the base's
    assert by["val-tent-seed1-lr0.01"].config.data.corruptions == ["spatter", "fog"]
    assert [c.name for c in cells if c.default_hp and c.role == "test"] == ["tent-seed0-lr0.0001", "tent-seed1-lr0.0001"]
    # expansion is deterministic: the same spec gives the same run ids (what resume relies on)
    assert [c.run_id for c in expand(parse_sweep(spec_dict(tmp_path)))] == [c.run_id for c in cells]

    listed = expand(parse_sweep(spec_dict(tmp_path, cells=[{"method": "source", "seed": 1}], select={})))
    assert [c.name for c in listed] == ["source-seed1"]
    plain = expand(parse_sweep(spec_dict(tmp_path, axes={"ttt.batch_size": [50, 100]}, select={})))
    assert [(c.name, c.config.ttt.batch_size) for c in plain] == [("batch_size50", 50), ("batch_size100", 100)]


@pytest.mark.parametrize("change, message", [
    ({"select": {"tent": {"ttt.lr": [0.1]}}, "validation": None}, "select needs a validation stream"),
    ({"cells": [{"method": "nope", "seed": 0}]}, "has no label 'nope'"),
    ({"validation": {"data.n_test": 1000}}, "the validation stream would be the test stream"),
    ({"axes": {"ttt.lrr": [1]}, "select": {}}, "unknown field"),
    ({"name": "a b"}, "name must be a plain name"),
    ({"axes": {"ttt.lr": [0.001, "0.001"]}, "select": {}}, "cells share a name"),
])
def test_bad_sweeps_fail_in_one_line(tmp_path: Path, change: dict, message: str) -> None:
    raw = spec_dict(tmp_path)
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(SweepError, match=message):
        expand(parse_sweep(raw))


# ------------------------------------------------------------------ selection without leakage

def write_run(root: Path, cell, error: float, n: int = 40) -> None:
    """A finished run directory for `cell` whose every domain has error `error` (exactly)."""
    run_dir = root / cell.run_id
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    wrong = int(round(error * n))
    rows = [{"run_id": cell.run_id, "sample_id": f"{d}-{i:03d}", "shard": 0, "position": k * n + i, "domain": d,
             "method": cell.config.ttt.method, "prediction": 0, "label": 0 if i >= wrong else 1,
             "correct": i >= wrong, "confidence": 0.9, "entropy": 0.1, "adapter_source": "none", "error": None}
            for k, d in enumerate(DOMAINS) for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), run_dir / "results" / "part-00000.parquet")
    info = {"run_id": cell.run_id, "tag": cell.config.tag, "status": "finished", "method": cell.config.ttt.method,
            "model": "pipeline.embedded.model:small_cnn", "config": cell.config.model_dump(mode="json"),
            "started_at": "2026-11-24T10:00:00+00:00"}
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / "summary.json").write_text(json.dumps({"overall": {"n": 2 * n, "error": error, "errors_rows": 0},
                                                      "per_domain": {d: {"n": n, "error": error} for d in DOMAINS}}))


def flip_all(run_dir: Path, correct: bool) -> None:
    path = run_dir / "results" / "part-00000.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("correct"), "correct", pa.array([correct] * table.num_rows))
    pq.write_table(table, path)


def test_selection_uses_only_the_validation_stream(tmp_path: Path) -> None:
    spec = parse_sweep(spec_dict(tmp_path))
    cells = expand(spec)
    write_campaign(spec, cells)
    # validation prefers lr 0.001; test prefers lr 0.01; the default 1e-4 sits between
    errors = {("validation", "lr0.001"): 0.2, ("validation", "lr0.01"): 0.4, ("validation", "lr0.0001"): 0.3,
              ("test", "lr0.001"): 0.5, ("test", "lr0.01"): 0.1, ("test", "lr0.0001"): 0.3}
    for c in cells:
        seed_shift = 0.05 * c.config.ttt.seed  # seeds differ, so the interval has a width
        base = 0.6 if c.hp_name is None else errors[(c.role, c.hp_name)]
        write_run(tmp_path, c, base + seed_shift)

    campaign = Campaign.of(query_runs(tmp_path), "camp")
    sel = campaign.selection().set_index("choice")
    assert sel.loc["selected", "hp"] == "lr0.001" and sel.loc["oracle", "hp"] == "lr0.01"
    assert sel.loc["default", "hp"] == "lr0.0001"
    assert sel.loc["selected", "validation_error"] == pytest.approx(0.225)  # mean of 0.2 and 0.25 over seeds

    # Making every test row of the selected point right (and of the others wrong) changes the oracle
    # and the test errors, never the choice: selection reads no test row.
    for c in cells:
        if c.role == "test" and c.hp_name:
            flip_all(c.run_dir, correct=c.hp_name == "lr0.001")
    sel2 = Campaign(tmp_path, "camp").selection().set_index("choice")
    assert sel2.loc["selected", "hp"] == "lr0.001" and sel2.loc["oracle", "hp"] == "lr0.001"
    assert sel2.loc["selected", "validation_error"] == sel.loc["selected", "validation_error"]
    # ... while a validation row does change it
    for c in cells:
        if c.role == "validation" and c.hp_name == "lr0.01":
            flip_all(c.run_dir, correct=True)
    assert Campaign(tmp_path, "camp").selection().set_index("choice").loc["selected", "hp"] == "lr0.01"


def test_campaign_table_pairs_and_report(tmp_path: Path) -> None:
    spec = parse_sweep(spec_dict(tmp_path))
    cells = expand(spec)
    write_campaign(spec, cells)
    for c in cells:
        error = {None: 0.5, "lr0.001": 0.25, "lr0.01": 0.4, "lr0.0001": 0.3}[c.hp_name] + 0.05 * c.config.ttt.seed
        write_run(tmp_path, c, error)
    campaign = Campaign(tmp_path, "camp")
    table = campaign.table()
    tent = table[(table["method"] == "tent") & (table["domain"] == "mean")].iloc[0]
    # seeds 0 and 1 at 10 and 12 of 40 wrong in each of 2 domains: the two-level bootstrap's interval
    mean, low, high = hierarchical_bootstrap([[10, 10], [12, 12]], [[40, 40], [40, 40]])
    assert (tent["n_seeds"], tent["n_per_seed"], tent["hp"], tent["few_seeds"]) == (2, 80, "lr0.001", True)
    assert (tent["error"], tent["ci_low"], tent["ci_high"]) == pytest.approx((mean, low, high))
    assert mean == pytest.approx(0.275) and 0 <= low < 0.25 and 0.30 < high <= 1
    assert set(table["method"]) == {"source", "tent", "tent (oracle)", "tent (default)"}
    assert table["model"].str.startswith("small_cnn").all()

    pairs = campaign.pairs(n_resamples=2000)
    row = pairs.iloc[0]
    assert (row["a"], row["b"], row["n"]) == ("source", "tent", 160)
    # the pairs differ exactly where one is wrong and the other right: source wrong on 20 (seed 0) and 22
    # (seed 1) of 40 per domain, tent on 10 and 12: the difference is (84 - 44) / 160 = 0.25
    assert row["diff"] == pytest.approx(0.25) and row["mcnemar_b"] == 0 and row["mcnemar_c"] == 40
    assert row["p_mcnemar"] < 1e-6 and row["ci_low"] > 0

    from pipeline.cli import cmd_report

    assert cmd_report(["--campaign", "camp", "--root", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "27.5 [" in md and "(n=2x80, <3 seeds) @lr0.001" in md and "nan" not in md
    assert "p holm" in md and "< 0.001" in md and "Win / tie / loss against source" in md
    wins = pd.read_csv(tmp_path / "rep" / "wins.csv")
    assert wins.set_index("method").loc["tent", ["cells", "wins", "losses"]].tolist() == [2, 2, 0]
    assert (tmp_path / "rep" / "table.png").read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(tmp_path / "rep" / "pairs.csv")) == 1


# ----------------------------------------------------------------------- kill, then resume

def small_sweep(root: Path, small_default: dict, name: str) -> dict:
    return {"name": name,
            "config": {"output_root": str(root), "data": {"manifest": str(small_default["manifest"])},
                       "model": {"checkpoint": str(small_default["checkpoint"])},
                       "ttt": {"batch_size": 50}, "workers": {"num_shards": 1, "num_cpus": 0.5}},
            # tent one row per batch, 10 steps each (1,500 steps, seconds): still running when the source
            # cell has finished, so the killed campaign has an unfinished cell (both cells run at once on the
            # shared pool; 150 single steps took under a second and sometimes finished first)
            "axes": {"method": {"source": {"ttt.method": "source"},
                                "tent": {"ttt.method": "tent", "ttt.batch_size": 1, "ttt.steps": 10}}}}


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_killed_campaign_resumes_to_the_same_table(tmp_path: Path, small_default, ray_session) -> None:
    root = tmp_path / "runs"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(small_sweep(root, small_default, "killed"), sort_keys=False))
    cmd = [sys.executable, "-m", "pipeline", "sweep", str(sweep_file)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    first, second = root / "killed-source" / "run.json", root / "killed-tent" / "run.json"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if first.is_file() and json.loads(first.read_text()).get("status") == "finished":
                assert json.loads(second.read_text()).get("status") != "finished", "the tent cell was too quick"
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and what it started (its own session)
    finally:
        proc.wait(timeout=SAFETY_S)
    finished = [d for d in root.iterdir() if (d / "run.json").is_file()
                and json.loads((d / "run.json").read_text()).get("status") == "finished"]
    assert [d.name for d in finished] == ["killed-source"]  # killed with the tent cell unfinished
    before = {d.name: _mtimes(d) for d in finished}

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SAFETY_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(finished)} finished already" in done.stdout
    for name, mtimes in before.items():
        assert _mtimes(root / name) == mtimes, f"{name} was rewritten"
    resumed = Campaign(root, "killed")
    assert all(json.loads((root / c["run_id"] / "run.json").read_text())["status"] == "finished"
               for c in resumed.cells)

    # the same cells, uninterrupted, in this process: the same table
    run_sweep(parse_sweep(small_sweep(root, small_default, "whole")))
    whole = Campaign(root, "whole").table()
    pd.testing.assert_frame_equal(resumed.table().drop(columns="seeds"), whole.drop(columns="seeds"))
    assert np.isfinite(whole["error"]).all() and len(whole) == 2 * 4  # 2 methods x (3 domains + mean)


def test_report_shows_each_settings_grid_point_and_no_nan(tmp_path: Path) -> None:
    """report.md named the first setting's grid point for every setting (table.csv was right)."""
    import subprocess as sp

    out = tmp_path / "camp"
    proc = sp.run([sys.executable, str(REPO / "bench" / "campaign_stats.py"), str(out)], capture_output=True,
                  text=True, cwd=REPO, timeout=SAFETY_S)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| tent ") and "oracle" not in line)
    continual, reset = [c.strip() for c in row.strip("|").split("|")][2:4]
    assert continual.endswith("@lr0.001") and reset.endswith("@lr0.01")  # selection.csv's choice per setting
    table = pd.read_csv(out / "report" / "table.csv")
    source = table[(table["method"] == "source") & (table["domain"] == "mean")].iloc[0]
    # deterministic over seeds (65.3% both): still an interval from the samples, within [0, 1]
    assert source["ci_low"] < source["error"] < source["ci_high"] and 0 <= source["ci_low"] and source["ci_high"] <= 1
    assert "nan" not in md


# --------------------------------------------------------------------- domain orders as replicates

def test_an_order_axis_builds_each_domain_order_and_the_table_averages_over_orders(tmp_path: Path, ray_session) -> None:
    from pipeline.benchmarks.settings import domain_orders
    from pipeline.campaigns.sweep import attach_streams
    from pipeline.manifest import read_manifest_meta

    names = ["gaussian_noise", "fog", "contrast"]
    raw = {"name": "orders", "config": {"output_root": str(tmp_path / "runs"), "data": {"cache_dir": str(tmp_path / "cache")}},
           "axes": {"method": {"source": {"ttt.method": "source"}, "norm": {"ttt.method": "norm"}}, "order": [0, 1, 2]},
           "streams": {"per_domain": 3, "severity": 2, "test": names, "validation": ["spatter"], "order_seed": 5}}
    spec = parse_sweep(raw)
    assert spec.select_over == ["order"]  # orders are replicates, like seeds
    cells = attach_streams(spec, expand(spec))
    assert [c.name for c in cells[:3]] == ["source-order0", "source-order1", "source-order2"]
    orders = domain_orders(names, 3, seed=5)
    for cell in cells:
        meta = read_manifest_meta(cell.config.data.manifest)
        domains = list(dict.fromkeys(pq.read_table(cell.config.data.manifest).column("domain").to_pylist()))
        assert domains == [f"{n}-2" for n in orders[cell.order]]
        assert meta["setting"] == "continual"
    assert len({c.config.data.manifest for c in cells}) == 3  # both methods see the same three streams
    write_campaign(spec, cells)
    for c in cells:
        write_run(tmp_path / "runs", c, {"source": 0.5, "norm": 0.25}[c.config.ttt.method] + 0.05 * c.order)
    table = Campaign(tmp_path / "runs", "orders").table()
    norm = table[(table["method"] == "norm") & (table["domain"] == "mean")].iloc[0]
    assert (norm["n_seeds"], norm["few_seeds"]) == (3, False)
    assert norm["error"] == pytest.approx(0.30) and norm["ci_low"] < 0.30 < norm["ci_high"]
    with pytest.raises(SweepError, match="domain order labels must be indices"):
        parse_sweep({**raw, "axes": {**raw["axes"], "order": ["a", "b"]}})
