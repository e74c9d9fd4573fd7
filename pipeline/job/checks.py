"""Start-up checks: everything that can be refused is refused here, on the driver, before Ray
starts and before anything is written, as one line naming the field, file or hook
(`ConfigError`; the CLI prints it and exits 2).

`prepare(cfg)` is the entry point: resolve the embedded defaults, check the output root, the
manifest, the model (factory, checkpoint, hooks the method needs) and the method itself (built
once on the in-process KB and cache for `nn`), and return the resolved config.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, ModelConfig, RunConfig
from pipeline.embedded.resolve import ensure_kb, resolve_defaults
from pipeline.job.protocol import resolve_shards
from pipeline.manifest import check_manifest
from ttt import build_method
from ttt.methods import method_analysis_schema, method_class
from ttt.schema import UnknownColumnError
from workers.adapter_cache import AdapterCacheActor
from workers.clients import CacheClient, KBClient
from workers.kb_actor import KBRetrievalActor
from workers.models import load_model, model_preprocess
from workers.ttt_worker import build_adapter, embedder_name, kb_payload


def prepare(cfg: RunConfig, log: Callable[[str], None] = print) -> RunConfig:
    """The resolved config, or ConfigError / ManifestError (one line) for what cannot run."""
    return prepare_run(cfg, log)[0]


def prepare_run(cfg: RunConfig, log: Callable[[str], None] = print) -> tuple[RunConfig, dict[str, Any]]:
    """`prepare`, plus what the checks learnt that the job needs: the model's number of classes
    (labels are validated against it while decoding)."""
    check_output_root(cfg.output_root)
    cfg = resolve_shards(resolve_defaults(cfg, log))  # num_shards unset: one stream when order matters
    check_manifest(cfg.data.manifest, cfg.model.kind)
    cfg, adapter = check_model_loads(cfg)
    if cfg.ttt.method == "nn":
        cfg = cfg.model_copy(update={"kb": cfg.kb.model_copy(update={"dir": str(Path(ensure_kb(cfg, log)).resolve())})})
    check_method_starts(cfg, adapter)
    return cfg, {"num_classes": getattr(adapter, "num_classes", None)}


def check_output_root(root: str) -> None:
    """output_root must be (or be creatable as) a writable directory; checked without creating
    anything, so a refused config leaves nothing behind."""
    p = Path(root).absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_root {root}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_root {root}: {existing} is not writable")


def check_model_loads(cfg: RunConfig) -> tuple[RunConfig, Any]:
    """Load the model once on the driver, resolve `model.preprocess: auto` from it, and check the
    method's hooks against it, before anything is built for the method (nn's default KB embeds with
    the model's `embed`). Returns the config with the preprocessing it resolved, and the adapter."""
    try:
        model = None
        if cfg.model.kind == "image_classifier":
            model = load_model(cfg.model.factory, cfg.model.checkpoint, cfg.model.factory_kwargs, "cpu")
            cfg = cfg.model_copy(update={"model": resolve_preprocess(cfg.model, model)})
        adapter = build_adapter(cfg.model.model_dump(), "cpu", model=model)
    except ValueError as exc:  # factory refused or failing, checkpoint refused or not fitting
        raise ConfigError(str(exc)) from None
    if cfg.model.kind == "image_classifier":
        check_image_shape(cfg, adapter)
    try:
        cls = method_class(cfg.ttt.method, cfg.model.kind)  # a `pkg.mod:Class` reference is imported and checked here
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        method_analysis_schema(cfg.ttt.method, cfg.model.kind)  # what the run's analysis parts hold
    except UnknownColumnError as exc:  # a plug-in method's analysis_columns may pick only declared columns
        raise ConfigError(f"ttt.method={cfg.ttt.method}: {exc.args[0]}") from None
    missing = [h for h in cls.required_hooks if not adapter.has_hook(h)]
    if missing:
        raise ConfigError(f"ttt.method={cfg.ttt.method} needs hook(s) {missing} that model {cfg.model.factory} "
                          f"({type(adapter.get_model()).__name__}) lacks")
    return cfg, adapter


def resolve_preprocess(model_cfg: ModelConfig, model: Any) -> ModelConfig:
    """`model.preprocess: auto`: the preprocessing fields the config leaves unset, from the model
    (workers.models.model_preprocess); the fields it sets win. `preprocess_from` records where
    they came from (run.json's resolved config shows both)."""
    if model_cfg.preprocess != "auto":
        return model_cfg
    derived, source = model_preprocess(model, model_cfg.factory, model_cfg.weights_enum)
    given = model_cfg.model_fields_set
    update = {k: v for k, v in derived.items() if k not in given}
    overridden = sorted(k for k in derived if k in given)
    if overridden:
        source += f"; set in the config: {', '.join(overridden)}"
    try:
        return ModelConfig.model_validate({**model_cfg.model_dump(), **update, "preprocess_from": source})
    except ValueError as exc:
        raise ConfigError(f"model.preprocess: auto ({source}): {exc}") from None


def check_image_shape(cfg: RunConfig, adapter: Any) -> None:
    """One forward of a zero batch of `model.image_shape` in eval mode: a shape the model does not
    take would make every row an error row, so it is refused here, in one line."""
    import torch

    model, shape = adapter.get_model(), [1, *cfg.model.image_shape]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            adapter.forward(torch.zeros(shape, device=getattr(adapter, "device", "cpu")))
    except Exception as exc:  # noqa: BLE001 - any failure of the model on this shape is the refusal
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"model.image_shape={list(cfg.model.image_shape)} does not fit model {cfg.model.factory}: "
                          f"a zero batch of shape {shape} fails ({type(exc).__name__}: {first})") from None
    finally:
        model.train(was_training)


def check_method_starts(cfg: RunConfig, adapter: Any) -> None:
    try:
        build_method(adapter, cfg.ttt, in_process_services(cfg))
    except ValueError as exc:  # bad update filter (e.g. no normalisation layers), KB mismatch
        raise ConfigError(f"ttt.method={cfg.ttt.method}: {exc}") from None


def in_process_services(cfg: RunConfig) -> dict[str, Any]:
    """nn's services in-process (the real KB, a real cache object) so a bad KB or cache setting
    fails on the driver before Ray starts; the run's workers get clients of shared actors."""
    if cfg.ttt.method != "nn":
        return {}
    kb = KBRetrievalActor(cfg.kb.dir, threads=1)
    check_kb_info(cfg, kb.info())
    payload = kb_payload(cfg.model.model_dump())
    missing = [c for c in payload if c not in kb.kb.meta["columns"]]
    if missing:
        raise ConfigError(f"kb.dir {cfg.kb.dir}: method nn fine-tunes on the KB rows, which lack {missing}")
    services: dict[str, Any] = {"kb": KBClient(kb, embedder=embedder_name(cfg.model.model_dump()), payload=payload,
                                               nprobe=cfg.kb.nprobe, ef_search=cfg.kb.ef_search)}
    if cfg.ttt.nn.use_cache:
        nn = cfg.ttt.nn
        services["cache"] = CacheClient(AdapterCacheActor(nn.cache_capacity, nn.cache_threshold, nn.cache_eviction))
    return services


def check_kb_info(cfg: RunConfig, info: dict[str, Any]) -> None:
    want = embedder_name(cfg.model.model_dump())
    if info["embedder"] != want:
        raise ConfigError(f"kb.dir {cfg.kb.dir} was built with embedder '{info['embedder']}', the model embeds as '{want}'")
    if info["index"]["type"] != cfg.kb.index:
        raise ConfigError(f"kb.index={cfg.kb.index} but the KB at {cfg.kb.dir} is {info['index']['type']}")


def changed_fields(before: dict[str, Any] | None, cfg: RunConfig) -> str:
    """The results-fixing fields whose values differ from the config `before` (run.json's), as
    `field: old -> new`, or the two hashes when `before` cannot be read as a config."""
    try:
        old = RunConfig.model_validate(before).results_key()
    except (ValueError, TypeError):
        old = None
    diffs = [] if old is None else \
        [f"{_dotted(path)}: {a!r} -> {b!r}" for path, a, b in _differences(old, cfg.results_key(), ())]
    if not diffs:
        return f"config hash {cfg.config_hash()} differs from the run's"
    return "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")


def _differences(a: Any, b: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), (*path, str(k)))]
    return [] if a == b else [(path, a, b)]


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(("workers", *path) if path[0] in ("num_shards", "precision") else path)


def check_gpus(cfg: RunConfig, resources: dict[str, float]) -> None:
    if cfg.workers.num_gpus > 0 and resources.get("GPU", 0.0) < cfg.workers.num_gpus:
        raise ConfigError(f"workers.num_gpus={cfg.workers.num_gpus:g} but the cluster has "
                          f"{resources.get('GPU', 0.0):g} GPU(s); set workers.num_gpus=0 to run on CPUs")


def check_resume(run_dir: Path, cfg: RunConfig, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """A rerun into an existing run directory must have the same config and the same input content;
    a refusal names the fields that differ. The directory's run.json when it has one, else None."""
    if not (run_dir / "run.json").exists():
        return None
    try:
        previous = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"run directory {run_dir}: run.json is unreadable ({exc}); choose another run_id") from None
    if previous.get("config_hash") != cfg.config_hash():
        raise ConfigError(f"run directory {run_dir} was started with another config "
                          f"({changed_fields(previous.get('config'), cfg)}): choose another run_id")
    before = previous.get("inputs_fingerprint") or {}
    changed = [k for k in ("manifest", "model") if before.get(k) != inputs.get(k)]
    if changed:
        what = " and ".join("the manifest's content" if k == "manifest" else "the model's weights" for k in changed)
        raise ConfigError(f"run directory {run_dir} was started on other inputs: {what} changed since "
                          f"(fingerprint {before.get(changed[0])} -> {inputs.get(changed[0])}); choose another run_id")
    return previous
