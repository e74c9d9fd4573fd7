"""`python -m pipeline build-kb`: embed a corpus file and write a KB directory for the
KB-retrieval actor.

    python -m pipeline build-kb --corpus docs.jsonl --out .cache/kb/docs --embedder sentence --index hnsw
    python -m pipeline build-kb --corpus digits.parquet --out .cache/kb/digits \\
        --embedder cnn:.cache/models/small_cnn-seed0.pt --index ivf --nlist 64

The `cnn:` embedder is the default SmallCNN's feature extractor with the given state_dict; its
KB records the name `small_cnn@<checkpoint sha256 prefix>`, which a worker reproduces with
`kb_index.torch_checkpoint_name("small_cnn", checkpoint)`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pyarrow as pa

from kb_index.build import INDEX_TYPES, IndexSpec, build_kb, pick_item_column
from kb_index.embedders import Embedder, ImagePreprocess, SentenceEmbedder, TorchFeatureEmbedder, torch_checkpoint_name
from kb_index.index import set_threads


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline build-kb",
                                description="Embed a corpus and write a faiss KB directory.")
    p.add_argument("--corpus", required=True,
                   help="Parquet or JSONL file; rows with id, text or pixels, optional label")
    p.add_argument("--out", required=True, help="output KB directory (its KB files are replaced)")
    p.add_argument("--embedder", default="sentence", help="'sentence' (all-MiniLM-L6-v2) or 'cnn:CHECKPOINT'")
    p.add_argument("--column", default=None,
                   help="column to embed (default: whichever one of text, pixels, vector the corpus has)")
    p.add_argument("--index", default="flat", choices=INDEX_TYPES, help="index type (default flat)")
    p.add_argument("--nlist", type=int, default=None, help="ivf: number of lists (default ~4*sqrt(rows))")
    p.add_argument("--nprobe", type=int, default=8, help="ivf: lists searched per query (default 8)")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node (default 32)")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw: search breadth (default 64)")
    p.add_argument("--ef-construction", type=int, default=80, help="hnsw: build breadth (default 80)")
    p.add_argument("--batch-size", type=int, default=128, help="rows per embedding batch (default 128)")
    p.add_argument("--limit", type=int, default=None, help="embed only the first N rows")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and faiss threads (default: the CPUs this process may use)")
    return p


def read_corpus(path: Path) -> pa.Table:
    """A Parquet or JSONL corpus as an Arrow table; ValueError naming the file when unreadable."""
    if not path.is_file():
        raise ValueError(f"corpus file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pj

            return pj.read_json(path)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"cannot read corpus {path}: {str(exc).splitlines()[0]}") from None
    raise ValueError(f"corpus {path} must be .parquet or .jsonl, not '{suffix or 'no extension'}'")


def make_embedder(spec: str, threads: int) -> Embedder:
    """'sentence' or 'cnn:CHECKPOINT' -> an embedder, loaded offline."""
    if spec == "sentence":
        return SentenceEmbedder(threads=threads)
    if spec.startswith("cnn:"):
        import torch

        from pipeline.embedded.model import small_cnn

        ckpt = Path(spec[len("cnn:"):])
        if not ckpt.is_file():
            raise ValueError(f"checkpoint file not found: {ckpt}")
        model = small_cnn()
        try:
            model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"checkpoint {ckpt} is not a SmallCNN state_dict: {str(exc).splitlines()[0]}") from None
        torch.set_num_threads(threads)
        return TorchFeatureEmbedder(model, torch_checkpoint_name("small_cnn", ckpt), ImagePreprocess())
    raise ValueError(f"unknown embedder '{spec}': expected 'sentence' or 'cnn:CHECKPOINT'")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # macOS


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    threads = args.threads or usable_cpus()
    try:
        spec = IndexSpec(type=args.index, nlist=args.nlist, nprobe=args.nprobe, m=args.hnsw_m,
                         ef_search=args.ef_search, ef_construction=args.ef_construction)
        table = read_corpus(Path(args.corpus))
        if args.limit is not None:
            table = table.slice(0, args.limit)
        pick_item_column(table, args.column)  # a bad column fails before the model loads (seconds)
        print(f"[build-kb] {table.num_rows} rows from {args.corpus}; loading embedder '{args.embedder}'", flush=True)
        embedder = make_embedder(args.embedder, threads)
        set_threads(threads)
        meta = build_kb(table, args.out, embedder, spec, batch_size=args.batch_size, item_column=args.column,
                        progress=lambda line: print(line, flush=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[build-kb] embedder {meta['embedder']} dim {meta['dim']}, index {meta['index']}", flush=True)
    return 0
