"""Run configuration: YAML -> validated, typed objects, with `--set key=value` overrides.

A bad field fails here, before Ray starts, with one line naming the field.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ttt.config import TTTConfig

LATER_METHOD_BLOCKS = frozenset({"rmt", "adacontrast", "cmf", "memo", "rpl", "santa", "t3a", "shot_im",
                                 "bn_alpha", "ttt"})


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
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"  # of the resize
    # auto: image_shape, mean, std, resize, center_crop and interpolation come from the model itself
    # (timm's data config of the model; the transforms of `weights_enum` for torchvision; the zoo's
    # RobustBench models: [0, 1] inputs) wherever the config does not set them (explicit fields win);
    # explicit: the fields as given (their defaults are the embedded MNIST model's)
    preprocess: Literal["explicit", "auto"] = "explicit"
    weights_enum: str | None = None  # torchvision weights enum whose transforms to use, e.g. ResNet50_Weights.IMAGENET1K_V2
    preprocess_from: str | None = None  # set by the job: where `auto` took the preprocessing from (run.json)
    # score over a subset of the model's classes (the logits masked to them): imagenet_r, imagenet_a
    # (the 200 classes of each, timm's lists) or a file of class indices / ImageNet wnids
    class_subset: str | None = None
    # causal_lm: a Hugging Face model directory (save_pretrained layout, loaded offline)
    path: str | None = None  # None = the embedded tiny GPT-2 (trained once under data.cache_dir)
    lora: LoraConfig | None = None  # None = no adapter (method nn on a causal LM needs one)
    max_length: int | None = Field(None, ge=2)  # scoring window; None = the model's context
    # a row whose text is longer is an error row: memory stays bounded at any length (windows are
    # scored a few at a time), time does not (2 MiB: ~500k tokens, minutes on a CPU); None = no limit
    max_text_bytes: int | None = Field(2**21, ge=1)

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
    # no row done anywhere for this long fails the run; counted from when a worker is built (its start-up is not)
    stall_timeout_s: float = Field(900.0, gt=0.0)
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


class ProbeConfig(_Strict):
    """Forgetting / transfer probes (pipeline/job/probes.py): every `every` committed chunks of a shard
    (and at its end) its adaptation state is scored without adapting, by a probe actor, on the first
    `clean_n` rows of the `clean` manifest and `per_domain` rows of every domain of the run's manifest."""

    every: int = Field(0, ge=0)  # committed chunks between probes; 0 = off
    clean: str | None = None  # manifest of clean source rows (None = no clean probe set)
    clean_n: int = Field(1000, ge=1)
    per_domain: int = Field(200, ge=0)  # 0 = no domain probe sets
    seed: int = 0  # which rows of each domain
    num_cpus: float = Field(0.0, ge=0.0)  # the probe actor's CPUs (0: it shares the workers' CPUs)
    threads: int = Field(1, ge=1)


class OutputsConfig(_Strict):
    """What a run's Parquet keeps besides the default columns (ttt/schema.py)."""

    # each classifier row's full probability vector (`probs`: the softmax of the logits its prediction
    # came from), for calibration or ensembles computed afterwards. Off by default: it adds one float
    # per class to every row (4 kB a row for ImageNet's 1,000 classes, against ~0.1 kB without)
    save_probs: bool = False


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
    probes: ProbeConfig = ProbeConfig()  # do not change the results (not in the config hash)
    outputs: OutputsConfig = OutputsConfig()

    @field_validator("run_id")
    @classmethod
    def _plain_run_id(cls, value: str | None) -> str | None:
        if value is not None:
            check_run_id(value)
        return value

    @model_validator(mode="after")
    def _probs_need_classes(self) -> "RunConfig":
        if self.outputs.save_probs and self.model.kind != "image_classifier":
            raise ValueError("outputs.save_probs applies to model.kind=image_classifier (a causal LM's rows score "
                             "text: they have no class probabilities)")
        return self

    def results_key(self) -> dict[str, Any]:
        """What fixes the results: data, model, method, shard count and precision (not the other
        workers settings or where outputs go), as JSON values."""
        key = {
            "data": self.data.model_dump(),
            "model": self.model.model_dump(),
            # the blocks of the methods added with issue 25 count only for their own method, and the
            # protocol fields only off their defaults, so earlier runs keep their hash (and resume)
            "ttt": _ttt_key(self.ttt),
            "num_shards": self.workers.num_shards,  # workers.num_shards and workers.precision, top level
            "precision": self.workers.precision,     # as the first version hashed them (old runs resume)
        }
        if self.ttt.method == "nn":  # the KB changes nn's results; other methods never read it
            key["kb"] = self.kb.model_dump(include={"dir", "index", "nprobe", "ef_search"})
        if self.outputs.save_probs:  # another results schema: a resume must not mix parts with and without
            key["outputs"] = {"save_probs": True}  # (only when on, so earlier runs keep their hash)
        return json.loads(json.dumps(key, default=str))

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.results_key(), sort_keys=True).encode()).hexdigest()[:16]


PROTOCOL_FIELDS = ("protocol", "online", "reset_every")  # ttt/protocol.py's shared fields


def _ttt_key(ttt: TTTConfig) -> dict[str, Any]:
    """ttt's part of the results key; the protocol fields count only when they differ from their
    defaults, so runs written before they existed keep their config hash (and resume)."""
    key = ttt.model_dump(exclude={"log_out"} | (LATER_METHOD_BLOCKS - {ttt.method}))
    defaults = TTTConfig().model_dump(include=set(PROTOCOL_FIELDS))
    for name in PROTOCOL_FIELDS:
        if key[name] == defaults[name]:
            del key[name]
    return key


RUN_ID_MAX_BYTES = 255  # one directory name on every common file system


def check_run_id(run_id: object) -> None:
    """A run id is one plain directory name inside output_root; else ValueError saying why."""
    if not isinstance(run_id, str):
        raise ValueError(f"must be a string, got {type(run_id).__name__}")
    why = ("is empty" if not run_id.strip() else
           "holds a NUL byte" if "\0" in run_id else
           "holds a path separator" if "/" in run_id or "\\" in run_id else
           f"is {run_id!r}, which names no run directory of its own" if run_id in (".", "..") else
           "starts with '.', '-' or a space" if run_id[0] in ".- " or run_id[-1] == " " else
           "holds a control character" if any(ord(c) < 32 or ord(c) == 127 for c in run_id) else
           f"is {len(run_id.encode())} bytes long (at most {RUN_ID_MAX_BYTES})"
           if len(run_id.encode("utf-8", "surrogatepass")) > RUN_ID_MAX_BYTES else None)
    if why:
        raise ValueError(f"a run id is one plain directory name inside output_root; this one {why}")


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
    return key.strip(), load_yaml(raw, f"--set {key.strip()}") if raw.strip() else None


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"config error: unknown field {field!r}"
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r:.80})"
    where = f"{field}: " if first["loc"] else ""  # a check across sections names its fields itself
    return f"config error: {where}{first['msg'].removeprefix('Value error, ')}{shown}"


def check_unique_keys(text: str, source: str, error: type[ValueError] = ConfigError) -> None:
    """Refuse a mapping that names a key twice anywhere in the YAML `text` (PyYAML keeps the last
    silently: a sweep lost a cell that way). Works on the composed nodes, so tags it does not know
    (lm-eval's `!function`) pass; a syntax error is left for the loader to report."""
    try:
        nodes = [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n is not None]
    except yaml.YAMLError:
        return
    while nodes:
        node = nodes.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in seen:
                        raise error(f"{source}: duplicate key {key.value!r} (lines {seen[key.value]} and "
                                    f"{key.start_mark.line + 1}); each key may appear once per mapping")
                    seen[key.value] = key.start_mark.line + 1
                nodes += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            nodes += node.value


def load_yaml(text: str, source: str, error: type[ValueError] = ConfigError) -> Any:
    """yaml.safe_load, refusing duplicate keys; `error` in one line naming `source`."""
    check_unique_keys(text, source, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{source} is not valid YAML: {str(exc).splitlines()[0]}") from None


def read_yaml_mapping(path: str | Path, what: str = "config file",
                      error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A YAML file holding a mapping, or `error` in one line naming the file (a duplicate key too)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {p} cannot be read: {exc}") from None
    tree = load_yaml(text, f"{what} {p}", error) or {}
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
