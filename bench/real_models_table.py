"""Method x model family on the embedded canonical benchmark (issue 22): a torchvision ResNet-18
(BatchNorm) and a timm ViT (LayerNorm, patch 7 at 28 px, 4 blocks), each trained here on the clean
training digits (cached under .cache/models), every method through the real job (one shard = one
continual stream over the 15 severity-5 canonical corruptions). Error % and worker seconds per cell.

    .venv/bin/python -m pipeline corrupt --digits --limit 300 --out .cache/mnist-c-canonical-300-sev5 \\
        --corruptions benchmark --severities 5 --seed 0
    .venv/bin/python bench/real_models_table.py --root .cache/mnist-c-canonical-300-sev5 [--train-s 240]

Both models take 3 x 28 x 28 inputs (grey digits replicated by color_mode auto), mean / std 0.5, no
resize; trained with Adam, cross-entropy, batch 64, for `--train-s` seconds each (whole epochs, at
least one), on the same preprocessing (ttt.images) the job applies. Methods use their reference
defaults (the knobs of configs/mnistc_<method>.yaml, flips off for digits); `nn` has no KB for these
models and `mim` no decoder, so both are refused (one line, printed); `norm` / `rotta` on the ViT too.
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

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

METHODS = ["source", "norm", "tent", "mim", "cotta", "nn", "eata", "sar", "rotta", "lame", "deyo", "roid"]
FAMILIES = {
    "resnet18": {"factory": "torchvision.models:resnet18", "factory_kwargs": {"num_classes": 10}},
    "vit_tiny_p7": {"factory": "timm:create_model",
                    "factory_kwargs": {"model_name": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 7,
                                       "depth": 4, "num_classes": 10}},
}
PREPROCESS = {"image_shape": [3, 28, 28], "mean": 0.5, "std": 0.5, "preprocess": "explicit"}


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
    model.eval()
    with torch.no_grad():
        xt = preprocess_items(list(split["x_test"]), ImageSpec.from_model_config(PREPROCESS))
        acc = float((model(xt).argmax(1) == torch.from_numpy(split["y_test"])).float().mean())
    print(f"[bench] {family}: clean test error {100 * (1 - acc):.2f}% after {epoch} epochs", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    (path.with_suffix(".json")).write_text(json.dumps({"epochs": epoch, "clean_error": 1 - acc,
                                                       "train_s": time.time() - t0}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=".cache/mnist-c-canonical-300-sev5")
    parser.add_argument("--cache", default=".cache/models")
    parser.add_argument("--train-s", type=float, default=240.0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--per-domain", type=int, default=300)
    parser.add_argument("--csv")
    args = parser.parse_args()

    import ray

    from pipeline.benchmarks.layouts import BENCHMARK_CORRUPTIONS, build_manifest
    from pipeline.config import ConfigError, load_config
    from pipeline.job.runner import run_job

    out = Path(tempfile.mkdtemp(prefix="bench-real-models-"))
    manifest, meta = build_manifest("cifar-c", Path(args.root), out / "continual.parquet", setting="continual",
                                    corruptions=list(BENCHMARK_CORRUPTIONS), severities=[5], per_domain=args.per_domain)
    print(f"[bench] {meta['rows']} rows, {len(meta['domains'])} domains", flush=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = []
    for family in args.families.split(","):
        ckpt = train(family, Path(args.cache), args.train_s)
        spec = FAMILIES[family]
        for method in args.methods.split(","):
            sets = [f"data.manifest={manifest}", f"output_root={out / 'runs'}", "workers.num_shards=1",
                    f"model.factory={spec['factory']}", f"model.factory_kwargs={json.dumps(spec['factory_kwargs'])}",
                    f"model.checkpoint={ckpt}", *(f"model.{k}={json.dumps(v)}" for k, v in PREPROCESS.items()),
                    "ttt.reset_on_domain_change=false"]
            try:
                cfg = load_config(Path("configs") / f"mnistc_{method}.yaml", sets)
                cfg = cfg.model_copy(update={"kb": cfg.kb.model_copy(update={"dir": None}),
                                             "ttt": cfg.ttt.model_copy(update={"eata": cfg.ttt.eata.model_copy(
                                                 update={"fisher_data": None})})})
                started = time.time()
                run_dir = run_job(cfg)
            except ConfigError as exc:
                rows.append({"family": family, "method": method, "error": None, "worker_s": None,
                             "refused": str(exc)})
                print(f"[bench] {family} / {method}: refused: {exc}", flush=True)
                continue
            results = pd.read_parquet(run_dir / "results")
            worker_s = float(pd.read_parquet(run_dir / "analysis")["timing_total"].sum())
            rows.append({"family": family, "method": method, "error": 100 * (1 - results["correct"].mean()),
                         "worker_s": worker_s, "error_rows": int(results["error"].notna().sum()),
                         "wall_s": time.time() - started, "refused": None})
            print(f"[bench] {family} / {method}: error {rows[-1]['error']:.2f}%, worker {worker_s:.1f} s", flush=True)
    ray.shutdown()
    cells = pd.DataFrame(rows)
    if args.csv:
        cells.to_csv(args.csv, index=False)
    table = cells.pivot(index="method", columns="family", values=["error", "worker_s"])
    print(f"\nerror % and worker seconds, continual, severity 5, {args.per_domain} digits/domain x 15\n")
    print(table.loc[args.methods.split(",")].round(2).to_markdown())
    for r in rows:
        if r["refused"]:
            print(f"refused: {r['family']} / {r['method']}: {r['refused']}")


if __name__ == "__main__":
    main()
