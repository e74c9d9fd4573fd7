"""Run configuration: YAML -> validated, typed objects, with `--set key=value` overrides.

A bad field fails here, before Ray starts, with one line naming the field.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ttt.config import TTTConfig


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the field or file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    # which embedded default builds the manifest when `manifest` is None: the MNIST-C stream,
    # the held-out text chunks, or those chunks as next-line multiple-choice questions
    # text_domains(_val): held-out (validation) queries of the three-domain corpus (python, pydoc, cpp)
    dataset: Literal["mnistc", "text", "text_choices", "text_domains", "text_domains_val"] = "mnistc"
    manifest: str | None = None  # Parquet manifest; None = build the embedded default of `dataset`
    cache_dir: str = ".cache"
    corruptions: list[str] | None = None  # None = the default list (pipeline.embedded.mnistc)
    severity: int = Field(3, ge=1, le=5)
    n_test: int = Field(1000, ge=10, le=1000)  # test digits per corruption domain
    include_clean: bool = False
    seed: int = 0  # data split and corruption randomness
    limit: int | None = Field(None, ge=1)  # evaluate only the first N manifest rows
    read_timeout_s: float | None = Field(60.0, gt=0.0)  # a row whose file read takes longer is an error row


class LoraConfig(_Strict):
    """PEFT LoRA adapter a causal LM is wrapped in (what method nn trains)."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # None = PEFT's default for the architecture (GPT-2: c_attn)
    # which transformer blocks get LoRA (negative = from the end, e.g. [-4, -3, -2, -1]); None = all.
    # Adapting only the last blocks keeps backward short: the cost that matters on a CPU
    layers: list[int] | None = None


class ModelConfig(_Strict):
    kind: Literal["image_classifier", "causal_lm"] = "image_classifier"
    # image_classifier: a factory reference and a state_dict
    factory: str = "pipeline.embedded.model:small_cnn"  # package.module:function
    factory_kwargs: dict[str, Any] = {}
    checkpoint: str | None = None  # state_dict file; None with the default factory = embedded default
    # preprocessing (ttt.images): [C, H, W] the model takes, per-channel mean / std (one value
    # broadcasts; identity 0 / 1 for models that normalise inside, e.g. RobustBench's), optional
    # resize of the shorter side and centre crop, and grey<->RGB conversion (auto) or refusal (strict)
    image_shape: list[int] = [1, 28, 28]
    mean: float | list[float] = 0.1307
    std: float | list[float] = 0.3081
    resize: int | None = Field(None, ge=1)
    center_crop: int | None = Field(None, ge=1)
    color_mode: Literal["auto", "strict"] = "auto"
    # causal_lm: a Hugging Face model directory (save_pretrained layout, loaded offline)
    path: str | None = None  # None = the embedded tiny GPT-2 (trained once under data.cache_dir)
    lora: LoraConfig | None = None  # None = no adapter (method nn on a causal LM needs one)
    max_length: int | None = Field(None, ge=2)  # scoring window; None = the model's context

    @model_validator(mode="after")
    def _factory_shape(self) -> "ModelConfig":
        module, _, func = self.factory.partition(":")
        if not module or not func:
            raise ValueError(f"factory must look like package.module:function, got {self.factory!r}")
        if self.kind == "image_classifier" and (self.path is not None or self.lora is not None):
            raise ValueError("model.path and model.lora apply to model.kind=causal_lm")
        if self.kind == "image_classifier":
            from ttt.images import ImageSpec  # torch: imported only when a model config is checked

            ImageSpec.from_model_config(self.model_dump())  # channel counts of mean / std, positive std
        return self


class WorkerConfig(_Strict):
    # with the seed, fixes the results; None: 1 (one stream) when the method carries state from batch to
    # batch, else 2 (pipeline/job/protocol.py resolves it before the run starts)
    num_shards: int | None = Field(None, ge=1)
    num_workers: int | None = Field(None, ge=1)  # None = min(num_shards, what the cluster fits)
    num_cpus: float = Field(0.5, ge=0.0)  # fractional so actors never starve Ray Data's reads
    num_gpus: float = Field(0.0, ge=0.0)
    torch_threads: int = Field(1, ge=1)
    max_shard_attempts: int = Field(3, ge=1)  # a shard whose worker dies goes on from its last commit
    progress_interval_s: float = Field(5.0, gt=0.0)
    # a worker hands over its rows and a checkpoint of its adaptation state every this many batches;
    # a shard whose worker or driver dies goes on from its last committed chunk
    checkpoint_every: int = Field(20, ge=1)
    stall_timeout_s: float = Field(900.0, gt=0.0)  # no row done anywhere for this long fails the run
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for the method's forward passes
    # CPUs per Ray Data decode / preprocess task; the pool leaves this much free. Fractional so a
    # task fits beside the workers on 1-CPU nodes
    preprocess_cpus: float = Field(0.5, gt=0.0)
    # rows per Ray Data block (one decode task each); None = as many as fill BLOCK_BYTES decoded
    # (1024 for 28x28 digits, ~50 for 224x224 RGB): small blocks cost the consumer more per row
    # than a Tent step does (bench/job_scale.py throughput)
    rows_per_block: int | None = Field(None, ge=1)
    prefetch_blocks: int = Field(4, ge=0)  # decoded blocks a worker keeps ahead of the model


class KBConfig(_Strict):
    """The knowledge base the `nn` method retrieves from (a directory written by build-kb)."""

    dir: str | None = None  # None with method nn = build the default from the clean training split
    index: Literal["flat", "ivf", "hnsw"] = "flat"  # only used when building the default KB
    nprobe: int | None = Field(None, ge=1)  # ivf: lists searched per query (None = as built)
    ef_search: int | None = Field(None, ge=1)  # hnsw: search breadth (None = as built)
    # CPUs the shared KB actor reserves; 0 by default: on a small machine even 0.1 can leave Ray Data's
    # read task (1 CPU) no room beside the workers, and faiss threads are set by `threads` anyway
    num_cpus: float = Field(0.0, ge=0.0)
    threads: int = Field(1, ge=1)  # faiss threads in the KB actor

    @model_validator(mode="after")
    def _params_fit_index(self) -> "KBConfig":
        if self.nprobe is not None and self.index != "ivf":
            raise ValueError(f"kb.nprobe applies to kb.index=ivf, not {self.index}")
        if self.ef_search is not None and self.index != "hnsw":
            raise ValueError(f"kb.ef_search applies to kb.index=hnsw, not {self.index}")
        return self


class RunConfig(_Strict):
    experiment: str = "default"
    tag: str | None = None
    run_id: str | None = None  # set to resume into an existing run directory
    output_root: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    ttt: TTTConfig = TTTConfig()
    workers: WorkerConfig = WorkerConfig()
    kb: KBConfig = KBConfig()  # used by method nn only

    def results_key(self) -> dict[str, Any]:
        """What fixes the results: data, model, method, shard count and precision (not the other
        workers settings or where outputs go), as JSON values."""
        key = {
            "data": self.data.model_dump(),
            "model": self.model.model_dump(),
            "ttt": self.ttt.model_dump(exclude={"log_out"}),
            "num_shards": self.workers.num_shards,  # workers.num_shards and workers.precision, top level
            "precision": self.workers.precision,     # as the first version hashed them (old runs resume)
        }
        if self.ttt.method == "nn":  # the KB changes nn's results; other methods never read it
            key["kb"] = self.kb.model_dump(include={"dir", "index", "nprobe", "ef_search"})
        return json.loads(json.dumps(key, default=str))

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.results_key(), sort_keys=True).encode()).hexdigest()[:16]


def set_dotted(tree: dict[str, Any], dotted: str, value: Any, *, where: str = "--set",
               error: type[ValueError] = ConfigError) -> None:
    """tree["a"]["b"] = value for "a.b", creating sections; `error` names `where` when a part is not one."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise error(f"{where} {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"config error: unknown field {field!r}"
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"config error: {field}: {first['msg']}{shown}"


def read_yaml_mapping(path: str | Path, what: str = "config file",
                      error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A YAML file holding a mapping, or `error` in one line naming the file."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise error(f"{what} {p} must hold a mapping at the top level")
    return tree


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    tree: dict[str, Any] = {} if path is None else read_yaml_mapping(path)
    for item in overrides:
        set_dotted(tree, *parse_override(item))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
