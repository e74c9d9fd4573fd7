"""Per-method analysis columns: a run's analysis parts hold the common columns plus those its method
declares (`analysis_columns`), typed by ttt/schema.py. Every registered method's records on a short
real stream carry exactly its declared columns; a Tent run's parts carry no SAR or RMT column; every
part of a run (chunks without an adapted batch too) has one schema; the registry reads runs of
several methods together, with nulls where a column does not apply."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_lm_nn import LORA, RecordingKB, embedder, text_kb  # noqa: F401  (module fixtures reused)
from test_new_methods import config as method_config
from test_nn import InProcessKB

from kb_index import build_kb
from kb_index.embedders import ImagePreprocess, TorchFeatureEmbedder
from pipeline.analysis.runs import query_runs
from pipeline.config import ConfigError, load_config
from pipeline.embedded.mnistc import load_train_split
from pipeline.embedded.model import SmallCNNRotation
from pipeline.job.local import run_local
from pipeline.job.runner import run_job
from ttt import TTTConfig, build_method
from ttt.methods import BY_KIND, METHODS, method_analysis_schema
from ttt.methods.tent import Tent
from ttt.schema import ANALYSIS_SCHEMA, COMMON_ANALYSIS_COLUMNS, UnknownColumnError, analysis_schema, to_table
from workers.adapters import ImageClassifierAdapter
from workers.lm_adapter import CausalLMAdapter
from workers.models import load_model
from workers.stream import run_stream

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "pipeline.embedded.model:small_cnn"
# columns only SAR, RMT (and its kin) or retrieval fill: a Tent run must not carry them
NOT_TENT = ("loss_ema", "recovered", "n_reliable", "loss_source", "loss_contrastive", "teacher_agreement",
            "support_size", "kalman_beta", "used_cache", "retrieved_indices", "mask_ratio")


@pytest.fixture(scope="module")
def digits(small_default):
    """80 real corrupted digits (5 batches of 16: RoTTA's memory bank updates at 64), the briefly
    trained embedded CNN's checkpoint, the clean training split, and a KB of 40 training digits."""
    rows = pq.read_table(small_default["manifest"]).to_pylist()[:80]
    x, y = load_train_split(small_default["manifest"])
    kb_dir = small_default["cache"] / "kb_columns"
    if not (kb_dir / "kb.json").exists():
        model = load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")
        corpus = [{"id": i, "label": int(lbl), "pixels": img.reshape(-1).tolist()} for i, (img, lbl) in
                  enumerate(zip(x[:40], y[:40]))]
        build_kb(corpus, kb_dir, TorchFeatureEmbedder(model, "cnn", ImagePreprocess()), progress=None)
    train = Path(small_default["manifest"]).parent / "train.npz"
    return {"rows": rows, "kb": InProcessKB(kb_dir), "train": str(train)}


def image_method(name: str, small_default, digits):
    torch.manual_seed(0)
    if name == "ttt":  # the rotation head it needs (not in the default CNN)
        model = SmallCNNRotation(width=8)
    else:
        model = load_model(FACTORY, str(small_default["checkpoint"]), {}, "cpu")
    adapter = ImageClassifierAdapter(model)
    extra = {"nn": {"k": 4}, "steps": 1, "batch_size": 4} if name == "nn" else {}
    cfg = TTTConfig(method=name, **{"batch_size": 16, **method_config(name, digits["train"]), **extra})
    return adapter, build_method(adapter, cfg, {"kb": digits["kb"]} if name == "nn" else None)


def written_columns(records: list[dict]) -> set[str]:
    return {k for rec in records for k in rec}


def test_the_schema_declares_every_common_column_and_refuses_others():
    assert set(COMMON_ANALYSIS_COLUMNS) <= set(ANALYSIS_SCHEMA.names)
    assert analysis_schema().names == [c for c in ANALYSIS_SCHEMA.names if c in COMMON_ANALYSIS_COLUMNS]
    assert analysis_schema(["mask_ratio"]).field("mask_ratio").type == ANALYSIS_SCHEMA.field("mask_ratio").type
    with pytest.raises(UnknownColumnError, match="made_up"):
        analysis_schema(["made_up"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_writes_exactly_the_columns_it_declares(name, small_default, digits):
    """The records' fields fit the declaration (to_table refuses any other) and the declaration names
    nothing the method never writes (a stale declaration would be an all-null column again)."""
    torch.set_num_threads(1)
    adapter, method = image_method(name, small_default, digits)
    out = run_stream(adapter, method, digits["rows"], run_id="r", shard=0, worker="w")
    assert len(out["results"]) == 80 and all(r["error"] is None for r in out["results"]), name
    schema = method_analysis_schema(name)
    table = to_table(out["analysis"], schema, "analysis")
    assert table.schema == schema and table.num_rows == len(out["analysis"]) > 0
    assert written_columns(out["analysis"]) == set(schema.names), name


def test_nn_on_a_causal_lm_writes_exactly_its_columns(tiny_lm_dir, text_kb, embedder):  # noqa: F811
    torch.manual_seed(0)
    adapter = CausalLMAdapter(tiny_lm_dir, lora=LORA, embedder=embedder)
    cfg = TTTConfig(method="nn", lr=1e-2, steps=1, batch_size=1, update_filter="adapter_only",
                    nn={"k": 2, "logit_lens_top_k": 2})
    method = build_method(adapter, cfg, {"kb": RecordingKB(text_kb["dir"])})
    assert type(method) is BY_KIND[("nn", "causal_lm")]
    rows = [{"sample_id": f"q{i}", "text": t, "domain": "pydoc"} for i, t in enumerate(text_kb["queries"][:2])]
    out = run_stream(adapter, method, rows, run_id="r", shard=0, worker="w")
    schema = method_analysis_schema("nn", "causal_lm")
    to_table(out["analysis"], schema, "analysis")
    # the class-distribution columns are common (a classifier's step fills them), null for an LM
    assert written_columns(out["analysis"]) == set(schema.names) - {"class_entropy", "max_class_prob", "unique_classes"}
    assert out["lens"]  # popped from the record before it is written


def test_a_field_the_method_does_not_declare_fails_loudly(small_default, digits):
    adapter, method = image_method("tent", small_default, digits)
    out = run_stream(adapter, method, digits["rows"][:16], run_id="r", shard=0, worker="w")
    out["analysis"][0]["loss_ema"] = 0.5  # a SAR column: in ANALYSIS_SCHEMA, not Tent's
    with pytest.raises(UnknownColumnError, match="loss_ema"):
        to_table(out["analysis"], method_analysis_schema("tent"), "analysis")


class BadColumns(Tent):
    """A plug-in method whose declaration names a column ttt/schema.py does not have."""

    analysis_columns = Tent.analysis_columns + ("my_metric",)


def test_a_plugin_declaring_an_unknown_column_is_refused_at_start(small_default, tmp_path):
    cfg = load_config(ROOT / "configs" / "mnistc_tent.yaml", [
        f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
        f"output_root={tmp_path / 'runs'}", "ttt.method=test_analysis_columns:BadColumns"])
    with pytest.raises(ConfigError, match=r"ttt.method=test_analysis_columns:BadColumns: .*'my_metric'"):
        run_local(cfg)
    assert not (tmp_path / "runs").exists()


class UndeclaredStats(Tent):
    """A plug-in method that fills a column (SAR's `n_reliable`) its class does not declare."""

    def loss(self, inputs):
        loss, logits, parts = super().loss(inputs)
        self.batch_stats = {"n_reliable": len(inputs)}
        return loss, logits, parts


def test_a_record_field_the_method_does_not_declare_fails_the_run_naming_it(small_default, tmp_path):
    cfg = load_config(ROOT / "configs" / "mnistc_tent.yaml", [
        f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
        f"output_root={tmp_path / 'runs'}", "data.limit=20", "ttt.method=test_analysis_columns:UndeclaredStats"])
    with pytest.raises(UnknownColumnError, match=r"UndeclaredStats: .*\['n_reliable'\].*`analysis_columns`"):
        run_local(cfg, log=lambda _: None)
    assert not list((tmp_path / "runs").glob("*/results/*.parquet"))  # nothing half-written


def part_schemas(run_dir: Path, kind: str) -> list:
    return [pq.read_schema(p).remove_metadata() for p in sorted((run_dir / kind).glob("part-*.parquet"))]


def test_runs_of_two_methods_keep_their_own_columns_and_read_together(ray_session, small_default, tmp_path):
    base = [f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
            f"output_root={tmp_path / 'runs'}", "ttt.batch_size=10", "workers.num_cpus=0.25",
            "workers.progress_interval_s=0.5"]
    # one chunk per batch, and the last 5 batches skipped: chunks with no analysis row at all
    tent_dir = run_job(load_config(ROOT / "configs" / "mnistc_tent.yaml",
                                   base + ["run_id=tent", "workers.checkpoint_every=1", "ttt.max_batches=10"]))
    sar = run_local(load_config(ROOT / "configs" / "mnistc_sar.yaml", base + ["run_id=sar"]))

    tent_parts = part_schemas(tent_dir, "analysis")
    # 15 batches a chunk each, then the end of the stream's own chunk: 10 parts with a row, 6 without
    assert len(tent_parts) == 16 and all(s == tent_parts[0] for s in tent_parts)
    assert sum(pq.read_metadata(p).num_rows == 0 for p in (tent_dir / "analysis").glob("part-*.parquet")) == 6
    assert tent_parts[0] == method_analysis_schema("tent")
    assert not set(NOT_TENT) & set(tent_parts[0].names)
    assert part_schemas(sar.run_dir, "analysis") == [method_analysis_schema("sar")]

    runs = query_runs(tmp_path / "runs")
    frame = runs.analysis()
    assert {"loss_ema", "recovered", "losses"} <= set(frame.columns)
    is_sar = frame["run_id"] == "sar"
    assert frame.loc[~is_sar, "loss_ema"].isna().all() and frame.loc[is_sar, "recovered"].notna().all()
    assert frame.loc[is_sar, "loss_ema"].notna().any()
    assert frame.groupby("method")["batch_index"].count().to_dict() == {"sar": 15, "tent": 10}
    assert np.array_equal(sorted(frame["run_id"].unique()), ["sar", "tent"])
