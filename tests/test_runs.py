"""Run registry: queries, loading, one-scan reads, tidying and the `runs` CLI, on small but
real run directories written here with pyarrow in the layout of DESIGN.md ("Outputs")."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAFETY_S

from pipeline.analysis import runs as runs_module
from pipeline.analysis.runs import RunSet, new_run_id, query_runs
from pipeline.analysis.runs_cli import runs_main
from pipeline.job.provenance import ROOT, SOURCE_DIRS, source_hash
from ttt.schema import ANALYSIS_SCHEMA, LM_RESULT_SCHEMA, RESULTS_SCHEMA

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def make_run(root: Path, *, method: str = "tent", experiment: str = "exp", tag: str | None = None,
             status: str = "finished", model: str = "pipeline.embedded.model:small_cnn", lr: float = 1e-3,
             started: datetime = T0, domains: tuple[str, ...] = ("shot_noise", "fog", "rotate"),
             n_per_domain: int = 60, shards: int = 2, batch: int = 20, error_rows: int = 0, lm: bool = False,
             cache: bool = False, adapt: bool = True, seed: int = 0) -> Path:
    """Write one run directory (run.json, summary.json, Parquet parts per shard) and return it.

    `adapt=False` writes a `source`-like run: analysis with null losses, entropies and timings.
    `lm=True` writes LM rows: null `correct`, plus nll / n_bytes / bits_per_byte.
    """
    rng = np.random.default_rng(seed)
    run_id = new_run_id(method)
    run_dir = root / run_id
    results = []
    for d, domain in enumerate(domains):
        for k in range(n_per_domain):
            label = int(rng.integers(10))
            wrong = rng.random() < 0.1 + 0.2 * d
            row = {"run_id": run_id, "sample_id": f"{domain}-{k:05d}", "domain": domain, "method": method,
                   "prediction": (label + 1) % 10 if wrong else label, "label": label,
                   "correct": None if lm else not wrong, "confidence": float(rng.random()),
                   "entropy": float(rng.random()), "adapter_source": "cache" if cache and k % 3 else
                   ("fresh" if cache else "none"), "error": None}
            if lm:
                row.update(prediction=None, label=None, nll=float(rng.uniform(50, 80)), n_bytes=100, bits_per_byte=None)
            results.append(row)
    for row in results[:error_rows]:
        row.update(prediction=None, correct=None, confidence=None, entropy=None, error="cannot decode image")
    bounds = np.linspace(0, len(results), shards + 1).astype(int)
    results_schema = pa.schema(list(RESULTS_SCHEMA) + (list(LM_RESULT_SCHEMA) if lm else []))
    for shard in range(shards):
        rows = results[bounds[shard]:bounds[shard + 1]]
        for position, row in enumerate(rows, start=int(bounds[shard])):
            row.update(shard=shard, position=position)
        analysis = []
        for b, start in enumerate(range(0, len(rows), batch)):
            chunk = rows[start:start + batch]
            analysis.append({
                "run_id": run_id, "shard": shard, "batch_index": b, "sample_ids": [r["sample_id"] for r in chunk],
                "used_cache": (b % 3 != 0) if cache else None, "losses": [0.5 + 0.1 * b, 0.4] if adapt else None,
                "steps": 2 if adapt else None, "class_entropy": float(rng.uniform(0.6, 1.0)) if adapt else None,
                "domain": chunk[0]["domain"], "timing_fine_tuning": 0.02 if adapt else None,
                "timing_forward_pass": 0.01 if adapt else None, "timing_total": 0.035 if adapt else None,
                "timing_embedding": 0.002 if cache else None, "timing_cache_lookup": 0.001 if cache else None,
                "worker": f"w{shard}"})
        for kind, table in (("results", pa.Table.from_pylist(rows, schema=results_schema)),
                            ("analysis", pa.Table.from_pylist(analysis, schema=ANALYSIS_SCHEMA))):
            (run_dir / kind).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, run_dir / kind / f"part-{shard:05d}.parquet")
        (run_dir / "results" / f"_SUCCESS-{shard:05d}.json").write_text(json.dumps({"shard": shard}))
    scored = [r for r in results if r["correct"] is not None]
    per_domain = {}
    for domain in domains:
        rows = [r for r in scored if r["domain"] == domain]
        per_domain[domain] = {"n": len(rows), "error": 1 - sum(r["correct"] for r in rows) / len(rows) if rows else None}
    summary = {"overall": {"n": len(results), "error": 1 - sum(r["correct"] for r in scored) / len(scored) if scored else None,
                           "errors_rows": error_rows},
               "per_domain": {} if lm else per_domain,
               "cache": {"hits": 20, "misses": 10, "evictions": 4, "hit_rate": 2 / 3} if cache else None,
               "throughput": {"samples_per_s": 100.0, "wall_s": 1.8}}
    config = {"experiment": experiment, "seed": 0, "ttt": {"method": method, "lr": lr, "steps": 1},
              "workers": {"num_shards": shards}}
    meta = {"run_id": run_id, "experiment": experiment, "tag": tag, "status": status, "model": model,
            "method": method, "dataset": "mnistc", "config": config, "config_hash": "0123456789abcdef",
            "predict_from": "same_forward", "versions": {"python": "3.11.7"}, "git_commit": None,
            "started_at": started.isoformat(), "ended_at": None,
            "counts": {"rows": len(results), "errors": error_rows, "shards": shards, "restarts": 0},
            "cluster_resources": {"CPU": 2.0}, "error": None}
    (run_dir / "run.json").write_text(json.dumps(meta))
    if status == "finished":
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def zoo(tmp_path: Path) -> dict[str, str]:
    """Five runs that differ in one field each from a tent baseline, started an hour apart."""
    made = {
        "base": make_run(tmp_path, started=T0),
        "cotta": make_run(tmp_path, method="cotta", started=T0 + timedelta(hours=1)),
        "other_exp": make_run(tmp_path, experiment="ablation", tag="v2", started=T0 + timedelta(hours=2)),
        "lr": make_run(tmp_path, lr=1e-2, model="my.models:resnet", started=T0 + timedelta(hours=3)),
        "failed": make_run(tmp_path, status="failed", started=T0 + timedelta(hours=4)),
    }
    return {name: path.name for name, path in made.items()}


def test_query_filters(tmp_path: Path, zoo: dict[str, str]) -> None:
    def ids(**filters) -> set[str]:
        return set(query_runs(tmp_path, **filters).run_ids)

    assert ids() == set(zoo.values())
    assert ids(experiment="ablation") == {zoo["other_exp"]}
    assert ids(model="my.models:resnet") == {zoo["lr"]}
    assert ids(method="cotta") == {zoo["cotta"]}
    assert ids(method=["cotta", "nn"]) == {zoo["cotta"]}
    assert ids(tag="v2") == {zoo["other_exp"]}
    assert ids(status="failed") == {zoo["failed"]}
    assert ids(config={"ttt.lr": 1e-2}) == {zoo["lr"]}
    assert ids(config={"ttt.lr": 0.001, "ttt.method": "tent", "workers.num_shards": 2}) == \
        {zoo["base"], zoo["other_exp"], zoo["failed"]}
    assert ids(config={"ttt.no_such_key": 1}) == set()
    assert ids(method="tent", status="finished", experiment="exp") == {zoo["base"], zoo["lr"]}


def test_since_accepts_datetime_and_iso_strings(tmp_path: Path, zoo: dict[str, str]) -> None:
    later = {zoo["lr"], zoo["failed"]}
    assert set(query_runs(tmp_path, since=T0 + timedelta(hours=3)).run_ids) == later
    assert set(query_runs(tmp_path, since="2026-11-24T13:00:00+00:00").run_ids) == later
    assert set(query_runs(tmp_path, since="2026-11-24T13:00:00").run_ids) == later  # naive reads as UTC
    assert set(query_runs(tmp_path, since=datetime(2026, 11, 24, 14, 0)).run_ids) == {zoo["failed"]}


def test_runs_come_newest_last(tmp_path: Path, zoo: dict[str, str]) -> None:
    assert query_runs(tmp_path).run_ids == [zoo[k] for k in ("base", "cotta", "other_exp", "lr", "failed")]


def test_run_ids_are_unique_and_sort_by_start_time() -> None:
    ids = [new_run_id("tent") for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    stamps = [i.split("-tent-")[0] for i in ids]
    assert stamps == sorted(stamps)
    assert all("-tent-" in i for i in ids)


def test_run_ids_are_unique_across_processes() -> None:
    code = "from pipeline.analysis.runs import new_run_id\nprint('\\n'.join(new_run_id('tent') for _ in range(20000)))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=SAFETY_S)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs[0]) | set(outputs[1])) == 40_000


def test_load_round_trip_equals_what_was_written(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, shards=3, error_rows=5)
    runs = query_runs(tmp_path)
    results, analysis, meta = runs.load(0)
    assert meta == json.loads((run_dir / "run.json").read_text())
    for kind, frame in (("results", results), ("analysis", analysis)):
        written = pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / kind).glob("part-*.parquet"))])
        assert pa.Table.from_pandas(frame, schema=written.schema, preserve_index=False).equals(written), kind
    assert results["shard"].tolist() == sorted(results["shard"].tolist())
    assert results["error"].notna().sum() == 5


def test_to_frame_headline_columns(tmp_path: Path, zoo: dict[str, str]) -> None:
    frame = query_runs(tmp_path).to_frame()
    head = ["run_id", "experiment", "tag", "method", "model", "dataset", "status", "started_at", "n", "error"]
    assert list(frame.columns[:len(head)]) == head
    assert {"error/shot_noise", "error/fog", "error/rotate"} <= set(frame.columns)
    row = frame.set_index("run_id").loc[zoo["base"]]
    summary = json.loads((tmp_path / zoo["base"] / "summary.json").read_text())
    assert row["n"] == summary["overall"]["n"]
    assert row["error"] == pytest.approx(summary["overall"]["error"])
    assert row["error/rotate"] == pytest.approx(summary["per_domain"]["rotate"]["error"])
    failed = frame.set_index("run_id").loc[zoo["failed"]]
    assert failed["status"] == "failed" and np.isnan(failed["error"])  # no summary.json yet
    assert str(frame["started_at"].dt.tz) == "UTC"


def test_results_of_many_runs_are_one_scan(tmp_path: Path, zoo: dict[str, str], monkeypatch) -> None:
    lm_dir = make_run(tmp_path, method="nn", lm=True, started=T0 + timedelta(hours=5))
    scans = []
    real = runs_module.ds.dataset
    monkeypatch.setattr(runs_module.ds, "dataset", lambda *a, **k: scans.append(a[0]) or real(*a, **k))
    runs = query_runs(tmp_path)
    frame = runs.results()
    assert len(scans) == 1 and len(scans[0]) == 2 * len(runs)  # one dataset over every part file
    assert len(frame) == 6 * 180
    assert frame.groupby("run_id").size().to_dict() == {rid: 180 for rid in runs.run_ids}
    # The LM run adds columns; the other runs read them as null.
    assert frame.loc[frame["run_id"] == lm_dir.name, "nll"].notna().all()
    assert frame.loc[frame["run_id"] != lm_dir.name, "nll"].isna().all()
    assert len(runs.analysis(["run_id", "losses"])) == 6 * 2 * 5  # 2 shards of 90 rows in batches of 20
    with pytest.raises(ValueError, match="no results column"):
        runs.results(["no_such_column"])


def test_remove_and_rename_experiment(tmp_path: Path, zoo: dict[str, str]) -> None:
    runs = query_runs(tmp_path)
    runs.rename_experiment(0, "renamed")
    on_disk = json.loads((tmp_path / zoo["base"] / "run.json").read_text())
    assert on_disk["experiment"] == "renamed" and runs[0]["experiment"] == "renamed"
    assert on_disk["config"]["experiment"] == "exp"  # the resolved config stays the record of what ran
    assert not list((tmp_path / zoo["base"]).glob(".*tmp"))
    assert query_runs(tmp_path, experiment="renamed").run_ids == [zoo["base"]]

    runs.remove(1)
    assert not (tmp_path / zoo["cotta"]).exists()
    assert len(runs) == 4 and zoo["cotta"] not in runs.run_ids
    assert zoo["cotta"] not in query_runs(tmp_path).run_ids


def test_unreadable_run_json_is_skipped_with_a_warning(tmp_path: Path) -> None:
    good = make_run(tmp_path)
    bad = make_run(tmp_path, seed=1)
    (bad / "run.json").write_text('{"run_id": "trunc')
    (tmp_path / "no_run_json").mkdir()
    (tmp_path / "no_id").mkdir()
    (tmp_path / "no_id" / "run.json").write_text("{}")
    with pytest.warns(UserWarning, match="skipping") as caught:
        runs = query_runs(tmp_path)
    assert runs.run_ids == [good.name]
    assert len(caught) == 2  # a folder without run.json is not a run: no warning (an MLflow store, say)
    with pytest.raises(ValueError, match="not a readable run directory"):
        RunSet.from_dirs([bad])


def test_cli_list_show_compare(tmp_path: Path, zoo: dict[str, str], capsys) -> None:
    assert runs_main(["list", "--root", str(tmp_path), "--method", "tent", "--status", "finished"]) == 0
    out = capsys.readouterr().out
    assert zoo["base"] in out and zoo["cotta"] not in out and "error %" in out

    assert runs_main(["list", "--root", str(tmp_path), "--config", "ttt.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert zoo["lr"] in out and zoo["base"] not in out

    assert runs_main(["show", zoo["cotta"], "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cotta" in out and "rotate" in out and "config_hash" in out

    assert runs_main(["compare", zoo["base"], zoo["cotta"], "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["shot_noise", "fog", "rotate", "mean"]
    assert [line.split()[0] for line in lines[2:4]] == ["tent", "cotta"]

    assert runs_main(["show", "nope", "--root", str(tmp_path)]) == 2
    assert "matches no run" in capsys.readouterr().err
    assert runs_main(["list", "--root", str(tmp_path / "missing")]) == 2


def test_source_hash_names_the_code_that_ran(tmp_path: Path) -> None:
    """Equal for a copy of the sources (what `ray job submit` uploads, without .git); a one-byte
    edit changes it; bytecode caches and non-Python files do not."""
    for d in SOURCE_DIRS:
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_hash(tmp_path) == source_hash(ROOT)
    (tmp_path / "ttt" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "ttt" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (tmp_path / "ttt" / "notes.txt").write_text("not code")
    assert source_hash(tmp_path) == source_hash(ROOT)
    tent = tmp_path / "ttt" / "methods" / "tent.py"
    tent.write_bytes(tent.read_bytes() + b"\n")
    assert source_hash(tmp_path) != source_hash(ROOT)


# -- tidy rows for a pivot: run-level columns added at read time ---------------------------------------
def test_run_level_columns_and_the_config_fields_that_vary(tmp_path: Path, zoo: dict[str, str]) -> None:
    runs = query_runs(tmp_path, status="finished")
    frame = runs.results()
    stored = set(RESULTS_SCHEMA.names)
    assert {"setting", "model", "seed", "ttt.lr", "experiment", "corruption", "severity"} <= set(frame.columns)
    # only fields that differ among the runs; the run id, seed and method have columns of their own
    assert not {"ttt.steps", "workers.num_shards", "run_id.1", "ttt.method", "ttt.seed"} & set(frame.columns)
    assert set(frame.columns) - stored == {"setting", "model", "seed", "ttt.lr", "experiment"}
    lr = frame.groupby("run_id")["ttt.lr"].unique().map(list).to_dict()
    assert lr[zoo["lr"]] == [1e-2] and lr[zoo["base"]] == [1e-3]
    assert frame.groupby("run_id")["model"].first()[zoo["lr"]] == "my.models:resnet"
    assert frame["setting"].isna().all()  # the fixture's manifests say no setting
    # what a pivot needs, with no join by hand
    table = frame.pivot_table(values="correct", index="domain", columns=["method", "ttt.lr"], aggfunc="mean")
    assert table.shape == (3, 3)
    # explicit columns may name derived ones; unknown names are refused with the list of both kinds
    assert list(runs.analysis(["batch_index", "ttt.lr", "method"]).columns) == ["batch_index", "ttt.lr", "method"]
    with pytest.raises(ValueError, match="ttt.lr"):
        runs.results(["nope"])
    one = query_runs(tmp_path, method="cotta")
    assert "ttt.lr" not in one.results().columns  # nothing varies within one run
    per_run = runs.to_frame().set_index("run_id")
    assert per_run.loc[zoo["lr"], "ttt.lr"] == 1e-2 and "setting" in per_run and "seed" in per_run


def test_corruption_and_severity_from_the_domain_when_the_rows_lack_them(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, domains=("fog-5", "shot_noise-3", "clean"))
    for part in (run_dir / "results").glob("part-*.parquet"):  # as a run written before the columns existed
        pq.write_table(pq.read_table(part).drop_columns(["corruption", "severity"]), part)
    frame = query_runs(tmp_path).results(["domain", "corruption", "severity"]).drop_duplicates()
    got = {row.domain: (row.corruption, row.severity) for row in frame.itertuples()}
    assert got == {"fog-5": ("fog", 5), "shot_noise-3": ("shot_noise", 3), "clean": (None, pd.NA)}
    analysis = query_runs(tmp_path).analysis(["domain", "corruption", "severity"])
    assert set(zip(analysis["domain"], analysis["corruption"])) >= {("fog-5", "fog")}


@pytest.fixture
def layout_manifest(tmp_path: Path) -> Path:
    """A CIFAR-C layout of real digits (2 corruptions x 5 severity blocks of 16) and its mixed-domains
    manifest at severities 3 and 5, which carries `corruption` and `severity` columns and its setting."""
    from pipeline.benchmarks.layouts import build_manifest
    from pipeline.embedded.mnistc import split_digits

    split = split_digits(0)
    root = tmp_path / "DIGITS-C"
    root.mkdir()
    for k, corruption in enumerate(("fog", "shot_noise")):
        np.save(root / f"{corruption}.npy", np.concatenate([np.roll(split["x_test"][:16], k + s, axis=2) for s in range(5)]))
    np.save(root / "labels.npy", np.tile(split["y_test"][:16], 5))
    path, _ = build_manifest("cifar-c", root, tmp_path / "mixed.parquet", setting="mixed_domains",
                             corruptions=["fog", "shot_noise"], severities=[3, 5])
    return path


def test_tidy_rows_of_real_runs(small_default, layout_manifest: Path, tmp_path: Path) -> None:
    """Real Ray-free runs: two Tent runs on a benchmark manifest (corruption / severity columns, a
    setting) at two learning rates and seeds, and a source run on the MNIST-C stream (a severity
    column, plain corruption names as domains)."""
    from pipeline.config import load_config
    from pipeline.job.local import run_local

    def run(config: str, manifest: Path, *extra: str) -> None:
        run_local(load_config(REPO / "configs" / config, [
            f"data.manifest={manifest}", f"model.checkpoint={small_default['checkpoint']}",
            f"output_root={tmp_path / 'runs'}", "ttt.batch_size=16", *extra]), log=lambda _: None)

    run("mnistc_tent.yaml", layout_manifest, "run_id=a", "ttt.lr=0.001", "ttt.seed=0")
    run("mnistc_tent.yaml", layout_manifest, "run_id=b", "ttt.lr=0.01", "ttt.seed=1")
    run("mnistc_source.yaml", small_default["manifest"], "run_id=c", "data.limit=48")
    runs = query_runs(tmp_path / "runs")
    results = runs.results()
    by_run = results.groupby("run_id")
    assert by_run.size().to_dict() == {"a": 64, "b": 64, "c": 48}
    assert by_run["setting"].unique().map(list).to_dict() == {"a": ["mixed_domains"], "b": ["mixed_domains"], "c": [None]}
    assert by_run["seed"].first().to_dict() == {"a": 0, "b": 1, "c": 0}
    assert by_run["ttt.lr"].first()[["a", "b"]].tolist() == [0.001, 0.01]
    assert (results["model"] == "pipeline.embedded.model:small_cnn").all()
    bench = results[results["run_id"] != "c"]
    assert (bench["corruption"] + "-" + bench["severity"].astype(str) == bench["domain"]).all()
    assert set(bench["severity"]) == {3, 5}
    mnist = results[results["run_id"] == "c"]
    assert mnist["corruption"].isna().all() and (mnist["severity"] == 3).all()  # "shot_noise" names no severity
    pivot = bench.pivot_table(values="correct", index=["corruption", "severity"], columns="ttt.lr", aggfunc="mean")
    assert pivot.shape == (4, 2) and pivot.notna().all().all()
    analysis = runs.analysis()
    assert {"setting", "seed", "method", "ttt.lr", "corruption", "severity"} <= set(analysis.columns)
    first = analysis[analysis["run_id"] == "a"].iloc[0]
    assert first["corruption"] == first["domain"].split("-")[0] and first["method"] == "tent"
    frame = runs.to_frame().set_index("run_id")
    assert frame.loc["b", "setting"] == "mixed_domains" and frame.loc["b", "seed"] == 1
