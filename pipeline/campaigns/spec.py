"""A sweep file, parsed and expanded: the grid's axes, the streams it builds, the cells it runs
(one validated RunConfig each). No Ray, no runs: `pipeline/campaigns/sweep.py` executes what this
module expands.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.config import ConfigError, RunConfig, load_yaml, read_yaml_mapping, set_dotted

HELD_OUT_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "spatter", "gaussian_blur", "saturate")
SPEC_KEYS = {"name", "base", "config", "set", "axes", "cells", "select", "select_over", "validation", "streams"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


class SweepError(ConfigError):
    """A sweep-file problem, phrased as one line naming the key."""


def log(msg: str) -> None:
    print(f"[sweep] {msg}", flush=True)


# ------------------------------------------------------------------------------------ spec

@dataclass(frozen=True)
class Axis:
    """One axis of the grid: labels in order, and the fields each label sets."""

    name: str
    labels: tuple[str, ...]
    values: tuple[dict[str, Any], ...]
    named: bool  # labels are names (method: tent) rather than values of a field (seed0)

    def part(self, label: str) -> str:
        """How a label appears in a cell name: `tent` for named axes, `seed0` / `lr0.01` for values."""
        return label if self.named else f"{self.name.rsplit('.', 1)[-1]}{label}"


@dataclass(frozen=True)
class StreamSpec:
    """Test and validation manifests the sweep builds itself: the held-out MNIST digits of split
    `data.seed` (the embedded default's: the source model of that seed never saw them), corrupted
    with the canonical ImageNet-C corruptions (`pipeline corrupt`) seeded by the config field
    `corruption_seed` names, ordered by the cell's `setting` label (`pipeline manifest`).
    `corruption_seed: ttt.seed` with a fixed data.seed evaluates one source model on streams whose
    noise changes with the seed; `data.seed` (default) changes split, model and noise together."""

    per_domain: int = 100
    severity: int = 3
    test: tuple[str, ...] = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur",
                             "contrast")
    validation: tuple[str, ...] = HELD_OUT_CORRUPTIONS
    dir: str | None = None  # None = <data.cache_dir>/sweep-streams/<hash of this spec>
    setting_axis: str = "setting"
    corruption_seed: str = "data.seed"  # the config field that seeds corruption noise and stream order
    # an axis of this name picks the domain order: label k = the k-th of settings.domain_orders (0 = as
    # listed, then seeded distinct permutations, `order_seed`); the table averages over it like seeds
    order_axis: str = "order"
    order_seed: int = 0

    def key(self) -> str:
        body = json.dumps({"n": self.per_domain, "sev": self.severity, "t": self.test, "v": self.validation,
                           **({"os": self.order_seed} if self.order_seed else {})}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:10]


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]
    axes: list[Axis]
    cells: list[dict[str, str]] | None = None
    select: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    select_over: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    streams: StreamSpec | None = None
    source: str | None = None  # the sweep file


@dataclass
class Cell:
    name: str
    role: str  # "test" or "validation"
    labels: dict[str, str]  # axis -> label
    hp: dict[str, Any]  # the grid point of a tuned method ({} otherwise)
    hp_name: str | None
    default_hp: bool
    config: RunConfig
    setting: str | None = None
    order: int = 0  # with streams: the domain order (StreamSpec.order_axis)

    @property
    def run_id(self) -> str:
        return str(self.config.run_id)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_root) / self.run_id

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "run_id": self.run_id, "role": self.role, "labels": self.labels,
                "hp": self.hp, "hp_name": self.hp_name, "default_hp": self.default_hp,
                "method": self.config.ttt.method, "setting": self.setting}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """config.set_dotted with a copy of `value` (cells share axis values) and the sweep's error."""
    set_dotted(tree, dotted, copy.deepcopy(value), where="sweep: field", error=SweepError)


def _get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _fields(where: str, mapping: Any) -> dict[str, Any]:
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise SweepError(f"sweep: {where} must map dotted config fields to values")
    return dict(mapping)


def _parse_axis(name: str, raw: Any) -> Axis:
    if isinstance(raw, list):
        if not raw:
            raise SweepError(f"sweep: axes.{name} is empty")
        return Axis(name, tuple(_label(v) for v in raw), tuple({name: v} for v in raw), named=False)
    if isinstance(raw, dict) and set(raw) == {"fields", "values"}:
        fields, values = raw["fields"], raw["values"]
        if not isinstance(fields, list) or not fields or not isinstance(values, list) or not values:
            raise SweepError(f"sweep: axes.{name}: fields and values must be non-empty lists")
        return Axis(name, tuple(_label(v) for v in values), tuple({f: v for f in fields} for v in values), named=False)
    if isinstance(raw, dict) and raw:
        return Axis(name, tuple(str(k) for k in raw),
                    tuple(_fields(f"axes.{name}.{k}", v or {}) for k, v in raw.items()), named=True)
    raise SweepError(f"sweep: axes.{name} must be a list of values, {{fields, values}}, or a mapping label -> fields")


def _parse_streams(raw: Any) -> StreamSpec:
    if raw is True:
        return StreamSpec()
    if not isinstance(raw, dict):
        raise SweepError("sweep: streams must be a mapping (per_domain, severity, test, validation, dir)")
    unknown = set(raw) - {"per_domain", "severity", "test", "validation", "dir", "setting_axis", "corruption_seed",
                          "order_axis", "order_seed"}
    if unknown:
        raise SweepError(f"sweep: streams: unknown key(s) {sorted(unknown)}")
    from pipeline.benchmarks.layouts import ALL_CORRUPTIONS

    spec = StreamSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    for key in ("test", "validation"):
        names = getattr(spec, key)
        bad = [c for c in names if c not in ALL_CORRUPTIONS]
        if bad or not names:
            raise SweepError(f"sweep: streams.{key}: unknown corruption(s) {bad}; known: {', '.join(ALL_CORRUPTIONS)}")
    if set(spec.test) & set(spec.validation):
        raise SweepError(f"sweep: streams: corruptions in both test and validation: {sorted(set(spec.test) & set(spec.validation))}")
    if spec.corruption_seed not in ("data.seed", "ttt.seed"):
        raise SweepError(f"sweep: streams.corruption_seed must be data.seed or ttt.seed, got {spec.corruption_seed!r}")
    if spec.severity not in (1, 2, 3, 4, 5) or spec.per_domain < 1:
        raise SweepError("sweep: streams: severity must be 1..5 and per_domain >= 1")
    return spec


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """Read and check a sweep file; `overrides` (KEY=VALUE) go into its `set`."""
    p = Path(path)
    raw = read_yaml_mapping(p, "sweep file", SweepError)
    return parse_sweep(raw, base_dir=p.parent, overrides=overrides, source=str(p))


def parse_sweep(raw: dict[str, Any], *, base_dir: str | Path = ".", overrides: list[str] = (),
                source: str | None = None) -> SweepSpec:
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SweepError(f"sweep: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(SPEC_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SweepError(f"sweep: name must be a plain name (letters, digits, _ . = + -), got {name!r}")
    if "base" in raw and "config" in raw:
        raise SweepError("sweep: give base (a file) or config (inline), not both")
    tree = _base_tree(raw, base_dir, overrides)
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise SweepError("sweep: axes must be a mapping of axis name -> values")
    axes = [_parse_axis(str(k), v) for k, v in axes_raw.items()]
    cells = _parse_cells(raw.get("cells"), axes)
    select = {}
    for method, grid in (raw.get("select") or {}).items():
        grid = _fields(f"select.{method}", grid)
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"sweep: select.{method}.{key} must be a non-empty list")
        select[str(method)] = grid
    axis_names = [a.name for a in axes]
    streams = _parse_streams(raw["streams"]) if raw.get("streams") else None
    replicates = ["seed", streams.order_axis if streams else "order"]  # what a table averages over by default
    over = raw.get("select_over", [a for a in replicates if a in axis_names])
    missing = [o for o in over if o not in axis_names]
    if missing:
        raise SweepError(f"sweep: select_over names unknown axis/axes {missing}; axes: {axis_names}")
    if streams is not None:
        # the setting and order axes pick the stream, not a config field: setting names, order indices
        axes = [Axis(a.name, a.labels, tuple({} for _ in a.labels), named=a.name == streams.setting_axis)
                if a.name in (streams.setting_axis, streams.order_axis) and not a.named else a for a in axes]
        for a in axes:
            if a.name == streams.order_axis and not all(lab.isdigit() for lab in a.labels):
                raise SweepError(f"sweep: axes.{a.name}: domain order labels must be indices 0, 1, 2, ...; got {list(a.labels)}")
    validation = _fields("validation", raw["validation"]) if raw.get("validation") else None
    if select and streams is None and validation is None:
        raise SweepError("sweep: select needs a validation stream: give streams: (built from the held-out "
                         "corruptions) or validation: (overrides such as data.manifest)")
    return SweepSpec(name=name, base=tree, axes=axes, cells=cells, select=select, select_over=list(over),
                     validation=validation, streams=streams, source=source)


def _base_tree(raw: dict[str, Any], base_dir: str | Path, overrides: list[str]) -> dict[str, Any]:
    """The config every cell starts from: `base` (a file) or `config` (inline), then the sweep's
    `set:` and the command line's `--set` on top, in that order."""
    tree: dict[str, Any] = {}
    if "base" in raw:
        base = Path(base_dir) / str(raw["base"])
        if not base.is_file():
            raise SweepError(f"sweep: base config not found: {base}")
        tree = read_yaml_mapping(base, "sweep: base config", SweepError)
    elif "config" in raw:
        tree = copy.deepcopy(_fields("config", raw["config"]))
    sets = dict(_fields("set", raw.get("set") or {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--set expects key=value, got {item!r}")
        sets[key.strip()] = load_yaml(value, f"--set {key.strip()}", SweepError) if value.strip() else None
    for key, value in sets.items():
        _set_dotted(tree, key, value)
    return tree


def _parse_cells(cells: Any, axes: list[Axis]) -> list[dict[str, str]] | None:
    """An explicit cell list (instead of the full grid): each cell labels every axis with a known label."""
    if cells is None:
        return None
    if not isinstance(cells, list) or not cells:
        raise SweepError("sweep: cells must be a non-empty list of {axis: label} mappings")
    by_name = {a.name: a for a in axes}
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or set(cell) != set(by_name):
            raise SweepError(f"sweep: cells[{i}] must give a label for every axis {sorted(by_name)}")
        for axis, label in cell.items():
            if _label(label) not in by_name[axis].labels:
                raise SweepError(f"sweep: cells[{i}]: {axis} has no label {label!r}; "
                                 f"labels: {list(by_name[axis].labels)}")
    return [{k: _label(v) for k, v in c.items()} for c in cells]

# ------------------------------------------------------------------------------- expansion

def _validate(tree: dict[str, Any], where: str) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        what = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise SweepError(f"sweep: cell {where}: config field {loc!r}: {what}") from None


def _grid_points(spec: SweepSpec, method: str, tree: dict[str, Any], where: str) -> list[tuple[dict[str, Any], bool]]:
    """The grid of a tuned method as validated values, plus the default point (the config's own
    values) when the grid lacks it; each point with whether it is the default."""
    grid = spec.select[method]
    keys = list(grid)
    base_cfg = _validate(tree, where).model_dump()
    default = {k: _get_dotted(base_cfg, k) for k in keys}
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        t = copy.deepcopy(tree)
        for k, v in zip(keys, combo):
            _set_dotted(t, k, v)
        dumped = _validate(t, where).model_dump()  # "1e-3" and 0.001 are the same point once validated
        points.append({k: _get_dotted(dumped, k) for k in keys})
    unique = []
    for p in points:
        if p not in unique:
            unique.append(p)
    if default not in unique:
        unique.append(default)
    return [(p, p == default) for p in unique]


def _hp_name(point: dict[str, Any]) -> str:
    return "-".join(f"{k.rsplit('.', 1)[-1]}{_label(v)}" for k, v in point.items())


def _base_cells(spec: SweepSpec) -> list[dict[str, str]]:
    if spec.cells is not None:
        return spec.cells
    return [dict(zip([a.name for a in spec.axes], combo)) for combo in itertools.product(*(a.labels for a in spec.axes))]


def expand(spec: SweepSpec) -> list[Cell]:
    """Every cell of the campaign, test and validation, in a fixed order; names are unique."""
    from pipeline.benchmarks.settings import EXPECTS_RESET, SETTINGS

    by_name = {a.name: a for a in spec.axes}
    cells: list[Cell] = []
    for labels in _base_cells(spec):
        tree = copy.deepcopy(spec.base)
        for axis, label in labels.items():
            a = by_name[axis]
            for k, v in a.values[a.labels.index(label)].items():
                _set_dotted(tree, k, v)
        base_name = "-".join(by_name[ax].part(lab) for ax, lab in labels.items()) or "cell"
        setting, order = None, 0
        if spec.streams is not None:
            order = int(labels.get(spec.streams.order_axis, 0))
            setting = labels.get(spec.streams.setting_axis, "continual")
            if setting not in SETTINGS:
                raise SweepError(f"sweep: cell {base_name}: {spec.streams.setting_axis} label {setting!r} is not a "
                                 f"setting; known: {', '.join(SETTINGS)}")
            # the setting decides whether the method resets at domain shifts (reset_each_shift)
            _set_dotted(tree, "ttt.reset_on_domain_change", EXPECTS_RESET[setting])
        method = _validate(tree, base_name).ttt.method
        points = _grid_points(spec, method, tree, base_name) if method in spec.select else [({}, False)]
        for point, is_default in points:
            t = copy.deepcopy(tree)
            for k, v in point.items():
                _set_dotted(t, k, v)
            hp_name = _hp_name(point) if point else None
            roles = ("test", "validation") if point else ("test",)
            for role in roles:
                rt = copy.deepcopy(t)
                if role == "validation" and spec.validation:
                    for k, v in spec.validation.items():
                        _set_dotted(rt, k, v)
                name = ("val-" if role == "validation" else "") + base_name + (f"-{hp_name}" if hp_name else "")
                if not _NAME.match(name):
                    raise SweepError(f"sweep: cell name {name!r} has characters a directory name should not; "
                                     "use named axis labels")
                rt["run_id"] = f"{spec.name}-{name}"
                rt["tag"] = spec.name
                cfg = _validate(rt, name)
                cells.append(Cell(name=name, role=role, labels=dict(labels), hp=point, hp_name=hp_name,
                                  default_hp=is_default, config=cfg, setting=setting, order=order))
    names = [c.name for c in cells]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"sweep: cells share a name: {dupes[:3]} (two labels of one axis render alike)")
    roots = {c.config.output_root for c in cells}
    if len(roots) > 1:
        raise SweepError(f"sweep: every cell must write to one output_root, got {sorted(roots)}")
    if spec.validation is not None:
        for c in cells:
            if c.role == "validation":
                twin = next(t for t in cells if t.role == "test" and t.name == c.name.removeprefix("val-"))
                if twin.config.data == c.config.data:
                    raise SweepError(f"sweep: validation overrides leave cell {twin.name}'s data unchanged: "
                                     "the validation stream would be the test stream")
    return cells


