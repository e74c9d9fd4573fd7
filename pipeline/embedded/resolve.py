"""The embedded defaults a config may leave unset, built once on first use and cached under
`data.cache_dir`: the MNIST-C stream and its source CNN, the text corpus and tiny GPT-2, and
the default KB that method `nn` retrieves from (DESIGN.md, Embedded defaults).

`resolve_defaults(cfg)` returns the config with every path filled in and made absolute, so the
workers (possibly on other nodes) never build anything themselves.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kb_index import IndexSpec, SentenceEmbedder, build_kb
from kb_index.embedders import ImagePreprocess, TorchFeatureEmbedder
from pipeline.config import ConfigError, RunConfig
from pipeline.embedded import smollm2
from pipeline.embedded import text as text_data
from pipeline.embedded.kb import usable_cpus
from pipeline.embedded.mnistc import ensure_mnistc, load_train_split
from pipeline.embedded.model import ensure_default_checkpoint
from pipeline.embedded.tiny_lm import train_tiny_lm
from ttt.images import ImageSpec, RowError, model_pixels
from workers.models import NO_CHECKPOINT
from workers.ttt_worker import build_adapter, embedder_name

DEFAULT_FACTORY = "pipeline.embedded.model:small_cnn"
ROTATION_FACTORY = "pipeline.embedded.model:small_cnn_rotation"  # TTT's rotation head (method ttt)


def resolve_defaults(cfg: RunConfig, log: Callable[[str], None]) -> RunConfig:
    """Fill in the manifest and the model (building the embedded defaults when unset)."""
    updates: dict[str, Any] = {}
    manifest = cfg.data.manifest
    if manifest is None and cfg.data.dataset == "mnistc":
        manifest = ensure_mnistc(cfg.data.cache_dir, cfg.data.corruptions, cfg.data.severity,
                                 cfg.data.n_test, cfg.data.include_clean, cfg.data.seed)
    elif manifest is None:
        manifest = text_data.ensure_text_manifest(text_cache(cfg), cfg.data.dataset, cfg.data.seed)
    updates["data"] = cfg.data.model_copy(update={"manifest": str(Path(manifest).resolve())})
    if cfg.model.kind == "causal_lm":
        path = cfg.model.path
        if path is None:
            path = train_tiny_lm(text_cache(cfg), seed=cfg.data.seed)
        elif Path(path).resolve() == smollm2.model_dir(cfg.data.cache_dir).resolve():
            path = smollm2.ensure_smollm2(cfg.data.cache_dir)  # converted from the package's GGUF once
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.path: not a Hugging Face model directory (no config.json): {path}")
        updates["model"] = cfg.model.model_copy(update={"path": str(Path(path).resolve())})
    elif cfg.model.factory in (DEFAULT_FACTORY, ROTATION_FACTORY) and cfg.model.checkpoint is None:
        ckpt = ensure_default_checkpoint(cfg.data.cache_dir, cfg.data.seed, rotation=cfg.model.factory == ROTATION_FACTORY)
        updates["model"] = cfg.model.model_copy(update={"checkpoint": str(Path(ckpt).resolve())})
    elif cfg.model.checkpoint is None:
        raise ConfigError(f"model.checkpoint is not set for model.factory {cfg.model.factory!r}: give a state_dict "
                          "file, or model.checkpoint: none to evaluate the factory's own (e.g. random) weights")
    elif cfg.model.checkpoint.lower() == NO_CHECKPOINT:
        log(f"WARNING: model.checkpoint: none: evaluating the weights {cfg.model.factory} builds, no checkpoint loaded")
    else:
        updates["model"] = cfg.model.model_copy(update={"checkpoint": str(Path(cfg.model.checkpoint).resolve())})
    return cfg.model_copy(update=updates)


def text_cache(cfg: RunConfig) -> Path:
    """Where the embedded text default (corpus, tiny GPT-2) lives."""
    return Path(cfg.data.cache_dir) / "text"


def default_kb_dir(cfg: RunConfig) -> Path:
    """Where the default KB for (data split, model checkpoint, index type) lives under the cache."""
    name = embedder_name(cfg.model.model_dump()).replace("@", "-")
    if cfg.model.kind == "causal_lm":
        return Path(cfg.data.cache_dir) / "kb" / f"text-seed{cfg.data.seed}-{name}-{cfg.kb.index}"
    return Path(cfg.data.cache_dir) / "kb" / f"{Path(cfg.data.manifest).parent.name}-{name}-{cfg.kb.index}"


def ensure_kb(cfg: RunConfig, log: Callable[[str], None]) -> str:
    """kb.dir when given, else the default KB, built on first use: for a classifier, the clean
    training split beside the manifest (train.npz) embedded with the source model's `embed`;
    for a causal LM, the text corpus's KB chunks embedded with the sentence model."""
    if cfg.kb.dir is not None:
        if not (Path(cfg.kb.dir) / "kb.json").is_file():
            raise ConfigError(f"kb.dir: not a KB directory (no kb.json): {cfg.kb.dir}")
        return cfg.kb.dir
    if cfg.model.kind == "causal_lm":
        return _ensure_text_kb(cfg, log)
    if cfg.model.checkpoint is None or cfg.model.checkpoint.lower() == NO_CHECKPOINT:
        # the KB's embedder name is a hash of the checkpoint
        raise ConfigError("ttt.method=nn needs model.checkpoint (KB and queries must embed with the same weights)")
    out = default_kb_dir(cfg)
    if (out / "kb.json").is_file():
        return str(out)
    train = Path(cfg.data.manifest).parent / "train.npz"
    if not train.is_file():
        raise ConfigError(f"ttt.method=nn needs kb.dir: no training split to build a default KB from ({train})")
    x, y = load_train_split(cfg.data.manifest)
    spec = ImageSpec.from_model_config(cfg.model.model_dump())
    try:  # the KB's flat pixels in the model's channels and size (grey digits for an RGB model)
        pixels = [model_pixels(img, spec).tolist() for img in x]
    except RowError as exc:
        raise ConfigError(f"ttt.method=nn: the default KB's training split {train}: {exc}") from None
    corpus = {"id": list(range(len(y))), "label": [int(v) for v in y], "pixels": pixels}
    model = build_adapter(cfg.model.model_dump(), "cpu").get_model()
    embedder = TorchFeatureEmbedder(model, embedder_name(cfg.model.model_dump()), ImagePreprocess(spec=spec))
    log(f"building the default KB ({len(y)} training digits, {cfg.kb.index}) in {out}")
    build_kb(pa.table(corpus), out, embedder, IndexSpec(type=cfg.kb.index), progress=log)
    return str(out)


def _ensure_text_kb(cfg: RunConfig, log: Callable[[str], None]) -> str:
    out = default_kb_dir(cfg)
    if (out / "kb.json").is_file():
        return str(out)
    corpus = pq.read_table(text_data.build_text_corpus(text_cache(cfg), seed=cfg.data.seed)["kb"])
    threads = usable_cpus()
    log(f"building the default text KB ({corpus.num_rows} chunks, {cfg.kb.index}, sentence embedder, "
        f"{threads} threads; a few minutes on 2 cores, once) in {out}")
    build_kb(corpus, out, SentenceEmbedder(threads=threads), IndexSpec(type=cfg.kb.index), progress=log)
    return str(out)
