"""Campaigns: `python -m pipeline sweep SWEEP.yaml`: a grid of runs, hyperparameters chosen on a
validation stream, one table.

A sweep file is a base run config plus axes:

    name: mnistc-tta                    # the campaign: every cell's run is tagged with it
    base: ../mnistc_tent.yaml           # a run config (relative to this file), or `config:` inline
    set: {data.n_test: 100}             # dotted overrides on the base
    axes:                               # the full grid, in this order (or `cells:` a list of label maps)
      method:                           # named values: label -> the fields it sets
        source: {ttt.method: source}
        tent: {ttt.method: tent}
      setting: [continual, reset_each_shift]      # with `streams:`: which stream order (pipeline.benchmarks.settings)
      seed: {fields: [data.seed, ttt.seed], values: [0, 1, 2]}   # one value set into several fields
      ttt.batch_size: [100, 200]        # a plain list: the axis name is the field
    select:                             # tune these methods' fields on the validation stream
      tent: {ttt.lr: [0.001, 0.01], ttt.steps: [1, 3]}
    select_over: [seed]                 # the choice minimises the mean over these axes (default: seed)
    streams: {...}                      # build the test / validation manifests (see StreamSpec), or
    validation: {data.manifest: val.parquet}      # overrides that turn a cell's test stream into its validation stream

Cells: every grid point is a test cell; a tuned method (`select`) gets one test cell *and* one
validation cell per point of its grid (plus its default point, the value the config gives, when
the grid lacks it): all of them run in one batch, and selection afterwards reads the validation
runs only, so a choice can never see a test row (tests/test_sweep.py checks this). The test
runs of the other points give the oracle (best on test), reported beside the selected and
the default choice, as TTAB does.

Naming and resume: a cell's name is its axis labels (and grid point), its run id
`<campaign>-<cell>`: deterministic, so rerunning the same command resumes into the same run
directories. A cell whose run.json says `finished` (with the same config) is skipped whole; the
others go to `run_job`, which resumes finished shards. How cells run is one function,
`execute_cells`: today one `run_job` after another in this process (one Ray instance), to be
swapped for the shared worker pool without touching anything else here.

The campaign record, `<output_root>/.campaigns/<name>/campaign.json` (cells, run ids, roles,
labels, grid points), is what `report --campaign NAME` and `Campaign.of(query_runs(...), NAME)` read.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.campaigns.campaign import campaign_dir
from pipeline.campaigns.spec import Cell, StreamSpec, SweepError, SweepSpec, expand, load_sweep, log
from pipeline.config import RunConfig

# Fields `prepare` fills in or that do not change results: not compared when deciding whether a
# finished run belongs to a cell.
_RESOLVED = ("data.manifest", "model.checkpoint", "model.path", "kb.dir")
_IGNORED_PREFIXES = ("run_id", "output_root", "workers.", "ttt.log_out", "experiment")


# ---------------------------------------------------------------------------------- streams

def stream_path(spec: StreamSpec, cache_dir: str, split: int, seed: int, role: str, setting: str,
                order: int = 0) -> Path:
    root = Path(spec.dir) if spec.dir else Path(cache_dir) / "sweep-streams" / spec.key()
    stem = f"{role}-{setting}" + (f"-order{order}" if order else "")
    return (root / f"split{split}-seed{seed}" / f"{stem}.parquet").resolve()


def build_stream(spec: StreamSpec, cache_dir: str, split: int, seed: int, role: str, setting: str,
                 order: int = 0) -> Path:
    """The manifest of one (split, seed, role, setting, domain order), built once: the held-out
    digits of split `split` through `pipeline corrupt` (seeded per image by `seed`), ordered by
    `pipeline manifest` (its `--orders`: order k is the k-th of settings.domain_orders)."""
    from pipeline.benchmarks.corrupt import generate, source_from_digits
    from pipeline.benchmarks.layouts import build_manifest
    from pipeline.benchmarks.orders import build_order_manifests

    out = stream_path(spec, cache_dir, split, seed, role, setting, order)
    if out.is_file():
        return out
    images = out.parent / "images"
    if not (images / "corrupt.json").is_file():
        log(f"building corrupted digits of split {split}, seed {seed} (one-time): "
            f"{len(spec.test) + len(spec.validation)} corruptions x {spec.per_domain} digits at severity {spec.severity}")
        generate(source_from_digits(split, spec.per_domain), images, corruptions=spec.test + spec.validation,
                 severities=[spec.severity], seed=seed)
    names = spec.test if role == "test" else spec.validation
    params = {"seed": seed} if setting in ("mixed_domains", "correlated") else None
    if order:  # orders 0..order, each <stem>-order<k>.parquet beside the unordered stream's name
        build_order_manifests("cifar-c", images, stream_path(spec, cache_dir, split, seed, role, setting), order + 1,
                              order_seed=spec.order_seed, setting=setting, setting_params=params,
                              corruptions=list(names), severities=[spec.severity])
        return out
    tmp = out.with_name(out.stem + ".tmp.parquet")
    build_manifest("cifar-c", images, tmp, setting=setting, setting_params=params, corruptions=list(names),
                   severities=[spec.severity])
    tmp.replace(out)
    return out


def attach_streams(spec: SweepSpec, cells: list[Cell]) -> list[Cell]:
    """With `streams:`, point each cell's data.manifest at its built (seed, role, setting) stream."""
    if spec.streams is None:
        return cells
    from pipeline.job.ray_start import init_ray

    init_ray()  # the corruptions run as Ray tasks
    for cell in cells:
        seed = cell.config.data.seed if spec.streams.corruption_seed == "data.seed" else cell.config.ttt.seed
        path = build_stream(spec.streams, cell.config.data.cache_dir, cell.config.data.seed, seed,
                            "validation" if cell.role == "validation" else "test", cell.setting or "continual",
                            cell.order)
        cell.config = cell.config.model_copy(update={"data": cell.config.data.model_copy(update={"manifest": str(path)})})
    return cells


# --------------------------------------------------------------------------- resume, execute

def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_difference(cfg: RunConfig, recorded: dict[str, Any]) -> str | None:
    """The first field where a finished run's recorded config differs from the cell's, or None.
    Fields `prepare` resolves are compared only when the cell sets them (as absolute paths)."""
    mine = {k.rstrip("."): v for k, v in _flat(cfg.model_dump(mode="json")).items()}
    theirs = {k.rstrip("."): v for k, v in _flat(recorded or {}).items()}
    for key in sorted(set(mine) | set(theirs)):
        if key.startswith(_IGNORED_PREFIXES) and key != "workers.num_shards":
            continue
        a, b = mine.get(key), theirs.get(key)
        if key == "workers.num_shards" and a is None:  # unset: resolved by the job (pipeline/job/protocol.py)
            continue
        if key in _RESOLVED:
            if a is None:
                continue
            a = str(Path(a).resolve())
        if a != b:
            return f"{key}: {b!r} in the run, {a!r} in the sweep"
    return None


def cell_finished(cell: Cell) -> bool:
    """True when the cell's run directory holds a finished run of this very config."""
    path = cell.run_dir / "run.json"
    if not path.is_file():
        return False
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("status") != "finished":
        return False
    diff = config_difference(cell.config, info.get("config") or {})
    if diff:
        raise SweepError(f"sweep: cell {cell.name}: its finished run {cell.run_dir} has another config ({diff}); "
                         "rename the campaign or remove that run")
    return True


def execute_cells(cfgs: list[RunConfig], *, on_done: Callable[[int, Path], None] | None = None) -> list[Path]:
    """Run every config to completion and return the run directories, in order: all cells as one
    job over one shared worker pool (`pipeline.job.runner.run_jobs`: (cell, shard) work items, a worker
    keeps its loaded model for the next cell with the same model). This is the one place that
    knows how cells run."""
    from pipeline.job.runner import run_jobs

    return run_jobs(cfgs, on_done=on_done)


def write_campaign(spec: SweepSpec, cells: list[Cell]) -> Path:
    from pipeline.job.outputs import write_json

    out = campaign_dir(cells[0].config.output_root, spec.name)
    out.mkdir(parents=True, exist_ok=True)
    record = {"name": spec.name, "sweep_file": spec.source, "axes": [a.name for a in spec.axes],
              "select": spec.select, "select_over": spec.select_over,
              "streams": None if spec.streams is None else {**spec.streams.__dict__},
              "validation": spec.validation, "cells": [c.record() for c in cells]}
    write_json(out / "campaign.json", record)
    return out


def run_sweep(spec: SweepSpec, *, executor: Callable[..., list[Path]] = execute_cells) -> Path:
    """Expand, skip finished cells, run the rest, then write selection and the campaign report."""
    cells = attach_streams(spec, expand(spec))
    where = write_campaign(spec, cells)
    done = [c for c in cells if cell_finished(c)]
    todo = [c for c in cells if c not in done]
    n_val = sum(c.role == "validation" for c in cells)
    log(f"campaign {spec.name}: {len(cells)} cells ({len(cells) - n_val} test, {n_val} validation); "
        f"{len(done)} finished already, {len(todo)} to run")
    t0 = time.perf_counter()
    finished = [0]  # cells end out of order: count them, so the counter only goes up

    def progress(i: int, run_dir: Path) -> None:
        finished[0] += 1
        elapsed = time.perf_counter() - t0
        left = max(0.0, (len(todo) - finished[0]) * elapsed / finished[0])
        log(f"cell {todo[i].run_id} finished ({run_dir}); campaign {len(done) + finished[0]}/{len(cells)} cells, "
            f"{elapsed:.0f} s so far, ~{left:.0f} s to go")

    if todo:
        executor([c.config for c in todo], on_done=progress)
    from pipeline.campaigns.campaign import Campaign

    campaign = Campaign(cells[0].config.output_root, spec.name)
    report = campaign.report()
    log(f"campaign {spec.name} finished in {time.perf_counter() - t0:.0f} s; report {report}")
    return where


def sweep_main(argv: list[str]) -> int:
    """`python -m pipeline sweep SWEEP.yaml [--set key=value ...] [--dry-run] [--mlflow [URI]]`."""
    parser = argparse.ArgumentParser(prog="python -m pipeline sweep", description="run a campaign: a grid of runs")
    parser.add_argument("sweep", help="sweep YAML (base config + axes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base config field in every cell (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    parser.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                        help="also log every run to MLflow (default store: <output_root>/.mlruns)")
    args = parser.parse_args(argv)
    spec = load_sweep(args.sweep, args.overrides)
    if args.dry_run:
        for cell in expand(spec):
            print(f"{cell.role:<11}{cell.run_id}")
        return 0
    where = run_sweep(spec)
    if args.mlflow is not None:
        from pipeline.analysis.tracking import export_campaign
        from pipeline.campaigns.campaign import Campaign

        camp = Campaign(where.parent.parent, spec.name)
        uri = export_campaign(camp, args.mlflow or None)
        log(f"logged {len(camp.cells)} runs to MLflow at {uri}")
    return 0
