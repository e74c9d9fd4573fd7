"""Datasets of the local lm-evaluation-harness tasks: the project's own rows, built offline.

lm_eval calls these through `custom_dataset: !function utils.NAME` with the task's
`dataset_kwargs` (cache_dir, seed, limit), so a harness run scores exactly the rows that
`python -m pipeline run` scores with data.dataset=text_choices / text (same sample ids).
"""
from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow.parquet as pq


def _rows(dataset: str, cache_dir: str, seed: int, limit: int | None) -> datasets.DatasetDict:
    from pipeline.embedded.text import ensure_text_manifest

    path = ensure_text_manifest(Path(cache_dir) / "text", dataset, seed)
    rows = pq.read_table(path).to_pylist()[:limit]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def text_choices(cache_dir: str = ".cache", seed: int = 0, limit: int | None = None, **_: object) -> datasets.DatasetDict:
    """Next-line 4-way questions (pipeline.embedded.text.choice_rows): text = context, choices, label."""
    return _rows("text_choices", cache_dir, seed, limit)


def text_queries(cache_dir: str = ".cache", seed: int = 0, limit: int | None = None, **_: object) -> datasets.DatasetDict:
    """The 200 held-out text chunks of the embedded corpus (bits per byte)."""
    return _rows("text", cache_dir, seed, limit)
