"""Method x evaluation-setting table in the style of the public TTA benchmarks: each method runs
through the real job (`run_job`, one shard = one stream, one Ray instance for the whole table) in
each of the five settings of a canonical-corruption benchmark in the CIFAR-C layout.

    # the benchmark: the 15 canonical corruptions of 200 embedded clean test digits, severities 1-5
    .venv/bin/python -m pipeline corrupt --digits --limit 200 --out .cache/mnist-c-canonical-200 \\
        --corruptions benchmark --severities 1,2,3,4,5 --seed 0
    .venv/bin/python bench/settings_table.py --root .cache/mnist-c-canonical-200 \\
        --methods source,norm,tent,cotta --settings reset_each_shift,continual,gradual,mixed_domains
    # correlated needs domains several batches long: 600 digits, severity 5 only
    .venv/bin/python -m pipeline corrupt --digits --limit 600 --out .cache/mnist-c-canonical-600-sev5 \\
        --corruptions benchmark --severities 5 --seed 0
    .venv/bin/python bench/settings_table.py --root .cache/mnist-c-canonical-600-sev5 \\
        --methods source,norm,tent,cotta --settings correlated --per-domain 600
    # every method, continual and mixed domains (issue 25's table)
    .venv/bin/python bench/settings_table.py --root .cache/mnist-c-canonical-200 --methods all \
        --settings continual,mixed_domains --per-domain 100

Settings (pipeline.benchmarks.settings, manifests written by pipeline.benchmarks.layouts.build_manifest):
`reset_each_shift`, `continual`, `mixed_domains` (order seed 0) and `correlated` (Dirichlet delta
0.1, RoTTA's slots, within each domain) stream the severity-5 domains, `--per-domain` digits each;
`gradual` streams severities 5..1 for the first corruption and 1..5..1 for the others (CoTTA's
gradual benchmark), `--gradual-per-domain` digits per severity visit (fewer: the stream visits 131
severity blocks). `reset_each_shift` runs with `ttt.reset_on_domain_change=true`, the others false,
as the manifest's metadata says. A correlated order within a domain only shows when a domain is
longer than a batch: with `--per-domain` equal to the batch size (200) every batch is one whole
domain whatever its order, and the cell equals the continual one. A method is
`configs/mnistc_<method>.yaml` (its reference defaults) on the default source model (the embedded
SmallCNN, `.cache/models`; `ttt`, `ttt_episodic` and `source_rotation` use the one with TTT's
rotation head, `pipeline.embedded.model:small_cnn_rotation`). `--methods all` runs every method (old and
new); EATA's Fisher term and RMT's / SANTA's source samples read the embedded clean training split
(the digits the source model was trained on). Methods in `--short` (the slow ones: MEMO adapts each test
point on 32 views, episodic TTT takes 10 steps per batch) run on the first `--short-per-domain` digits of each
domain instead (gradual streams keep `--gradual-per-domain`). `--csv` is rewritten after every cell. Prints error % per setting (gradual: over the whole stream, and over
its severity-5 rows), and the worker seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SETTINGS = ["reset_each_shift", "continual", "gradual", "mixed_domains", "correlated"]
ALL_METHODS = ("source,norm,bn_alpha,tent,rpl,shot_im,mim,cotta,eata,sar,rotta,lame,deyo,roid,cmf,rmt,santa,"
               "adacontrast,t3a,memo,source_rotation,ttt,ttt_episodic")  # --methods all
# a name that is not a config: (config, overrides). TTT's source model is the one with the rotation head
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "source_rotation": ("mnistc_source.yaml", ["model.factory=pipeline.embedded.model:small_cnn_rotation"]),
}
# methods that read clean source samples: the field, filled with the embedded clean training split
SOURCE_FIELDS = {"eata": "ttt.eata.fisher_data", "rmt": "ttt.rmt.source_data", "santa": "ttt.santa.source_data"}
BATCH_SIZE = 200  # the configs' reference batch
SETTING_PARAMS = {"mixed_domains": {"seed": 0}, "correlated": {"delta": 0.1, "seed": 0}, "gradual": {}}


def build_manifests(root: Path, out: Path, settings: list[str], per_domain: int, gradual_per_domain: int) -> dict[str, tuple[Path, dict]]:
    """One manifest per setting from the CIFAR-C-layout benchmark under `root`."""
    from pipeline.benchmarks.layouts import BENCHMARK_CORRUPTIONS, build_manifest

    manifests = {}
    if "correlated" in settings and per_domain <= BATCH_SIZE:
        print(f"[bench] note: correlated with {per_domain} digits/domain <= batch {BATCH_SIZE}: each batch is a whole "
              "domain, so the label order inside it changes nothing", flush=True)
    for setting in settings:
        gradual = setting == "gradual"
        path, meta = build_manifest(
            "cifar-c", root, out / f"{setting}.parquet", setting=setting, setting_params=SETTING_PARAMS.get(setting),
            corruptions=list(BENCHMARK_CORRUPTIONS), severities=[1, 2, 3, 4, 5] if gradual else [5],
            per_domain=gradual_per_domain if gradual else per_domain, subset="first")
        manifests[setting] = (path, meta)
        print(f"[bench] {setting}: {meta['rows']} rows", flush=True)
    return manifests


def source_split(out: Path) -> Path:
    """The embedded clean training split (the digits the source model was trained on, labelled) as
    the train.npz the MNIST-C default build writes, for the methods that read source samples."""
    import numpy as np

    from pipeline.embedded.mnistc import split_digits

    split = split_digits(0)
    path = out / "train.npz"
    np.savez_compressed(path, x=split["x_train"], y=split["y_train"])
    return path


def run_cell(method: str, manifest: Path, meta: dict, common: list[str], source: Path | None = None) -> Path:
    from pipeline.config import load_config
    from pipeline.job.runner import run_job

    reset = "true" if meta["reset_on_domain_change"] else "false"
    config, extra = VARIANTS.get(method, (f"mnistc_{method}.yaml", []))
    if method in SOURCE_FIELDS and source is not None:
        extra = [*extra, f"{SOURCE_FIELDS[method]}={source}"]
    cfg = load_config(Path("configs") / config,
                      [f"data.manifest={manifest}", f"ttt.reset_on_domain_change={reset}", *extra, *common])
    return run_job(cfg)


def cell_errors(run_dir: Path) -> dict[str, float]:
    """Error % over the stream, over its severity-5 rows, and worker seconds."""
    results = pd.read_parquet(run_dir / "results")
    if results["error"].notna().any():
        raise RuntimeError(f"{run_dir}: {int(results['error'].notna().sum())} error rows")
    sev5 = results["domain"].str.endswith("-5")
    worker_s = float(pd.read_parquet(run_dir / "analysis")["timing_total"].sum())
    return {"error": 100 * (1 - results["correct"].mean()), "error_sev5": 100 * (1 - results.loc[sev5, "correct"].mean()),
            "worker_s": worker_s, "n": len(results)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=".cache/mnist-c-canonical-200", help="CIFAR-C-layout benchmark (pipeline corrupt)")
    parser.add_argument("--methods", default="source,norm,tent,cotta")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--per-domain", type=int, default=200)
    parser.add_argument("--gradual-per-domain", type=int, default=50)
    parser.add_argument("--delta", type=float, default=0.1, help="correlated: Dirichlet concentration")
    parser.add_argument("--slots", type=int, default=None, help="correlated: time slots (default RoTTA's)")
    parser.add_argument("--mix-domains", action="store_true", help="correlated over all domains shuffled together")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--short", default="", help="methods run on the shorter stream (comma list)")
    parser.add_argument("--short-per-domain", type=int, default=100)
    parser.add_argument("--csv", help="the cells so far, rewritten after each one (a run cut short keeps them)")
    args = parser.parse_args()
    if args.methods == "all":
        args.methods = ALL_METHODS
    settings = args.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {SETTINGS}")

    import ray

    SETTING_PARAMS["correlated"] = {"delta": args.delta, "seed": 0, "slots": args.slots, "mix_domains": args.mix_domains}
    out = Path(tempfile.mkdtemp(prefix="bench-settings-"))
    manifests = build_manifests(Path(args.root), out, settings, args.per_domain, args.gradual_per_domain)
    short = [m for m in args.short.split(",") if m]
    short_manifests = (build_manifests(Path(args.root), out / "short", settings, args.short_per_domain,
                                       args.gradual_per_domain) if short else {})
    source = source_split(out)
    common = [f"output_root={out / 'runs'}", "workers.num_shards=1", "workers.num_cpus=0.5", *args.overrides]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = []
    for method in args.methods.split(","):
        for setting in settings:
            started = time.time()
            run_dir = run_cell(method, *(short_manifests if method in short else manifests)[setting], common, source)
            rows.append({"method": method, "setting": setting, **cell_errors(run_dir), "wall_s": time.time() - started})
            print(f"[bench] {method} / {setting}: error {rows[-1]['error']:.2f}% on {rows[-1]['n']} rows, worker "
                  f"{rows[-1]['worker_s']:.1f} s  ({run_dir})", flush=True)
            if args.csv:
                pd.DataFrame(rows).to_csv(args.csv, index=False)
    ray.shutdown()

    cells = pd.DataFrame(rows)
    table = cells.pivot(index="method", columns="setting", values="error")[settings]
    if "gradual" in settings:
        table["gradual_sev5"] = cells[cells.setting == "gradual"].set_index("method")["error_sev5"]
    table = table.loc[args.methods.split(",")]
    table["worker_s"] = cells.groupby("method")["worker_s"].sum()
    print(f"\nerror % per setting, {args.per_domain} digits/domain (gradual {args.gradual_per_domain}/visit; "
          f"{args.short_per_domain} for {args.short or 'none'}), one stream\n")
    print(table.round(2).to_markdown())
    print("\n" + json.dumps({s: manifests[s][1]["rows"] for s in settings}))


if __name__ == "__main__":
    main()
