"""Reports: files written for one run and for a comparison, on run directories made by the
test_runs helper, including runs with error rows, null analysis columns, a cache, and LM rows."""
from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from test_runs import T0, make_run  # the shared run-directory writer (tests/ is on sys.path under pytest)

from pipeline.analysis.report import write_reports
from pipeline.cli import cmd_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ERROR_COLUMNS = ["run_id", "label", "method", "domain", "n", "scored", "wrong", "error_rows", "error", "ci_low", "ci_high",
                 "first_position"]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path


def linked(report: Path) -> set[str]:
    """Files report.md links to, as images or as links."""
    return set(re.findall(r"\]\(([^)]+)\)", report.read_text()))


def test_single_run_report(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, error_rows=7, shards=3)
    assert cmd_report([str(run_dir)]) == 0
    out = run_dir / "report"
    for png in ("error_by_domain.png", "stream.png", "timing.png"):
        assert_png(out / png)
    assert not (out / "cache.png").exists()
    errors = pd.read_csv(out / "error_by_domain.csv")
    assert list(errors.columns) == ERROR_COLUMNS
    assert errors["domain"].tolist() == ["shot_noise", "fog", "rotate"]
    assert errors["n"].sum() == 180 and errors["error_rows"].sum() == 7
    assert (errors["scored"] + errors["error_rows"] == errors["n"]).all()
    timing = pd.read_csv(out / "timing.csv")
    assert timing["shard"].tolist() == [0, 1, 2]
    assert timing["samples"].sum() == 180
    assert timing["fine_tuning"].iloc[0] == pytest.approx(1.0)  # 20 ms per batch of 20 samples
    md = (out / "report.md").read_text()
    assert {"error_by_domain.png", "stream.png", "timing.png", "error_by_domain.csv", "timing.csv"} <= linked(out / "report.md")
    assert "No run used the adapter cache" in md
    assert "7 x `cannot decode image`" in md


def test_comparison_report_with_cache_nulls_and_lm(tmp_path: Path) -> None:
    tent = make_run(tmp_path / "runs", started=T0)
    nn = make_run(tmp_path / "runs", method="nn", cache=True, started=T0 + timedelta(hours=1))
    source = make_run(tmp_path / "runs", method="source", adapt=False, status="failed", error_rows=3,
                      started=T0 + timedelta(hours=2))
    written = write_reports([tent, nn, source], out=tmp_path / "cmp")
    cmp = tmp_path / "cmp"
    # --out: nothing is written into the run directories the report reads
    assert written == [cmp / d.name / "report.md" for d in (tent, nn, source)] + [cmp / "report.md"]
    assert not any((d / "report").exists() for d in (tent, nn, source))

    cmp = tmp_path / "cmp"
    for png in ("error_by_domain.png", "stream.png", "cache.png", "timing.png"):
        assert_png(cmp / png)
    assert {"error_by_domain.png", "stream.png", "cache.png", "timing.png"} <= linked(cmp / "report.md")
    errors = pd.read_csv(cmp / "error_by_domain.csv")
    assert errors["label"].drop_duplicates().tolist() == ["tent", "nn", "source"]
    assert len(errors) == 9
    cache = pd.read_csv(cmp / "cache.csv")
    assert cache["label"].tolist() == ["nn"] and cache["evictions"].tolist() == [4]
    assert pd.read_csv(cmp / "timing.csv")["label"].tolist() == ["tent", "nn", "source"]
    assert "source is failed" in (cmp / "report.md").read_text()

    # A run without losses, entropies or timings still gets a report, with notes instead of plots.
    md = (cmp / source.name / "report.md").read_text()
    assert "plot skipped" in md and "No timing recorded" in md
    assert not (cmp / source.name / "stream.png").exists()
    assert_png(cmp / source.name / "error_by_domain.png")
    assert_png(cmp / nn.name / "cache.png")

    # Without --out the comparison goes next to the first run's own report, not over it.
    assert cmd_report([str(tent), str(nn)]) == 0
    assert (tent / "report" / "compare" / "report.md").exists()
    assert (tent / "report" / "report.md").read_text().startswith(f"# Report: {tent.name}")

    lm = make_run(tmp_path / "runs", method="nn", lm=True, started=T0 + timedelta(hours=3))
    assert cmd_report([str(lm)]) == 0
    errors = pd.read_csv(lm / "report" / "error_by_domain.csv")
    assert list(errors.columns) == ERROR_COLUMNS + ["bits_per_byte"]
    assert errors["error"].isna().all() and errors["bits_per_byte"].between(0.5, 1.5).all()
    assert_png(lm / "report" / "error_by_domain.png")
    assert "Bits per byte per domain" in (lm / "report" / "report.md").read_text()


def test_report_of_a_directory_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert cmd_report([str(tmp_path)]) == 2
    assert "not a readable run directory" in capsys.readouterr().err


def test_comparison_labels_intervals_and_warnings(tmp_path: Path, capsys) -> None:
    a = make_run(tmp_path / "runs", lr=1e-3, started=T0)
    b = make_run(tmp_path / "runs", lr=1e-2, model="mypkg.models:resnet", started=T0 + timedelta(hours=1))
    assert cmd_report([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "report.md").read_text()
    # labels say what differs (lr), not a run-id tail; a model column; a warning for the model
    assert "| tent lr 0.001 " in md and "| tent lr 0.01 " in md
    assert "small_cnn" in md and "resnet" in md
    assert "compared runs differ in model" in md and "compared runs differ in model" in capsys.readouterr().err
    assert "differ in manifest" not in md and "differ in batch size" not in md
    errors = pd.read_csv(tmp_path / "cmp" / "error_by_domain.csv")
    assert (errors["ci_low"] <= errors["error"]).all() and (errors["error"] <= errors["ci_high"]).all()
    # every cell of the markdown table carries its interval and n
    first = errors.iloc[0]
    assert f"{100 * first['error']:.1f} [{100 * first['ci_low']:.1f}, {100 * first['ci_high']:.1f}] n={first['scored']}" in md


def test_mean_is_the_mean_over_domains_and_protocol_differences_warn(tmp_path: Path, capsys) -> None:
    """`mean` was the pooled rows in `report` and the mean of domains in `compare` and campaigns; and
    runs of a different number of streams, setting or domain set were compared without a word."""
    import json

    from pipeline.analysis.report import error_cell_texts, error_table
    from pipeline.analysis.runs import RunSet, run_labels

    one = make_run(tmp_path / "runs", shards=1, n_per_domain=60)
    four = make_run(tmp_path / "runs", shards=4, domains=("shot_noise", "fog"), started=T0 + timedelta(hours=1))
    for run_dir, streams in ((one, 1), (four, 4)):
        meta = json.loads((run_dir / "run.json").read_text())
        meta["protocol"] = {"setting": "continual", "order_matters": True, "num_shards": streams,
                            "independent_streams": streams}
        (run_dir / "run.json").write_text(json.dumps(meta))
    runs = RunSet.from_dirs([one, four])
    labels = run_labels(runs)
    results = runs.results(["run_id", "domain", "position", "correct", "error", "adapter_source"])
    errors = error_table(results, runs, labels)
    texts = error_cell_texts(errors, labels)
    first = errors[errors["run_id"] == runs[0]["run_id"]]
    mean_of_domains = 100 * first["error"].mean()
    assert texts.iloc[0]["mean"].startswith(f"{mean_of_domains:.1f} [")
    assert list(texts.columns) == ["shot_noise", "fog", "rotate", "mean"]  # stream order
    assert texts.iloc[1]["rotate"] == "-"  # a domain the run does not have: no nan cell
    write_reports([one, four], out=tmp_path / "cmp")
    err = capsys.readouterr().err
    assert "differ in independent streams" in err and "differ in their domains" in err
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "`mean` = the mean over domains" in md and "nan" not in md
