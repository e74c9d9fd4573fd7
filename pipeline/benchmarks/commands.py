"""The benchmark room's commands: `python -m pipeline manifest` (a manifest from a benchmark's
layout, in a setting) and `python -m pipeline corrupt` (the canonical corruptions of an image
set). Each parses its arguments, calls the library functions of `layouts` / `corrupt`, and turns
their errors into one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.benchmarks.corrupt import (
    CleanSource,
    CorruptError,
    check_out_dir,
    check_selection,
    generate,
    source_from_arrays,
    source_from_digits,
    source_from_folder,
    source_from_manifest,
)
from pipeline.benchmarks.layouts import (
    ALL_CORRUPTIONS,
    BENCHMARK_CORRUPTIONS,
    HELD_OUT_CORRUPTIONS,
    LAYOUTS,
    LayoutError,
    build_manifest,
    read_lines,
)
from pipeline.benchmarks.settings import SETTINGS, SettingError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _corruption_list(text: str) -> list[str]:
    named = {"benchmark": list(BENCHMARK_CORRUPTIONS), "held_out": list(HELD_OUT_CORRUPTIONS), "all": list(ALL_CORRUPTIONS)}
    return named.get(text) or _csv(text)


def manifest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline manifest",
                                description="Write a Parquet manifest from a standard benchmark layout.")
    p.add_argument("layout", choices=LAYOUTS)
    p.add_argument("root", help="data root (cifar-c: the .npy folder; imagenet-c: the corruption folders; folder: the class folders)")
    p.add_argument("--out", required=True, help="manifest .parquet to write")
    p.add_argument("--corruptions", default="benchmark",
                   help="comma list, or benchmark (the 15, default), held_out (the 4 validation ones), all")
    p.add_argument("--severities", default="5", help="comma list of 1..5 (default 5)")
    p.add_argument("--per-domain", type=int, default=None, help="samples per domain (default all)")
    p.add_argument("--subset", choices=("first", "seeded"), default="first", help="first N, or N drawn by --seed")
    p.add_argument("--subset-file", default=None, help="keep the samples this file lists (one <class>/<file> per line, in order)")
    p.add_argument("--classes", default=None,
                   help="imagenet (the model's ImageNet-1k index of each wnid folder; the default when every folder "
                        "is one), found (sorted folders found), or a file of class folder names in class-index order")
    p.add_argument("--domain", default=None, help="folder layout: the domain name (default the folder's name)")
    p.add_argument("--seed", type=int, default=0, help="the seeded subset's seed")
    p.add_argument("--setting", choices=SETTINGS, default="continual")
    p.add_argument("--order-seed", type=int, default=0, help="mixed_domains / correlated: the ordering seed")
    p.add_argument("--delta", type=float, default=0.1, help="correlated: Dirichlet concentration (0 = sorted by label)")
    p.add_argument("--slots", type=int, default=None, help="correlated: time slots (default min(classes, 100), as RoTTA)")
    p.add_argument("--mix-domains", action="store_true", help="correlated: over all domains shuffled together")
    p.add_argument("--folder-order", choices=("shuffled", "class-sorted"), default="shuffled",
                   help="folder: rows in a seeded shuffle by --order-seed (default) or class by class (every batch "
                        "one class: the worst case for BatchNorm and Tent)")
    p.add_argument("--gradual-all-rising", action="store_true",
                   help="gradual: every corruption 1..5..1 (mariodoebler), not CoTTA's 5..1 first")
    p.add_argument("--imbalance-ratio", type=float, default=10.0,
                   help="imbalanced: n_max / n_min of the exponential long-tail label profile (default 10)")
    p.add_argument("--orders", type=int, default=None,
                   help="write N manifests <out>-order<k>.parquet, the domains in N distinct orders (the first as listed)")
    p.add_argument("--orders-seed", type=int, default=0, help="--orders: seed of the permutations")
    return p


def setting_params(args: argparse.Namespace) -> dict[str, Any]:
    if args.setting == "mixed_domains":
        return {"seed": args.order_seed}
    if args.setting == "correlated":
        return {"delta": args.delta, "seed": args.order_seed, "slots": args.slots, "mix_domains": args.mix_domains}
    if args.setting == "gradual":
        return {"first_descending": not args.gradual_all_rising}
    if args.setting == "imbalanced":
        return {"ratio": args.imbalance_ratio, "seed": args.order_seed}
    return {}


def _ints(text: str, flag: str) -> list[int]:
    """A comma list of integers, or LayoutError naming the flag and the first bad item."""
    items = _csv(text)
    bad = [t for t in items if not t.lstrip("-").isdigit()]
    if bad or not items:
        raise LayoutError(f"{flag} takes a comma list of integers, got {text!r}" + (f" ({bad[0]!r})" if bad else ""))
    return [int(t) for t in items]


def manifest_main(argv: list[str]) -> int:
    args = manifest_parser().parse_args(argv)
    try:
        options: dict[str, Any] = {
            "per_domain": args.per_domain, "subset": "file" if args.subset_file else args.subset, "seed": args.seed,
            "subset_keys": read_lines(args.subset_file) if args.subset_file else None,
            "classes": args.classes if args.classes in (None, "imagenet", "found") else read_lines(args.classes),
        }
        if args.layout == "folder":
            options["domain"] = args.domain
            options["order"], options["order_seed"] = args.folder_order, args.order_seed
        else:
            options["corruptions"] = _corruption_list(args.corruptions)
            options["severities"] = _ints(args.severities, "--severities")
        if args.orders is not None:  # pipeline/benchmarks/orders.py
            from pipeline.benchmarks.orders import build_order_manifests

            for path, meta in build_order_manifests(args.layout, args.root, args.out, args.orders,
                                                    order_seed=args.orders_seed, setting=args.setting,
                                                    setting_params=setting_params(args), **options):
                print(f"wrote {meta['rows']} rows, order {meta['order_index']}: {','.join(meta['domain_order'])} "
                      f"to {path}", flush=True)
            return 0
        path, meta = build_manifest(args.layout, args.root, args.out, setting=args.setting,
                                    setting_params=setting_params(args), **options)
    except (LayoutError, SettingError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    expect = "true" if meta["reset_on_domain_change"] else "false"
    order = meta.get("source", {}).get("order_note")
    print(f"wrote {meta['rows']} rows, {len(meta['domains'])} domains, setting {meta['setting']} to {path}\n"
          + (f"{order}\n" if order else "")
          + f"run it with --set data.manifest={path} --set ttt.reset_on_domain_change={expect} "
          "--set workers.num_shards=1  (one stream; N shards are N independent streams)", flush=True)
    return 0


def corrupt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline corrupt",
                                description="Generate the canonical ImageNet-C corruptions of an image set on Ray.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="clean Parquet manifest (path or pixels, and label)")
    src.add_argument("--folder", help="clean class-folder image set <root>/<class>/*.png|jpg")
    src.add_argument("--images", help="clean N x H x W [x C] uint8 .npy (with --labels)")
    src.add_argument("--digits", action="store_true", help="the embedded default's held-out clean MNIST digits")
    p.add_argument("--labels", help="labels .npy for --images")
    p.add_argument("--image-shape", default=None, help="H,W[,C] of a manifest's flat pixels (default square grey)")
    p.add_argument("--limit", type=int, default=None, help="--digits: only the first N")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layout", choices=("cifar-c", "files"), default="cifar-c")
    p.add_argument("--corruptions", default="all",
                   help="comma list, or all (the 15 + 4 held out, default), benchmark (the 15), held_out (the 4)")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=None, help="cap on concurrent Ray tasks (default: what the cluster fits)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Ray task")
    p.add_argument("--with-held-out", action="store_true",
                   help="also put the 4 held-out validation corruptions into manifest.parquet (default: they get "
                        "manifest_held_out.parquet, so the test stream never holds them)")
    return p


def _names(text: str) -> list[str]:
    named = {"all": list(ALL_CORRUPTIONS), "benchmark": list(BENCHMARK_CORRUPTIONS), "held_out": list(HELD_OUT_CORRUPTIONS)}
    return named.get(text) or [t.strip() for t in text.split(",") if t.strip()]


def source_from_args(args: argparse.Namespace) -> CleanSource:
    if args.digits:
        return source_from_digits(args.seed, args.limit)
    if args.folder:
        return source_from_folder(args.folder)
    if args.images:
        if not args.labels:
            raise CorruptError("--images needs --labels")
        return source_from_arrays(args.images, args.labels)
    shape = _ints(args.image_shape, "--image-shape") if args.image_shape else None
    return source_from_manifest(args.manifest, shape)


def corrupt_main(argv: list[str]) -> int:
    args = corrupt_parser().parse_args(argv)
    try:
        corruptions, severities = _names(args.corruptions), _ints(args.severities, "--severities")
        check_selection(corruptions, severities)
        check_out_dir(args.out)  # before Ray starts, like every other refusal
        source = source_from_args(args)
        from pipeline.job.ray_start import init_ray

        init_ray()
        manifest = generate(source, args.out, corruptions=corruptions, severities=severities, layout=args.layout,
                            seed=args.seed, num_workers=args.num_workers, batch_size=args.batch_size,
                            include_held_out=args.with_held_out)
    except (CorruptError, LayoutError, SettingError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    n = len(source) * len(corruptions) * len(severities)
    skipped = f"; skipped {len(source.skipped)} clean image(s) (see corrupt.json)" if source.skipped else ""
    print(f"wrote {n} corrupted images ({len(corruptions)} corruptions x {len(severities)} severities x "
          f"{len(source)}) to {args.out}; test manifest {manifest}{skipped}"
          + ("" if args.with_held_out or not (set(corruptions) & set(HELD_OUT_CORRUPTIONS)) or
             set(corruptions) <= set(HELD_OUT_CORRUPTIONS) else
             f" (without the held-out {', '.join(sorted(set(corruptions) & set(HELD_OUT_CORRUPTIONS)))}: "
             f"manifest_held_out.parquet; --with-held-out to include them)"), flush=True)
    return 0
