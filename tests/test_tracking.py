"""MLflow export, read back with MLflow's own client from the local file store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")  # pinned in requirements.lock: skipped only where it is not installed

from test_runs import make_run  # noqa: E402
from test_sweep import spec_dict, write_run  # noqa: E402

from pipeline.analysis.tracking import export_campaign, export_runs  # noqa: E402
from pipeline.campaigns.campaign import Campaign  # noqa: E402
from pipeline.campaigns.spec import expand, parse_sweep  # noqa: E402
from pipeline.campaigns.sweep import write_campaign  # noqa: E402


def test_runs_round_trip_through_mlflow(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    tent = make_run(root, lr=0.01)
    meta = json.loads((tent / "run.json").read_text())
    meta["config"]["ttt"].update(seed=3, cotta={"mt": 0.999})  # a real run's config holds every method's block
    (tent / "run.json").write_text(json.dumps(meta))
    source = make_run(root, method="source", adapt=False)
    uri, ids = export_runs([tent, source])
    assert uri == (root / ".mlruns").resolve().as_uri()
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(ids[0])
    meta = json.loads((tent / "run.json").read_text())
    summary = json.loads((tent / "summary.json").read_text())
    assert run.data.tags["ttt.run_id"] == meta["run_id"] and run.data.tags["ttt.method"] == "tent"
    assert run.data.params["ttt.lr"] == "0.01" and run.data.params["workers.num_shards"] == "2"
    assert run.data.metrics["error/overall"] == pytest.approx(summary["overall"]["error"])
    for domain, stats in summary["per_domain"].items():
        assert run.data.metrics[f"error/{domain}"] == pytest.approx(stats["error"])
    artifacts = {a.path for a in client.list_artifacts(ids[0], "report")}
    assert {"report/report.md", "report/error_by_domain.csv", "report/error_by_domain.png"} <= artifacts
    assert run.info.status == "FINISHED"
    # the params of the method that ran, predict_from as resolved; setting / seed / model as tags
    assert not any(k.startswith(("ttt.cotta.", "ttt.eata.")) for k in run.data.params)
    assert run.data.params["ttt.predict_from"] == "same_forward"
    assert run.data.tags["ttt.seed"] == "3" and run.data.tags["ttt.model_label"] == "small_cnn"
    assert "ttt.setting" in run.data.tags
    online = client.get_metric_history(ids[0], "error/online")
    assert len(online) > 10 and [m.step for m in online] == sorted(m.step for m in online)
    assert "summary.json" in {a.path for a in client.list_artifacts(ids[0])}
    # the store lives under the output root, and the registry never mistakes it for a run
    import warnings

    from pipeline.analysis.runs import query_runs

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(query_runs(root)) == 2
    # exporting again adds nothing
    assert export_runs([tent, source])[1] == ids
    assert len(client.search_runs([run.info.experiment_id])) == 2


def test_campaign_export_has_a_parent_and_child_runs(tmp_path: Path) -> None:
    spec = parse_sweep(spec_dict(tmp_path))
    cells = expand(spec)
    write_campaign(spec, cells)
    for c in cells:
        write_run(tmp_path, c, 0.2 + 0.1 * c.config.ttt.seed)
    uri = export_campaign(Campaign(tmp_path, "camp"), f"file://{tmp_path / 'store'}")
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("campaign-camp")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = [r for r in runs if r.data.tags.get("ttt.run_id") == "campaign:camp"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == len(cells)
    assert {a.path for a in client.list_artifacts(parent[0].info.run_id, "campaign")} >= {
        "campaign/table.csv", "campaign/pairs.csv", "campaign/report.md", "campaign/table.png"}
    roles = {r.data.tags["ttt.cell"]: r.data.tags["ttt.role"] for r in children}
    child = children[0].info.run_id  # each cell with its summary and its own report
    assert "summary.json" in {a.path for a in client.list_artifacts(child)}
    assert "report/report.md" in {a.path for a in client.list_artifacts(child, "report")}
    assert roles["val-tent-seed1-lr0.01"] == "validation" and roles["tent-seed1-lr0.01"] == "test"
