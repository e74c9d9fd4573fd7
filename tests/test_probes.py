"""Forgetting / transfer probes (workers/probe.py, pipeline/job/probes.py): they score the committed
state, equal to scoring that checkpoint by hand, and never change the stream's rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from pipeline.analysis.runs import query_runs
from pipeline.config import load_config
from pipeline.job.runner import run_job
from ttt import TTTConfig, build_method
from ttt.checkpoint import restore as restore_method
from workers.adapters import ImageClassifierAdapter
from workers.models import load_model
from workers.stream import stream_chunks

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "pipeline.embedded.model:small_cnn"


def _cfg(small_default, tmp_path, clean, *extra):
    return load_config(ROOT / "configs" / "mnistc_tent.yaml", [
        f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
        f"output_root={tmp_path / 'runs'}", "ttt.batch_size=25", "workers.num_shards=1", "workers.num_cpus=0.25",
        "workers.checkpoint_every=2", "workers.progress_interval_s=0.5", f"probes.clean={clean}",
        "probes.clean_n=40", "probes.per_domain=10", *extra])


def _hand_score(small_default, state, rows, batch_size=25):
    model = load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")
    adapter = ImageClassifierAdapter(model)
    method = build_method(adapter, TTTConfig(method="tent", batch_size=batch_size))
    method.reset()
    if state is not None:
        restore_method(method, state)
    wrong = 0
    for batch in adapter.build_loader(rows, batch_size=batch_size):
        with torch.no_grad():
            logits = method.predict_after_update(batch.inputs)
        wrong += int((logits.argmax(1).numpy() != np.asarray([r["label"] for r in batch.records])).sum())
    return wrong / len(rows)


def test_probes_score_the_committed_state_and_leave_the_rows_alone(ray_session, small_default, tmp_path):
    clean = tmp_path / "clean.parquet"
    pq.write_table(pq.read_table(small_default["manifest"]).slice(0, 40), clean)
    with_probes = run_job(_cfg(small_default, tmp_path, clean, "probes.every=1", "run_id=probed"))
    without = run_job(_cfg(small_default, tmp_path, clean, "run_id=plain"))
    a = pd.read_parquet(with_probes / "results").sort_values("position").drop(columns=["run_id"]).reset_index(drop=True)
    b = pd.read_parquet(without / "results").sort_values("position").drop(columns=["run_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)  # the stream's rows do not change

    probes = query_runs(tmp_path / "runs").probes()
    assert set(probes["run_id"]) == {"probed"}
    # 150 rows, batch 25: 6 batches, chunks of 2 -> states after batch 2, 4 (committed) and 6 (the end), + source
    assert sorted(probes.loc[probes["probe_set"] == "clean", "position"]) == [0, 50, 100, 150]  # each once
    sets = set(probes["probe_set"])
    assert "clean" in sets and len(sets) == 1 + len(set(pq.read_table(small_default["manifest"]).column("domain").to_pylist()))
    assert (probes.loc[probes["probe_set"] == "clean", "n"] == 40).all()

    # by hand: the same stream's checkpoints, restored into a fresh method, predicting the clean rows
    model = load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")
    adapter = ImageClassifierAdapter(model)
    cfg = _cfg(small_default, tmp_path, clean).ttt
    method = build_method(adapter, cfg)
    torch.manual_seed(cfg.seed)
    rows = pq.read_table(small_default["manifest"]).to_pylist()
    chunks = list(stream_chunks(adapter, method, rows, run_id="x", shard=0, worker="w", checkpoint_every=2,
                                final_state=True))
    states = {0: None, 50: chunks[0]["state"].method_state, 100: chunks[1]["state"].method_state,
              150: chunks[-1]["final_method_state"]}
    clean_rows = pq.read_table(clean).to_pylist()
    got = probes[probes["probe_set"] == "clean"].set_index("position")["error"]
    for position, state in states.items():
        assert np.isclose(got[position], _hand_score(small_default, state, clean_rows)), position
    nll = probes[probes["probe_set"] == "clean"].set_index("position")["nll"]
    assert nll[0] != nll[150]  # the adapted state is not the source's

    # the report draws them: one panel per probe set, the last state's error per set in report.md
    from pipeline.analysis.report import write_reports

    (report,) = write_reports([with_probes])
    assert (report.parent / "probes.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(report.parent / "probes.csv")
    assert len(table) == len(probes) and set(table["probe_set"]) == sets
    md = report.read_text()
    assert "## Forgetting and transfer (probes)" in md and f"{got[150] * 100:.1f}" in md
    (plain,) = write_reports([without])
    assert "probes" not in plain.read_text() and not (plain.parent / "probes.png").exists()
