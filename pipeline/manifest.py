"""The manifest format, shared by every room: its Parquet files, the row groups this project writes,
the setting metadata in its schema, and the checks run on the driver before Ray starts (a bad
manifest is a one-line error naming the file and the column or row, never a crash inside a worker).
Imports nothing else of `pipeline`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Rows per Parquet row group in the manifests this project writes: decode tasks read a few hundred
# rows at a time and Parquet reads whole groups, so small groups keep each read proportionate.
ROW_GROUP_ROWS = 4096
META_KEY = b"ttt_pipeline.manifest"  # JSON: the setting and build parameters a manifest was written with


class ManifestError(ValueError):
    pass


def check_manifest(path: str | Path, kind: str = "image_classifier") -> int:
    """Validate columns and sample_id uniqueness; return the row count."""
    p = Path(path)
    if not p.exists():
        raise ManifestError(f"manifest not found: {p}")
    if p.is_dir() and not manifest_files(p):
        raise ManifestError(f"manifest directory {p} holds no Parquet files")
    try:
        schema = pq.read_schema(p) if p.is_file() else pq.ParquetDataset(p).schema
    except Exception as exc:
        raise ManifestError(f"manifest {p} is not readable Parquet: {str(exc).splitlines()[0]}") from None
    names = set(schema.names)
    # the results carry these two through per row (ttt/schema.py types them: string, int32)
    for name, fits, what in (("corruption", _is_text, "text"), ("severity", pa.types.is_integer, "integers")):
        if name in names and not fits(schema.field(name).type):
            raise ManifestError(f"manifest {p}: column {name!r} must hold {what}, not {schema.field(name).type} "
                                "(the results carry it per row)")
    if "sample_id" not in names:
        raise ManifestError(f"manifest {p}: missing column 'sample_id'")
    payload = ("text",) if kind == "causal_lm" else ("path", "pixels")
    if not names.intersection(payload):
        raise ManifestError(f"manifest {p}: needs a column {' or '.join(repr(c) for c in payload)}")
    try:
        ids = pq.read_table(p, columns=["sample_id"]).column("sample_id")
    except Exception as exc:  # parts with clashing schemas, a truncated file
        raise ManifestError(f"manifest {p}: column 'sample_id' is not readable: {str(exc).splitlines()[0]}") from None
    if len(ids) == 0:
        raise ManifestError(f"manifest {p} has no rows")
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise ManifestError(f"manifest {p}: row {row} has no sample_id")
    # sorted, then neighbours compared, all in Arrow: a hash count (or one Python dict per id) took the
    # driver's peak memory up by 0.2-0.4 GB at 1.5M rows
    ids = ids.combine_chunks()
    bad = utf8_errors(ids)  # Parquet does not check UTF-8 on write; every later step would fail on it
    if bad is not None:
        row = next(i for i, why in enumerate(bad) if why)
        raise ManifestError(f"manifest {p}: row {row}'s sample_id is not valid UTF-8 ({bad[row]})")
    ids = ids.cast("string")
    ordered = ids.take(pc.sort_indices(ids))
    repeated = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    if pc.any(repeated).as_py():
        dup = pc.unique(ordered.slice(1).filter(repeated))
        raise ManifestError(f"manifest {p}: sample_id {dup[0].as_py()!r} appears more than once ({len(dup)} duplicated ids)")
    return len(ids)


def _is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def utf8_errors(column: pa.Array) -> list[str | None] | None:
    """None when every value of a string or binary column is valid UTF-8 (or it is neither);
    else, per value, why it is not (None for the valid ones)."""
    if not (pa.types.is_string(column.type) or pa.types.is_binary(column.type)):
        return None
    try:
        column.cast(pa.string()).validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    errors: list[str | None] = []
    for raw in column.view(pa.binary()).to_pylist():
        try:
            if raw is not None:
                raw.decode("utf-8")
            errors.append(None)
        except UnicodeDecodeError as exc:
            errors.append(f"byte {raw[exc.start]:#04x} at offset {exc.start}")
    return errors


def manifest_files(manifest: str | Path) -> list[Path]:
    """The Parquet files of a manifest (one file, or a directory of parts), in a stable order."""
    p = Path(manifest)
    if p.is_file():
        return [p]
    return sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith((".", "_")))


def write_manifest(table: pa.Table, meta: dict[str, Any], path: str | Path) -> Path:
    """Write the ordered manifest with `meta` in its schema metadata (atomically: temp + rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = dict(table.schema.metadata or {})
    existing[META_KEY] = json.dumps(meta, sort_keys=True).encode()
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table.replace_schema_metadata(existing), tmp, row_group_size=ROW_GROUP_ROWS)
    os.replace(tmp, out)
    return out


def read_manifest_meta(path: str | Path) -> dict[str, Any]:
    """The setting and build parameters a manifest was written with; {} for a manifest without them
    (e.g. one the user wrote by hand). A directory manifest is read from its first Parquet file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
        if not files:
            return {}
        p = files[0]
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    raw = (pq.read_schema(p).metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}
