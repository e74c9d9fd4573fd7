"""Run identity and provenance: unique run ids, package versions, the git commit, the source hash."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import secrets
import subprocess
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("pipeline", "workers", "ttt", "kb_index")  # the code a run executes
_PACKAGES = ("torch", "ray", "faiss-cpu", "pyarrow", "pandas", "numpy", "transformers", "peft", "ttt-pipeline")


def new_run_id(method: str) -> str:
    """Sortable by start time and unique across processes: microsecond UTC stamp + random suffix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S-%f")
    return f"{stamp}-{method}-{secrets.token_hex(3)}"


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The project's commit: $TTT_GIT_COMMIT when set (what `ray job submit` users pass, since the
    uploaded working dir has no .git), else `git rev-parse HEAD` in the source tree."""
    if os.environ.get("TTT_GIT_COMMIT"):
        return os.environ["TTT_GIT_COMMIT"]
    cwd = Path(path) if path else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def source_hash(root: str | os.PathLike = ROOT) -> str:
    """sha256 over the project's Python sources (each file's path and bytes, in path order): which
    code ran, recorded also where there is no .git to ask (`ray job submit` uploads the working
    directory without it). Two runs with the same hash ran the same pipeline, workers and methods."""
    digest = hashlib.sha256()
    base = Path(root)
    for path in sorted(p for d in SOURCE_DIRS for p in (base / d).rglob("*.py")):
        digest.update(path.relative_to(base).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()
