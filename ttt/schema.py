"""Every output column, in one place: the results (one row per manifest row), the analysis
record (one row per adapted batch or query) and the logit-lens rows, with their Arrow types.

Writers (pipeline/job/outputs.py), the stream that builds rows (workers/stream.py), the analysis
record (ttt/record.py), readers and reports all take their columns from here, so adding a metric
is one edit here (and, for an analysis column only some methods fill, its name in their
`analysis_columns`), and a field a row carries that its schema does not hold fails loudly
(`check_fields`) instead of vanishing. Pure pyarrow, no Ray.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa

RESULTS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("sample_id", pa.string()), ("shard", pa.int32()), ("position", pa.int64()),
    ("domain", pa.string()), ("method", pa.string()), ("prediction", pa.int64()), ("label", pa.int64()),
    ("correct", pa.bool_()), ("confidence", pa.float64()), ("entropy", pa.float64()),
    ("adapter_source", pa.string()), ("error", pa.string()),
    # evaluation protocol and calibration (ttt/protocol.py, ttt/calibration.py): whether the method's
    # step ran on the row's batch (False: the online protocol predicted it unadapted), the probability
    # of the true label, and the row's Brier score sum_k (p_k - [k = label])^2
    ("adapted", pa.bool_()), ("label_prob", pa.float64()), ("brier", pa.float64()),
    # the row's manifest columns of the same names, passed through when the manifest has them (the
    # benchmark layouts write both; pipeline/manifest.py checks their types), else null
    ("corruption", pa.string()), ("severity", pa.int32()),
])
# outputs.save_probs (classifiers): the softmax of the logits the row's prediction came from, so
# calibration and ensembles can be computed afterwards; off by default (C floats per row)
PROBS_SCHEMA = pa.schema([("probs", pa.list_(pa.float32()))])
# causal-LM rows add these (multiple-choice rows also `choice_logliks`)
LM_RESULT_SCHEMA = pa.schema([
    ("nll", pa.float64()), ("n_tokens", pa.int64()), ("n_bytes", pa.int64()), ("bits_per_byte", pa.float64()),
    ("choice_logliks", pa.list_(pa.float64())),
])

ANALYSIS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("shard", pa.int32()), ("batch_index", pa.int64()),
    ("sample_ids", pa.list_(pa.string())), ("query", pa.string()), ("used_cache", pa.bool_()),
    ("cache_query", pa.string()), ("retrieved_indices", pa.list_(pa.int64())),
    ("retrieved_scores", pa.list_(pa.float64())), ("losses", pa.list_(pa.float64())),
    ("loss_entropy", pa.float64()), ("loss_diversity", pa.float64()), ("steps", pa.int64()),
    ("stop_reason", pa.string()), ("updated_param_count", pa.int64()), ("mask_ratio", pa.float64()),
    ("class_entropy", pa.float64()), ("max_class_prob", pa.float64()), ("unique_classes", pa.int64()),
    ("diversity_weight", pa.float64()), ("grad_norm", pa.float64()), ("domain", pa.string()),
    ("corruption", pa.string()), ("severity", pa.int32()),  # of the batch's first row, as `domain`
    ("timing_embedding", pa.float64()), ("timing_cache_lookup", pa.float64()),
    ("timing_kb_retrieval", pa.float64()), ("timing_fine_tuning", pa.float64()),
    ("timing_forward_pass", pa.float64()), ("timing_wait_input", pa.float64()), ("timing_total", pa.float64()),
    ("worker", pa.string()),
    # what the baselines' sample filters and mechanisms did on the batch (None where not applicable):
    # samples under the entropy margin (EATA, SAR, DeYO), dropped as redundant (EATA) or by PLPD
    # (DeYO), samples in the loss, their mean loss weight (EATA, DeYO, ROID, RoTTA), SAR's moving
    # average of the entropy and whether it recovered the source model, RoTTA's memory-bank size,
    # and how many predictions LAME changed against the model's own.
    ("n_reliable", pa.int64()), ("n_filtered_redundant", pa.int64()), ("n_filtered_plpd", pa.int64()),
    ("n_loss_samples", pa.int64()), ("sample_weight_mean", pa.float64()), ("loss_ema", pa.float64()),
    ("recovered", pa.bool_()), ("memory_size", pa.int64()), ("n_changed", pa.int64()),
    # the methods of issue 25: the contrastive term (RMT, SANTA: prototypes; AdaContrast: MoCo instance
    # loss), RMT's source-replay cross-entropy, how often the teacher / key model agrees with the
    # student's argmax (RMT, AdaContrast), pseudo-labels the nearest-neighbour refinement changed
    # (AdaContrast), T3A's support-set size, CMF's Kalman gain, the entropy of the mean prediction
    # (SHOT-IM's diversity term, MEMO's marginal entropy over augmentations) and TTT's rotation accuracy
    # on the batch before its update (the paper's self-supervised error is 1 minus it)
    ("loss_contrastive", pa.float64()), ("loss_source", pa.float64()), ("teacher_agreement", pa.float64()),
    ("n_refined", pa.int64()), ("support_size", pa.int64()), ("kalman_beta", pa.float64()),
    ("marginal_entropy", pa.float64()), ("rotation_accuracy", pa.float64()),
    # protocol and cost (ttt/protocol.py, ttt/passes.py): adapted on (online), reset to the source
    # before it (ttt.reset_every), forward / backward passes per sample, the worker's peak memory (MiB)
    ("adapted", pa.bool_()), ("periodic_reset", pa.bool_()), ("forward_passes", pa.float64()),
    ("backward_passes", pa.float64()), ("peak_rss_mb", pa.float64()), ("peak_gpu_mb", pa.float64()),
])

# ttt.nn.logit_lens_top_k > 0 (causal LMs): one row per (query, stage, layer, rank)
LENS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("shard", pa.int32()), ("batch_index", pa.int64()), ("sample_id", pa.string()),
    ("stage", pa.string()), ("layer", pa.int32()), ("position", pa.int64()), ("rank", pa.int32()),
    ("token_id", pa.int64()), ("token", pa.string()), ("prob", pa.float64()), ("entropy", pa.float64()),
    ("target_prob", pa.float64()),
])

# probes (workers/probe.py, pipeline/job/probes.py): one row per (shard, committed state, probe set);
# position = rows of the shard consumed when the state was committed (0 = the source model)
PROBES_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("shard", pa.int32()), ("chunk", pa.int64()), ("position", pa.int64()),
    ("batch_index", pa.int64()), ("probe_set", pa.string()), ("n", pa.int64()), ("error", pa.float64()),
    ("ece", pa.float64()), ("nll", pa.float64()), ("brier", pa.float64()), ("seconds", pa.float64()),
])

ANALYSIS_FIELDS: tuple[str, ...] = tuple(ANALYSIS_SCHEMA.names)
# The analysis columns of every run, whatever its method: what the stream records about each batch
# (workers/stream.py) and what every method's step reports (ttt/methods/base.py `Method.step`). A
# method adds the columns it fills (`analysis_columns` on its class), and a run's analysis parts hold
# just those (`analysis_schema`), so a Tent run carries no all-null SAR or RMT columns; the registry
# reads runs of several methods together with nulls where a column does not apply.
COMMON_ANALYSIS_COLUMNS: tuple[str, ...] = (
    "run_id", "shard", "batch_index", "sample_ids", "domain", "corruption", "severity", "worker",
    "steps", "stop_reason", "updated_param_count", "class_entropy", "max_class_prob", "unique_classes",
    "timing_forward_pass", "timing_fine_tuning", "timing_wait_input", "timing_total",
    "adapted", "periodic_reset", "forward_passes", "backward_passes", "peak_rss_mb", "peak_gpu_mb",
)


def measured(column: str) -> bool:
    """Whether an analysis column is measured (wall-clock seconds, peak memory) rather than computed:
    two runs with the same seed and shards agree on every other column, never on these."""
    return column.startswith(("timing_", "peak_"))


class UnknownColumnError(KeyError):
    """A row carries a field no output schema declares."""


def results_schema(rows: Iterable[dict[str, Any]], probs: bool = False) -> pa.Schema:
    """The results schema for these rows: LM columns when any row scored text, `probs` when the run
    keeps them (a run-level choice, not the rows': every part of the run has the column)."""
    lm = any("bits_per_byte" in r for r in rows)
    return pa.schema(list(RESULTS_SCHEMA) + (list(LM_RESULT_SCHEMA) if lm else []) + (list(PROBS_SCHEMA) if probs else []))


def analysis_schema(columns: Iterable[str] = ()) -> pa.Schema:
    """The analysis schema of a method that fills `columns` besides the common ones, in
    ANALYSIS_SCHEMA's order and types; a name ANALYSIS_SCHEMA does not declare is refused."""
    wanted = set(COMMON_ANALYSIS_COLUMNS) | set(columns)
    unknown = wanted - set(ANALYSIS_FIELDS)
    if unknown:
        raise UnknownColumnError(f"analysis column(s) {sorted(unknown)} are not declared in ttt/schema.py's ANALYSIS_SCHEMA")
    return pa.schema([f for f in ANALYSIS_SCHEMA if f.name in wanted])


def check_fields(rows: Iterable[dict[str, Any]], schema: pa.Schema, what: str) -> None:
    known = set(schema.names)
    for row in rows:
        unknown = set(row) - known
        if unknown:
            raise UnknownColumnError(f"{what} row has field(s) {sorted(unknown)} that its schema does not hold "
                                     "(ttt/schema.py declares every column)")


def to_table(rows: list[dict[str, Any]], schema: pa.Schema, what: str = "output") -> pa.Table:
    """Rows -> a table of exactly `schema`'s columns (missing fields are null, unknown ones fail)."""
    check_fields(rows, schema, what)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
