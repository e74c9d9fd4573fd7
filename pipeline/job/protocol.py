"""The run's protocol, made explicit, and the checks that keep a run from passing silently.

- `resolve_shards(cfg, setting)`: `workers.num_shards` left unset means ONE stream when the result
  depends on stream order (a method that carries state from batch to batch: Tent, CoTTA, EATA, ...
  without `ttt.episodic`), else 2 shards (source, norm, LAME, nn without its cache, episodic runs:
  each batch is on its own, so shards change nothing but speed). A shard is an independent stream
  from the source model, so N shards of a continual stream are N shorter streams; asking for them
  (`--set workers.num_shards=4`) is allowed, and run.json, the summary and the report say so.
- `protocol(cfg, manifest_meta)`: run.json's `protocol` block: the setting, whether order matters,
  the shard count and how many independent streams the result is made of.
- `error_row_verdict(summary)`: a run whose every row is an error row fails in one line naming the
  most common error and its count; more than `ERROR_SHARE_WARN` of error rows is a warning.
- `no_update_note(cfg, rows_per_domain)`: Tent / EATA / norm ... with `predict_from=same_forward`
  and every domain one batch: no update reaches a prediction; the user is told.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

if TYPE_CHECKING:  # no import at run time: the summary printer and the registry use this module
    from pipeline.config import RunConfig

# Methods whose prediction of a batch depends on that batch alone (their state never carries on).
STATELESS_METHODS = frozenset({"source", "norm", "lame"})
ORDER_DEPENDENT_SETTINGS = ("continual", "gradual", "correlated", "mixed_domains", "reset_each_shift")
PARALLEL_SHARDS = 2  # the default for order-free runs (what every run had before)
ERROR_SHARE_WARN = 0.05  # more error rows than this share: a warning at the end of the run
UPDATING_METHODS = frozenset({"tent", "eata", "sar", "deyo", "cotta", "rotta", "roid", "mim"})


def carries_state(cfg: RunConfig) -> bool:
    """Whether a batch's prediction depends on the batches before it in the stream."""
    ttt = cfg.ttt
    if ttt.method == "nn":  # fine-tunes per query from the base state; only the shared cache carries on
        return bool(ttt.nn.use_cache)
    return not (ttt.episodic or ttt.method in STATELESS_METHODS)


def resolve_shards(cfg: RunConfig) -> RunConfig:
    """`workers.num_shards` unset: 1 for an order-dependent run, else PARALLEL_SHARDS."""
    if cfg.workers.num_shards is not None:
        return cfg
    shards = 1 if carries_state(cfg) else PARALLEL_SHARDS
    return cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"num_shards": shards})})


def protocol(cfg: RunConfig, manifest_meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """run.json's `protocol`: what a reader needs to know how many streams a number averages."""
    setting = (manifest_meta or {}).get("setting") or "unknown"
    order = carries_state(cfg)
    shards = int(cfg.workers.num_shards or 1)
    return {"setting": setting, "order_matters": order, "num_shards": shards,
            "independent_streams": shards if order else 1,
            "reset_on_domain_change": bool(cfg.ttt.reset_on_domain_change), "episodic": bool(cfg.ttt.episodic)}


def streams_text(proto: Mapping[str, Any] | None) -> str:
    """One line for the summary and the report, e.g. `one stream (setting continual)`."""
    if not proto:
        return "protocol not recorded (a run from before issue 23)"
    setting = proto.get("setting", "unknown")
    if not proto.get("order_matters"):
        return f"{proto.get('num_shards')} shard(s), order-free (each batch on its own; setting {setting})"
    n = proto.get("independent_streams", 1)
    if n == 1:
        return f"one stream (setting {setting})"
    return (f"{n} independent streams, each from the source model (setting {setting}; "
            f"workers.num_shards={n}: not the benchmark's single stream)")


def error_row_verdict(summary: Mapping[str, Any], top: Mapping[str, int] | None) -> tuple[str | None, str | None]:
    """(failure, warning): failure when every row is an error row, a warning above ERROR_SHARE_WARN.
    `top` maps error messages to their counts (most common first)."""
    overall = summary.get("overall") or {}
    n, bad = int(overall.get("n") or 0), int(overall.get("errors_rows") or 0)
    if n == 0 or bad == 0:
        return None, None
    common = ""
    if top:
        message, count = next(iter(top.items()))
        common = f"; most common ({count} x): {message}"
    if bad == n:
        return f"every row ({n}) is an error row{common}", None
    if bad / n > ERROR_SHARE_WARN:
        return None, f"{bad} of {n} rows ({100 * bad / n:.1f}%) are error rows, left out of the error rate{common}"
    return None, None


def no_update_note(cfg: RunConfig, predict_from: str, rows_per_domain: Mapping[str, int]) -> str | None:
    """The note when no update can reach a prediction: each domain is one batch, the prediction
    comes from the same forward as the loss, and the method resets at each domain (or episodically)."""
    ttt = cfg.ttt
    if ttt.method not in UPDATING_METHODS or predict_from != "same_forward" or not rows_per_domain:
        return None
    one_batch = all(n <= ttt.batch_size for n in rows_per_domain.values())
    resets = ttt.episodic or ttt.reset_on_domain_change or len(rows_per_domain) == 1
    if not (one_batch and resets):
        return None
    return (f"no update reached a prediction: each domain is one batch (batch_size {ttt.batch_size} >= "
            f"{max(rows_per_domain.values())} rows) and predict_from=same_forward predicts from the forward "
            f"that computes the loss, so {ttt.method} predicts like its unadapted model (tent, eata: like norm); "
            "use a smaller "
            "ttt.batch_size or ttt.predict_from=after_update")


def top_errors(run_dir: Path, k: int = 3) -> dict[str, int]:
    """The `k` most common error messages of a run's results and their counts (one column read)."""
    files = sorted(str(f) for f in (run_dir / "results").glob("part-*.parquet"))
    if not files:
        return {}
    column = ds.dataset(files, format="parquet").to_table(columns=["error"]).column("error").drop_null()
    if not len(column):
        return {}
    counts = pc.value_counts(column).to_pylist()
    counts.sort(key=lambda c: -c["counts"])
    return {str(c["values"])[:200]: int(c["counts"]) for c in counts[:k]}


def finish_checks(run_dir: Path, cfg: RunConfig, summary: Mapping[str, Any],
                  predict_from: str) -> tuple[str | None, list[str]]:
    """(failure, warnings) of a run whose shards are all committed: the error-row verdict and the
    no-update note; the job writes the warnings to summary.json and prints them at the end."""
    failure, warning = error_row_verdict(summary, top_errors(run_dir))
    warnings = [warning] if warning else []
    sizes = {d: int(v.get("n") or 0) for d, v in (summary.get("per_domain") or {}).items()}
    note = no_update_note(cfg, predict_from, sizes)
    if note:
        warnings.append(note)
    return failure, warnings
