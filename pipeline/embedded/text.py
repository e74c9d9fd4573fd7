"""The embedded text default: a corpus built offline from text that ships with Python (the tiny
GPT-2 trained on it: pipeline/embedded/tiny_lm.py).

Why: retrieval TTT for language models needs a KB, held-out queries and a small LM that runs
on a laptop CPU, with no hub download. Sources: `pydoc_data.topics` (the Python reference
topics) and a deterministic subset of the standard library's own top-level `.py` files.

Layout under `cache_dir` (default `.cache/text`):
  corpus/  train.parquet (text, source: the LM's training text), kb.parquet (id, text,
           source, in_lm_train: the KB corpus), queries.parquet (sample_id, text, source,
           domain, position: held-out evaluation chunks), build.json
  tiny_gpt2-<key>/  save_pretrained model + tokenizer, train.json (settings, timings, losses)

Split: documents are cut into chunks of ~512-1500 bytes at paragraph (blank line)
boundaries, exact duplicates dropped, then a seeded permutation takes `n_queries` chunks as
queries; every other chunk goes into the KB, and all KB chunks but a `val_fraction` train
the LM. The KB thus holds text the LM saw (as in Hardt & Sun, whose index was built from the
training set) and some it never saw (its validation set). Queries are in neither.
Each output's presence marks its build finished (written last, via rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MIN_BYTES, MAX_BYTES = 512, 1500
DONE = "DONE"  # marker written last in the model directory


class TextBuildError(ValueError):
    pass


# -- documents --------------------------------------------------------------------------
def pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc:{key}", topics[key]) for key in sorted(topics)]


def stdlib_documents(max_bytes: int = 1_600_000) -> list[tuple[str, str]]:
    """Top-level stdlib modules, taken in order of a hash of their name until `max_bytes`.

    Hashing the name spreads the pick over the alphabet while staying the same on every
    machine with the same Python; private (`_x.py`) and joke modules are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"this.py", "antigravity.py"}
    files = [p for p in root.glob("*.py") if not p.name.startswith("_") and p.name not in skip]
    files.sort(key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    docs, total = [], 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        if total + len(text.encode()) > max_bytes:
            continue
        docs.append((f"stdlib:{p.name}", text))
        total += len(text.encode())
    return sorted(docs)


# -- chunking ------------------------------------------------------------------------------
def _split_long(paragraph: str, max_bytes: int) -> list[str]:
    """Cut a paragraph above max_bytes at line ends (or, for one huge line, at characters)."""
    pieces, current = [], ""
    for line in paragraph.split("\n"):
        while len(line.encode()) > max_bytes:
            cut = len(line.encode()[:max_bytes].decode("utf-8", errors="ignore"))
            pieces.append(line[:cut])
            line = line[cut:]
        candidate = f"{current}\n{line}" if current else line
        if current and len(candidate.encode()) > max_bytes:
            pieces.append(current)
            current = line
        else:
            current = candidate
    if current:
        pieces.append(current)
    return pieces


def chunk_document(text: str, min_bytes: int = MIN_BYTES, max_bytes: int = MAX_BYTES) -> list[str]:
    """Join consecutive paragraphs into chunks of min_bytes..max_bytes (a short tail joins the last chunk)."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        para = para.rstrip()
        if para.strip():
            paragraphs += _split_long(para, max_bytes)
    chunks, current = [], ""
    for para in paragraphs:
        candidate = f"{current}\n\n{para}" if current else para
        if current and len(candidate.encode()) > max_bytes:
            if len(current.encode()) < min_bytes:
                # too short to stand alone: top it up with the paragraph's leading lines
                lines, sep = para.split("\n"), "\n\n"
                while lines and len(f"{current}{sep}{lines[0]}".encode()) <= max_bytes:
                    current, sep = f"{current}{sep}{lines.pop(0)}", "\n"
                para = "\n".join(lines)
            chunks.append(current)
            current = para
        else:
            current = candidate
        if len(current.encode()) >= min_bytes:
            chunks.append(current)
            current = ""
    if current:
        tail = f"{chunks[-1]}\n\n{current}" if chunks else current
        if chunks and len(tail.encode()) <= max_bytes:
            chunks[-1] = tail
        elif len(current.encode()) >= 64:  # a few stray bytes are not worth a chunk
            chunks.append(current)
    return chunks


def corpus_chunks(stdlib_bytes: int = 1_600_000) -> list[dict[str, str]]:
    """All chunks of both sources in a fixed order, exact duplicates dropped."""
    seen, rows = set(), []
    for source, text in pydoc_documents() + stdlib_documents(stdlib_bytes):
        for chunk in chunk_document(text):
            digest = hashlib.sha256(chunk.encode()).digest()
            if digest not in seen:
                seen.add(digest)
                rows.append({"text": chunk, "source": source, "domain": source.split(":", 1)[0]})
    return rows


# -- corpus build ----------------------------------------------------------------------------
def _write(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _check_build(out: Path, expected: dict[str, Any]) -> None:
    info = json.loads((out / "build.json").read_text())
    differ = {k: (info.get(k), v) for k, v in expected.items() if info.get(k) != v}
    if differ:
        raise TextBuildError(f"{out} was built with other settings {differ} (built, asked): use another cache_dir")


def build_text_corpus(cache_dir: str | Path = ".cache/text", seed: int = 0, n_queries: int = 200,
                      val_fraction: float = 0.1, stdlib_bytes: int = 1_600_000) -> dict[str, Path]:
    """Write train/kb/queries Parquet files under `cache_dir/corpus` unless already built."""
    out = Path(cache_dir) / "corpus"
    paths = {name: out / f"{name}.parquet" for name in ("train", "kb", "queries")}
    settings = {"seed": seed, "n_queries": n_queries, "val_fraction": val_fraction, "stdlib_bytes": stdlib_bytes}
    if all(p.exists() for p in paths.values()) and (out / "build.json").exists():
        _check_build(out, settings)
        return paths
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = corpus_chunks(stdlib_bytes)
    if len(rows) <= n_queries:
        raise TextBuildError(f"corpus has {len(rows)} chunks, too few for {n_queries} queries")
    order = np.random.default_rng(seed).permutation(len(rows))
    query_idx = sorted(order[:n_queries].tolist())
    kb_idx = sorted(order[n_queries:].tolist())
    n_val = int(round(val_fraction * len(kb_idx)))
    val = set(order[n_queries:n_queries + n_val].tolist())
    kb = [rows[i] for i in kb_idx]
    in_train = [i not in val for i in kb_idx]
    _write(pa.table({
        "text": [r["text"] for r, t in zip(kb, in_train) if t],
        "source": [r["source"] for r, t in zip(kb, in_train) if t],
    }), paths["train"])
    _write(pa.table({
        "id": pa.array(range(len(kb)), pa.int64()),
        "text": [r["text"] for r in kb], "source": [r["source"] for r in kb],
        "in_lm_train": pa.array(in_train, pa.bool_()),
    }), paths["kb"])
    queries = [rows[i] for i in query_idx]
    _write(pa.table({
        "sample_id": [f"q-{i:05d}" for i in range(len(queries))],
        "text": [r["text"] for r in queries], "source": [r["source"] for r in queries],
        "domain": [r["domain"] for r in queries],
        "position": pa.array(range(len(queries)), pa.int64()),
    }), paths["queries"])
    sizes = [len(r["text"].encode()) for r in rows]
    (out / "build.json").write_text(json.dumps({
        **settings, "python": platform.python_version(), "chunks": len(rows), "kb": len(kb),
        "train": sum(in_train), "queries": len(queries), "bytes": sum(sizes),
        "chunk_bytes_min_median_max": [min(sizes), int(np.median(sizes)), max(sizes)],
        "build_s": round(time.perf_counter() - t0, 2),
    }, indent=2))
    print(f"[build-text] {len(rows)} chunks ({sum(sizes) / 1e6:.2f} MB): train {sum(in_train)}, "
          f"kb {len(kb)}, queries {len(queries)} -> {out}", flush=True)
    return paths


# -- multiple choice ---------------------------------------------------------------------------
MIN_ANSWER_CHARS = 12  # a shorter last line ("}", "return x") is too easy to tell apart or to guess


def choice_rows(queries: list[dict[str, Any]], n_choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Next-line multiple choice from held-out chunks: the context is a chunk without its last
    line, the choices are that line and the last lines of `n_choices - 1` other chunks (a seeded
    pick, distinct texts), shuffled; `label` is the true line's index. Chunks whose last line
    is shorter than MIN_ANSWER_CHARS are left out. The context never contains the answer line."""
    split = []
    for q in queries:
        body, _, last = q["text"].rstrip().rpartition("\n")
        if body.strip() and len(last.strip()) >= MIN_ANSWER_CHARS:
            split.append((q, body + "\n", last))
    rng = np.random.default_rng(seed)
    lines = [last for _, _, last in split]
    rows = []
    for q, context, answer in split:
        others = [j for j in rng.permutation(len(split)) if lines[j] != answer]
        distractors = list(dict.fromkeys(lines[j] for j in others))[:n_choices - 1]
        choices = [answer] + distractors
        order = rng.permutation(len(choices)).tolist()
        rows.append({"sample_id": f"{q['sample_id']}-mc", "text": context, "choices": [choices[k] for k in order],
                     "label": order.index(0), "source": q["source"], "domain": q["domain"], "position": len(rows)})
    return rows


def ensure_text_manifest(cache_dir: str | Path, dataset: str = "text", seed: int = 0) -> Path:
    """The manifest of an embedded text dataset: `text` = the held-out query chunks (bits per
    byte), `text_choices` = those chunks as next-line multiple-choice questions,
    `text_domains` / `text_domains_val` = the held-out / validation queries of the three-domain
    corpus. The domain datasets build their KB (`ensure_domain_kb`) with them: a run config
    names that KB in `kb.dir`, and the driver checks it exists right after the manifest."""
    if dataset in ("text_domains", "text_domains_val"):
        ensure_domain_kb(cache_dir, seed=seed)
        return build_domain_corpus(cache_dir, seed=seed)["queries" if dataset == "text_domains" else "val"]
    paths = build_text_corpus(cache_dir, seed=seed)
    if dataset == "text":
        return paths["queries"]
    if dataset != "text_choices":
        raise TextBuildError(f"unknown text dataset {dataset!r}: expected text, text_choices, text_domains "
                             "or text_domains_val")
    out = paths["queries"].with_name("queries_choices.parquet")
    if not out.exists():
        queries = pq.read_table(paths["queries"]).to_pylist()
        rows = choice_rows(queries, seed=seed)
        _write(pa.Table.from_pylist(rows), out)
        print(f"[build-text] {len(rows)} multiple-choice questions from {len(queries)} queries -> {out}", flush=True)
    return out


# -- several text domains (the Pile-style per-domain evaluation) ---------------------------------
# Three real corpora that ship with the machine's packages, each its own domain:
#   python: the standard library's source (code), pydoc: the Python reference topics (English
#   technical prose), cpp: the C++ headers pip installs with torch (c10, torch's C++ API,
#   pybind11: code in another language). Each is split by a seeded permutation into held-out
#   queries (reported), a validation split of queries (for choosing the learning rate), and KB.
DOMAINS_VERSION = 1
DOMAIN_NAMES = ("python", "pydoc", "cpp")
CPP_ROOTS = ("c10", "torch", "pybind11")  # under torch/include; ATen's generated op headers repeat themselves
# shorter chunks than the tiny-LM corpus: a 135M model fine-tunes on each neighbour, and on a CPU
# the cost per step grows with its tokens (256..768 bytes: ~70..250 SmolLM2 tokens)
DOMAIN_CHUNK_BYTES = (256, 768)


def cpp_documents(max_bytes: int = 1_000_000) -> list[tuple[str, str]]:
    """C++ headers from torch's wheel (c10, torch, pybind11), in order of a hash of their path,
    until `max_bytes`; the same files on every machine with the same torch."""
    import torch

    root = Path(torch.__file__).parent / "include"
    files = [p for sub in CPP_ROOTS for p in (root / sub).rglob("*") if p.suffix in (".h", ".hpp")]
    if not files:
        raise TextBuildError(f"no C++ headers under {root} (torch installed without its include/ folder?)")
    files.sort(key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())
    docs, total = [], 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        if total + len(text.encode()) > max_bytes:
            continue
        docs.append((f"cpp:{p.relative_to(root)}", text))
        total += len(text.encode())
    return sorted(docs)


def domain_documents(domain: str, max_bytes: int) -> list[tuple[str, str]]:
    if domain == "python":
        return [(f"python:{s.split(':', 1)[1]}", t) for s, t in stdlib_documents(max_bytes)]
    if domain == "pydoc":
        return pydoc_documents()
    if domain == "cpp":
        return cpp_documents(max_bytes)
    raise TextBuildError(f"unknown text domain {domain!r}: expected one of {DOMAIN_NAMES}")


def _domain_chunks(domain: str, max_bytes: int) -> list[dict[str, str]]:
    seen, rows = set(), []
    for source, text in domain_documents(domain, max_bytes):
        for chunk in chunk_document(text, *DOMAIN_CHUNK_BYTES):
            digest = hashlib.sha256(chunk.encode()).digest()
            if digest not in seen:
                seen.add(digest)
                rows.append({"text": chunk, "source": source, "domain": domain})
    return rows


def build_domain_corpus(cache_dir: str | Path = ".cache/text", seed: int = 0, n_queries: int = 40,
                        n_val: int = 10, kb_per_domain: int = 800, max_bytes: int = 1_000_000) -> dict[str, Path]:
    """Per domain, a seeded permutation of its chunks: `n_queries` held-out queries, `n_val`
    validation queries, then up to `kb_per_domain` KB chunks. Writes kb / queries / val Parquet
    files under `cache_dir/domains` unless already built with the same settings."""
    out = Path(cache_dir) / "domains"
    paths = {name: out / f"{name}.parquet" for name in ("kb", "queries", "val")}
    settings = {"version": DOMAINS_VERSION, "seed": seed, "n_queries": n_queries, "n_val": n_val,
                "kb_per_domain": kb_per_domain, "max_bytes": max_bytes, "domains": list(DOMAIN_NAMES),
                "chunk_bytes": list(DOMAIN_CHUNK_BYTES)}
    if all(p.exists() for p in paths.values()) and (out / "build.json").exists():
        _check_build(out, settings)
        return paths
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    kb, splits, counts = [], {"queries": [], "val": []}, {}
    for d, domain in enumerate(DOMAIN_NAMES):
        rows = _domain_chunks(domain, max_bytes)
        if len(rows) < n_queries + n_val + 10:
            raise TextBuildError(f"domain {domain} has {len(rows)} chunks, too few for {n_queries}+{n_val} queries")
        # one stream per domain: adding a domain never reshuffles another's split
        order = np.random.default_rng([seed, d]).permutation(len(rows)).tolist()
        splits["queries"] += [rows[i] for i in sorted(order[:n_queries])]
        splits["val"] += [rows[i] for i in sorted(order[n_queries:n_queries + n_val])]
        kb += [rows[i] for i in sorted(order[n_queries + n_val:n_queries + n_val + kb_per_domain])]
        counts[domain] = {"chunks": len(rows), "kb": min(kb_per_domain, len(rows) - n_queries - n_val)}
    _write(pa.table({"id": pa.array(range(len(kb)), pa.int64()), "text": [r["text"] for r in kb],
                     "source": [r["source"] for r in kb], "domain": [r["domain"] for r in kb]}), paths["kb"])
    for name, prefix in (("queries", "d"), ("val", "v")):
        rows = splits[name]
        _write(pa.table({"sample_id": [f"{prefix}-{r['domain']}-{i:04d}" for i, r in enumerate(rows)],
                         "text": [r["text"] for r in rows], "source": [r["source"] for r in rows],
                         "domain": [r["domain"] for r in rows],
                         "position": pa.array(range(len(rows)), pa.int64())}), paths[name])
    (out / "build.json").write_text(json.dumps({**settings, "python": platform.python_version(),
                                                "per_domain": counts, "build_s": round(time.perf_counter() - t0, 2)},
                                               indent=2))
    print(f"[build-text] domains {counts}: {len(splits['queries'])} queries, {len(splits['val'])} validation, "
          f"{len(kb)} KB chunks -> {out}", flush=True)
    return paths


def ensure_domain_kb(cache_dir: str | Path = ".cache/text", seed: int = 0, threads: int | None = None) -> Path:
    """The domain corpus's KB chunks embedded with the sentence model into a flat faiss KB at
    `cache_dir/domains/kb` (built once; ~1 min on 2 cores). `configs/lm_nn_smollm2.yaml` names it."""
    from kb_index import IndexSpec, SentenceEmbedder, build_kb

    paths = build_domain_corpus(cache_dir, seed=seed)
    out = paths["kb"].parent / "kb"
    if (out / "kb.json").is_file():
        return out
    corpus = pq.read_table(paths["kb"])
    threads = threads or max(1, min(2, os.cpu_count() or 1))
    print(f"[build-text] embedding {corpus.num_rows} domain KB chunks ({threads} threads) -> {out}", flush=True)
    build_kb(corpus, out, SentenceEmbedder(threads=threads), IndexSpec(type="flat"),
             progress=lambda m: print(f"[build-text] {m}", flush=True))
    return out
