"""What a run's results depend on beyond its config: the content of its inputs.

The config hash covers paths; a resume must also notice that the file behind a path changed
(a rewritten manifest, a retrained checkpoint) and refuse, instead of returning old results as
new. Manifests are fingerprinted cheaply from each Parquet file's size and footer (schema, row
counts and per-column statistics: any rewrite with other rows changes them), checkpoints and model
directories by a content hash memoised per file identity.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from kb_index.embedders import file_digest
from pipeline.manifest import manifest_files

_FOOTER_TAIL = 8  # Parquet ends with <footer length: 4 bytes LE><"PAR1">


def manifest_fingerprint(manifest: str | Path) -> str:
    digest = hashlib.sha256()
    root = Path(manifest)
    for f in manifest_files(manifest):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root) if f != root else f.name}:{size}:".encode())
        with f.open("rb") as fh:
            start = 0  # a file that is not Parquet is hashed whole (the manifest check refuses it anyway)
            if size >= 2 * _FOOTER_TAIL:
                fh.seek(size - _FOOTER_TAIL)
                tail = fh.read(_FOOTER_TAIL)
                if tail[4:] == b"PAR1":
                    start = max(0, size - _FOOTER_TAIL - struct.unpack("<I", tail[:4])[0])
            fh.seek(start)
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def model_fingerprint(model: dict[str, Any]) -> str | None:
    """The checkpoint file's digest, or for a causal LM every file of its model directory."""
    if model.get("kind") == "causal_lm" and model.get("path"):
        folder = Path(model["path"])
        parts = {f.name: file_digest(f) for f in sorted(folder.iterdir()) if f.is_file()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    checkpoint = model.get("checkpoint")
    if checkpoint and Path(checkpoint).is_file():
        return file_digest(checkpoint)
    return None


def inputs_fingerprint(manifest: str | Path, model: dict[str, Any]) -> dict[str, str | None]:
    return {"manifest": manifest_fingerprint(manifest), "model": model_fingerprint(model)}


def run_fingerprint(config_hash: str, inputs: dict[str, str | None]) -> str:
    """What a shard's success marker records: config and input content together."""
    key = json.dumps({"config": config_hash, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
