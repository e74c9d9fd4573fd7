"""Method x model family on the embedded canonical benchmark (issue 22): a torchvision ResNet-18
(BatchNorm) and a timm ViT (LayerNorm, patch 7 at 28 px, 4 blocks), each trained here on the clean
training digits (cached under .cache/models), every registered method (`ttt.methods.METHODS`, so a
new one is in the table without an edit) through the real job (one shard = one continual stream over
the 15 severity-5 canonical corruptions). Error %, worker seconds and the parameter elements each
step changed, per cell.

    .venv/bin/python -m pipeline corrupt --digits --limit 200 --out .cache/mnist-c-canonical-200-sev5 \\
        --corruptions benchmark --severities 5 --seed 0
    .venv/bin/python bench/real_models_table.py --root .cache/mnist-c-canonical-200-sev5 --per-domain 100 \\
        [--train-s 240] [--short memo,cotta,nn --short-per-domain 20] [--csv cells.csv]

Both models take 3 x 28 x 28 inputs (grey digits replicated by color_mode auto), mean / std 0.5, no
resize; trained with Adam, cross-entropy, batch 64, for `--train-s` seconds each (whole epochs, at
least one), on the same preprocessing (ttt.images) the job applies. Methods use their reference
defaults (the knobs of configs/mnistc_<method>.yaml, flips off for digits). The clean training split
(the digits the models were trained on) is written as train.npz beside the manifest: EATA's Fisher
samples, RMT's / SANTA's source data, and the default KB `nn` retrieves from (embedded by each model).
Methods in `--short` run on the first `--short-per-domain` digits of each domain instead (the slow
ones: MEMO adapts each test point on 32 views, CoTTA averages 32 views, nn fine-tunes per query).
Where a method is not defined for a family (`mim` without a `reconstruct` hook, `norm` / `rotta` /
`bn_alpha` without BatchNorm, `ttt` without a rotation head) the job refuses it at start-up in one
line, printed in the table's notes. `--csv` is rewritten after every cell, so a run cut short keeps
the cells it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from ttt.methods import METHODS as REGISTRY

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

METHODS = list(REGISTRY)
FAMILIES = {
    "resnet18": {"factory": "torchvision.models:resnet18", "factory_kwargs": {"num_classes": 10}},
    "vit_tiny_p7": {"factory": "timm:create_model",
                    "factory_kwargs": {"model_name": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 7,
                                       "depth": 4, "num_classes": 10}},
}
PREPROCESS = {"image_shape": [3, 28, 28], "mean": 0.5, "std": 0.5, "preprocess": "explicit"}
# methods that read labelled clean source samples: the field the clean training split fills
SOURCE_FIELDS = {"eata": "ttt.eata.fisher_data", "rmt": "ttt.rmt.source_data", "santa": "ttt.santa.source_data"}


def train(family: str, cache: Path, seconds: float) -> Path:
    """The family's model trained on the clean training digits (cached)."""
    from pipeline.embedded.mnistc import split_digits
    from ttt.images import ImageSpec, preprocess_items
    from workers.models import load_model

    path = cache / f"real-{family}-seed0.pt"
    if path.is_file():
        return path
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(0)
    spec = FAMILIES[family]
    model = load_model(spec["factory"], "none", spec["factory_kwargs"]).train()
    split = split_digits(0)
    x = preprocess_items(list(split["x_train"]), ImageSpec.from_model_config(PREPROCESS))
    y = torch.from_numpy(split["y_train"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0, epoch = time.time(), 0
    gen = torch.Generator().manual_seed(0)
    while epoch == 0 or time.time() - t0 < seconds:
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch += 1
        print(f"[bench] {family}: epoch {epoch}, loss {float(loss):.3f}, {time.time() - t0:.0f} s", flush=True)
    train_s = time.time() - t0
    model.eval()
    with torch.no_grad():
        xt = preprocess_items(list(split["x_test"]), ImageSpec.from_model_config(PREPROCESS))
        acc = float((model(xt).argmax(1) == torch.from_numpy(split["y_test"])).float().mean())
    print(f"[bench] {family}: clean test error {100 * (1 - acc):.2f}% after {epoch} epochs", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"epochs": epoch, "clean_error": 1 - acc, "train_s": train_s}))
    return path


def source_split(out: Path) -> Path:
    """The clean training split as the train.npz the MNIST-C default writes beside its manifest."""
    import numpy as np

    from pipeline.embedded.mnistc import split_digits

    split = split_digits(0)
    path = out / "train.npz"
    np.savez_compressed(path, x=split["x_train"], y=split["y_train"])
    return path


def cell(family: str, method: str, manifest: Path, ckpt: Path, out: Path, source: Path) -> dict:
    """One real job; its row of the table (or the one line it was refused with)."""
    from pipeline.config import ConfigError, load_config
    from pipeline.job.runner import run_job

    spec = FAMILIES[family]
    sets = [f"data.manifest={manifest}", f"output_root={out / 'runs'}", "workers.num_shards=1",
            f"model.factory={spec['factory']}", f"model.factory_kwargs={json.dumps(spec['factory_kwargs'])}",
            f"model.checkpoint={ckpt}", *(f"model.{k}={json.dumps(v)}" for k, v in PREPROCESS.items()),
            f"data.cache_dir={out / 'cache'}", "ttt.reset_on_domain_change=false"]
    if method in SOURCE_FIELDS:
        sets.append(f"{SOURCE_FIELDS[method]}={source}")
    row = {"family": family, "method": method, "error": None, "worker_s": None, "refused": None}
    started = time.time()
    try:
        run_dir = run_job(load_config(Path("configs") / f"mnistc_{method}.yaml", sets))
    except ConfigError as exc:
        row["refused"] = str(exc)
        print(f"[bench] {family} / {method}: refused: {exc}", flush=True)
        return row
    except Exception as exc:  # a failed run is a finding of the table, not the end of the other cells
        row["failed"] = f"{type(exc).__name__}: {exc}"
        print(f"[bench] {family} / {method}: FAILED: {row['failed']}", flush=True)
        return row
    results = pd.read_parquet(run_dir / "results")
    analysis = pd.read_parquet(run_dir / "analysis")
    row.update(error=100 * (1 - results["correct"].mean()), worker_s=float(analysis["timing_total"].sum()),
               rows=len(results), error_rows=int(results["error"].notna().sum()), wall_s=time.time() - started,
               updated_params=int(analysis["updated_param_count"].max()), run_dir=str(run_dir))
    print(f"[bench] {family} / {method}: error {row['error']:.2f}% on {row['rows']} rows, worker "
          f"{row['worker_s']:.1f} s, updated {row['updated_params']} parameter elements", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=".cache/mnist-c-canonical-200-sev5")
    parser.add_argument("--cache", default=".cache/models")
    parser.add_argument("--train-s", type=float, default=240.0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--per-domain", type=int, default=100)
    parser.add_argument("--short", default="", help="methods run on the shorter stream (comma list)")
    parser.add_argument("--short-per-domain", type=int, default=20)
    parser.add_argument("--csv")
    args = parser.parse_args()

    import ray

    from pipeline.benchmarks.layouts import BENCHMARK_CORRUPTIONS, build_manifest

    out = Path(tempfile.mkdtemp(prefix="bench-real-models-"))
    source = source_split(out)  # beside the manifests: nn's default KB is built from it
    manifests = {}
    for n in {args.per_domain, args.short_per_domain}:
        manifests[n], meta = build_manifest("cifar-c", Path(args.root), out / f"continual-{n}.parquet",
                                            setting="continual", corruptions=list(BENCHMARK_CORRUPTIONS),
                                            severities=[5], per_domain=n, subset="first")
        print(f"[bench] {meta['rows']} rows ({n} per domain), {len(meta['domains'])} domains", flush=True)
    short = set(filter(None, args.short.split(",")))
    methods = args.methods.split(",")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows, models = [], {}
    for family in args.families.split(","):
        ckpt = train(family, Path(args.cache), args.train_s)
        models[family] = json.loads(ckpt.with_suffix(".json").read_text())
        for method in methods:
            n = args.short_per_domain if method in short else args.per_domain
            rows.append(cell(family, method, manifests[n], ckpt, out, source))
            if args.csv:
                pd.DataFrame(rows).to_csv(args.csv, index=False)
    ray.shutdown()
    print_table(pd.DataFrame(rows), methods, models, args)


def print_table(cells: pd.DataFrame, methods: list[str], models: dict, args: argparse.Namespace) -> None:
    for family, m in models.items():
        print(f"{family}: trained {m['train_s']:.0f} s ({m['epochs']} epochs), clean test error "
              f"{100 * m['clean_error']:.2f}%")
    print(f"\nerror %, worker seconds, parameter elements updated; continual, severity 5, {args.per_domain} "
          f"digits/domain x 15 ({args.short_per_domain} for {args.short or 'none'})\n")
    table = cells.pivot(index="method", columns="family", values=["error", "worker_s", "updated_params"])
    table.columns = [f"{value} {family}" for value, family in table.columns]
    table = table.reindex(methods).round(2)
    for col in [c for c in table.columns if c.startswith("updated_params")]:
        table[col] = table[col].astype("Int64")
    print(table.to_markdown())
    for r in cells.to_dict("records"):
        for what in ("refused", "failed"):
            if isinstance(r.get(what), str):
                print(f"{what}: {r['family']} / {r['method']}: {r[what]}")


if __name__ == "__main__":
    main()
