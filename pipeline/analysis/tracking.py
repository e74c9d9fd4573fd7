"""Optional MLflow export: each run as an MLflow run, read from its run directory alone.

What one run becomes: params = the resolved config from run.json, flattened to dotted keys
(`ttt.lr`, `data.manifest`, ...); metrics = `error/overall` and `error/<domain>` per domain (and
bits per byte for LM runs) from summary.json, plus `rows` and `error_rows`; tags = run id, method,
status, campaign (run.json `tag`), model; artifacts = the run's `report/` files (written first when
missing) under `report/`. A campaign also gets one parent run carrying its table, pairs and
selection, and its cells become child runs (`mlflow.parentRunId`) named by their cell (with
their own report/ only where `python -m pipeline report` wrote one).

Where to: a tracking URI (`http://...`, `sqlite:///...`, `databricks`), or by default a local
file store `<output_root>/.mlruns` (the dot: the run registry never takes it for a run). MLflow 3 refuses file stores unless `MLFLOW_ALLOW_FILE_STORE`
is set; the export sets it for file URIs only, since a local store is what a laptop user wants and
the database backends need the full `mlflow` package (this project pins `mlflow-skinny`).
Exporting the same run twice is a no-op: a run already there (tag `ttt.run_id`) is skipped.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.analysis.report import REPORT_DIR, write_reports
from pipeline.analysis.runs import RunSet

RUN_TAG = "ttt.run_id"
BATCH_PARAMS = 100
PARAM_MAX = 500  # MLflow caps param values (6,000 chars in MLflow 3); long lists are cut, not refused


STORE_DIR = ".mlruns"  # under output_root; the dot keeps the run registry from reading it as a run
ONLINE_POINTS = 200  # step metrics along the stream per run, at most


def default_uri(output_root: str | Path) -> str:
    return (Path(output_root).resolve() / STORE_DIR).as_uri()


def run_params(meta: dict[str, Any]) -> dict[str, str]:
    """The resolved config as dotted params, without the knobs of methods that did not run
    (`ttt.cotta.*` on a Tent run), and `ttt.predict_from` as the run resolved it."""
    from ttt.config import TTTConfig

    config = json.loads(json.dumps(meta.get("config") or {}))
    ttt = config.get("ttt") or {}
    method = meta.get("method")
    for name, field in TTTConfig.model_fields.items():
        annotation = field.annotation
        if name not in ("guards", method) and isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            ttt.pop(name, None)
    if meta.get("predict_from"):
        ttt["predict_from"] = meta["predict_from"]
    return flat_params(config)


def run_tags(meta: dict[str, Any]) -> dict[str, str]:
    """Setting, seed, model and the number of independent streams, as tags to filter on."""
    from pipeline.analysis.plots import model_label

    proto = meta.get("protocol") or {}
    setting = proto.get("setting") or (meta.get("manifest_meta") or {}).get("setting")
    tags = {"ttt.setting": str(setting or "unknown"), "ttt.seed": str(((meta.get("config") or {}).get("ttt") or {}).get("seed")),
            "ttt.model_label": model_label(meta)}
    if proto:
        tags["ttt.streams"] = str(proto.get("independent_streams"))
    return tags


def online_metrics(run_dir: Path, stamp: int) -> list[Any]:
    """`error/online`: the error of each stretch of the stream (shards in order, ~ONLINE_POINTS
    stretches), with step = rows into the stream at its end: how adaptation moves along it."""
    from mlflow.entities import Metric

    runs = RunSet.from_dirs([run_dir])
    if "position" not in runs.schema("results").names:
        return []
    results = runs.results(["shard", "position", "correct"]).sort_values(["shard", "position"], kind="stable")
    scored = results["correct"].notna().to_numpy()
    wrong = (results["correct"] == False).to_numpy()  # noqa: E712  (nullable booleans)
    n = len(results)
    if not scored.any():
        return []
    size = max(1, -(-n // ONLINE_POINTS))
    out = []
    for start in range(0, n, size):
        k = int(scored[start:start + size].sum())
        if k:
            out.append(Metric("error/online", float(wrong[start:start + size].sum() / k), stamp, min(n, start + size)))
    return out


def _client(uri: str) -> Any:
    if uri.startswith("file:") or "://" not in uri and uri not in ("databricks",):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient  # optional dependency: imported only when exporting

    return MlflowClient(tracking_uri=uri)


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values; lists and dicts of leaves become JSON."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:PARAM_MAX]
    return out


def run_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's headline numbers as MLflow metrics (None values are left out)."""
    overall = summary.get("overall") or {}
    # `error/overall`, not `error`: a file store keeps `error/<domain>` under a folder named `error`
    metrics = {"error/overall": overall.get("error"), "rows": overall.get("n"), "error_rows": overall.get("errors_rows"),
               "bits_per_byte/overall": overall.get("bits_per_byte")}
    for domain, stats in (summary.get("per_domain") or {}).items():
        metrics[f"error/{domain}"] = (stats or {}).get("error")
        metrics[f"n/{domain}"] = (stats or {}).get("n")
        if (stats or {}).get("bits_per_byte") is not None:
            metrics[f"bits_per_byte/{domain}"] = stats["bits_per_byte"]
    return {k: float(v) for k, v in metrics.items() if v is not None}


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def _existing(client: Any, experiment_id: str, run_id: str) -> str | None:
    hits = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'", max_results=1)
    return hits[0].info.run_id if hits else None


def export_run(client: Any, experiment_id: str, run_dir: str | Path, *, name: str | None = None,
               parent: str | None = None, extra_tags: dict[str, str] | None = None, render: bool = True) -> str:
    """Log one run directory; returns the MLflow run id (the existing one if already exported).
    `render`: write the run's report first when it has none (else only an existing one is logged)."""
    runs = RunSet.from_dirs([run_dir])
    meta, summary = runs[0], runs.summary(0) or {}
    found = _existing(client, experiment_id, meta["run_id"])
    if found:
        return found
    tags = {RUN_TAG: meta["run_id"], "ttt.method": str(meta.get("method")), "ttt.status": str(meta.get("status")),
            "ttt.model": str(meta.get("model")), "mlflow.runName": name or meta["run_id"], **run_tags(meta)}
    if meta.get("tag"):
        tags["ttt.campaign"] = str(meta["tag"])
    if parent:
        tags["mlflow.parentRunId"] = parent
    tags.update(extra_tags or {})
    run = client.create_run(experiment_id, tags=tags)
    rid = run.info.run_id
    from mlflow.entities import Metric, Param

    params = [Param(k, v) for k, v in run_params(meta).items()]
    stamp = int(time.time() * 1000)
    metrics = [Metric(k, v, stamp, 0) for k, v in run_metrics(summary).items()]
    for i in range(0, max(len(params), 1), BATCH_PARAMS):  # log_batch takes at most 100 params a call
        client.log_batch(rid, metrics=metrics if i == 0 else [], params=params[i:i + BATCH_PARAMS])
    online = online_metrics(Path(run_dir), stamp)
    for i in range(0, len(online), 1000):  # log_batch takes at most 1000 metrics a call
        client.log_batch(rid, metrics=online[i:i + 1000])
    if (Path(run_dir) / "summary.json").is_file():
        client.log_artifact(rid, str(Path(run_dir) / "summary.json"))
    report = Path(run_dir) / REPORT_DIR
    if render and not (report / "report.md").is_file():
        write_reports([run_dir])
    if (report / "report.md").is_file():
        client.log_artifacts(rid, str(report), REPORT_DIR)
    client.set_terminated(rid, "FINISHED" if meta.get("status") == "finished" else "FAILED")
    return rid


def export_runs(run_dirs: list[str | Path], tracking_uri: str | None = None,
                experiment: str = "ttt-pipeline") -> tuple[str, list[str]]:
    """Log run directories (default store: <their output root>/mlruns); returns (uri, MLflow run ids)."""
    if not run_dirs:
        raise ValueError("no run directories to export")
    uri = tracking_uri or default_uri(Path(run_dirs[0]).parent)
    client = _client(uri)
    exp = _experiment_id(client, experiment)
    return uri, [export_run(client, exp, d) for d in run_dirs]


def export_campaign(campaign: Any, tracking_uri: str | None = None) -> str:
    """A parent run with the campaign's report files, and every finished cell as a child run."""
    uri = tracking_uri or default_uri(campaign.root)
    client = _client(uri)
    exp = _experiment_id(client, f"campaign-{campaign.name}")
    report = campaign.report()
    parent = _existing(client, exp, f"campaign:{campaign.name}")
    if parent is None:
        parent = client.create_run(exp, tags={RUN_TAG: f"campaign:{campaign.name}",
                                              "mlflow.runName": f"campaign {campaign.name}"}).info.run_id
        client.log_artifacts(parent, str(report.parent), "campaign")
        client.set_terminated(parent, "FINISHED")
    for cell in campaign.cells:
        run_dir = campaign.root / cell["run_id"]
        if (run_dir / "run.json").is_file():
            # each cell carries its params, metrics, summary.json and its own report (written when missing)
            export_run(client, exp, run_dir, name=cell["name"], parent=parent, render=True,
                       extra_tags={"ttt.role": cell["role"], "ttt.cell": cell["name"],
                                   "ttt.grid_point": str(cell.get("hp_name") or "-")})
    return uri
