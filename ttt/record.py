"""The per-query (or per-batch) analysis record: one row of `analysis/` Parquet.

A record holds the fields its method filled plus what the stream adds (the common columns of
ttt/schema.py); the writer makes each row of a run's analysis parts hold exactly the run's columns
(`ttt.schema.analysis_schema` of the method's `analysis_columns`), null where a record left one
out. The names and types are ttt/schema.py's.
"""
from __future__ import annotations

from typing import Any

from ttt.schema import ANALYSIS_FIELDS


def new_record(**fields: Any) -> dict[str, Any]:
    unknown = set(fields) - set(ANALYSIS_FIELDS)
    if unknown:
        raise KeyError(f"not analysis fields: {sorted(unknown)}")
    return dict(fields)
