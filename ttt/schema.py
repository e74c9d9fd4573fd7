"""Every output column, in one place: the results (one row per manifest row), the analysis
record (one row per adapted batch or query) and the logit-lens rows, with their Arrow types.

Writers (pipeline/job/outputs.py), the stream that builds rows (workers/stream.py), the analysis
record (ttt/record.py), readers and reports all take their columns from here, so adding a metric
is one edit here and a field a row carries that is not declared here fails loudly
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
])
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


class UnknownColumnError(KeyError):
    """A row carries a field no output schema declares."""


def results_schema(rows: Iterable[dict[str, Any]]) -> pa.Schema:
    """The results schema for these rows: LM columns when any row scored text."""
    lm = any("bits_per_byte" in r for r in rows)
    return pa.schema(list(RESULTS_SCHEMA) + (list(LM_RESULT_SCHEMA) if lm else []))


def check_fields(rows: Iterable[dict[str, Any]], schema: pa.Schema, what: str) -> None:
    known = set(schema.names)
    for row in rows:
        unknown = set(row) - known
        if unknown:
            raise UnknownColumnError(f"{what} row has field(s) {sorted(unknown)} that ttt/schema.py does not declare")


def to_table(rows: list[dict[str, Any]], schema: pa.Schema, what: str = "output") -> pa.Table:
    """Rows -> a table of exactly `schema`'s columns (missing fields are null, unknown ones fail)."""
    check_fields(rows, schema, what)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
