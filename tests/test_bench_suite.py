"""The performance analyzer on a real local Ray with a tiny stream, and its scaling fit."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.analysis.bench_suite import CSV_COLUMNS, VARIANTS, main, variant_config
from pipeline.analysis.measure import SCALING_MODELS, fit_scaling
from pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", list(SCALING_MODELS))
def test_fit_picks_the_generating_model(family):
    ns = np.array([100, 200, 400, 800, 1600, 3200, 6400, 12800], dtype=float)
    truth = {"linear": 0.002 * ns, "n_log_n": 3e-4 * ns * np.log(ns), "quadratic": 1e-7 * ns**2,
             "constant_linear": 4.0 + 0.002 * ns}[family]
    noise = 1 + 0.005 * np.random.default_rng(0).standard_normal(len(ns))  # 0.5 % timing jitter
    fit = fit_scaling(list(ns), list(truth * noise))
    assert fit["best"] == family
    assert set(fit["models"]) == set(SCALING_MODELS)


def test_fit_prefers_fewer_coefficients_on_an_exact_fit():
    ns = [10, 20, 40]
    assert fit_scaling(ns, [0.5 * n for n in ns])["best"] == "linear"  # constant_linear fits exactly too


def test_retrieval_variants_skip_until_nn_exists():
    from ttt.methods import METHODS

    for name in ("ttt_cache", "retrieval_only"):
        variant = VARIANTS[name]
        got = variant_config(variant, [])
        missing = "nn" not in METHODS or not (ROOT / "configs" / variant.config).is_file()
        assert isinstance(got, str) == missing
        assert isinstance(got, str) or isinstance(got, RunConfig)


def test_suite_writes_one_row_per_cell_and_reports_skips(ray_session, small_default, tmp_path, capsys):
    # Each run starts fresh worker processes (seconds on 2 cores), so the grid is kept to 6 runs.
    out = tmp_path / "suite"
    code = main([
        "--variants", "source,tent,ghost", "--batch-sizes", "40", "--workers", "1,2",
        "--repeats", "1", "--warmup", "0", "--rows", "80",
        "--scaling-variant", "source", "--scaling-rows", "40,80", "--out", str(out),
        "--set", f"data.manifest={small_default['manifest']}", "--set", f"model.checkpoint={small_default['checkpoint']}",
        "--set", "workers.num_cpus=0.25",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipping variant ghost" in printed and "performance summary" in printed

    with open(out / "performance_summary.csv") as fh:
        reader = csv.DictReader(fh)
        assert set(CSV_COLUMNS) <= set(reader.fieldnames)
        rows = list(reader)
    cells = [(r["variant"], int(r["batch_size"]), int(r["workers"])) for r in rows]
    assert sorted(cells) == sorted((v, b, w) for v in ("source", "tent") for b in (40,) for w in (1, 2))
    for r in rows:
        assert float(r["samples_per_s"]) > 0 and float(r["peak_rss_mb"]) > 0 and int(r["repeats"]) == 1
        assert float(r["p95_batch_latency_s"]) >= float(r["p50_batch_latency_s"]) > 0
        assert r["cache_hit_rate"] == "" and r["evictions"] == ""  # no adapter cache in these runs
        if r["variant"] == "source":
            assert float(r["overhead_pct"]) == 0.0
        else:
            assert r["method"] == "tent" and r["overhead_pct"] != ""

    scaling = json.loads((out / "scaling_fit.json").read_text())
    assert [p["rows"] for p in scaling["points"]] == [40, 80]
    assert scaling["best"] in SCALING_MODELS and scaling["best"] in printed
    assert json.loads((out / "suite.json").read_text())["skipped"]["ghost"].startswith("config ")
