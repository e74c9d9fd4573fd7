"""The issue-24 benchmark on Fashion-MNIST-C: methods x {continual offline, continual online (eta 1),
mixed, correlated}, error with 95% Wilson intervals (and the spread over domain orders where
`--orders` > 1), ECE, clean-data error at the end of the stream (the probes), worker seconds,
adapted share, passes per sample, peak RSS. All cells run as one job over one worker pool
(pipeline.job.runner.run_jobs). Needs `python -m pipeline build-fmnistc --per-domain N` first.

  RAY_AUTH_MODE=disabled .venv/bin/python bench/fmnistc_protocols.py --build .cache/fmnistc/n2000-sev5-seed0 \
      --per-domain 1000 --methods source,norm,tent,eata,sar,rotta,lame,roid --orders 3 --order-methods norm,tent

`--seeds N` runs mixed / correlated on N shuffle seeds too, `--end-probes` scores every cell's end-of-stream state
on the clean set (forgetting), and `--summarise` prints the BENCHMARKS tables from OUT's table.csv / orders.csv.
A rerun with the same `--stamp` and `--out` skips finished cells and resumes partial ones.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline.analysis.stats import hierarchical_bootstrap, wilson_ci  # noqa: E402
from pipeline.benchmarks.layouts import BENCHMARK_CORRUPTIONS, build_manifest  # noqa: E402
from pipeline.benchmarks.orders import build_order_manifests  # noqa: E402
from pipeline.config import load_config  # noqa: E402

SETTINGS = {"continual": ("continual", {}), "online": ("continual", {}), "mixed": ("mixed_domains", {"seed": 0}),
            "correlated": ("correlated", {"delta": 0.1, "seed": 0})}


def manifests(build: Path, per_domain: int, orders: int, out: Path, seeds: int = 1) -> dict[str, list[Path]]:
    """Each setting's manifests: mixed and correlated once per shuffle seed (0 first), continual once
    per domain order (the listed one first); online streams the continual ones."""
    opts = {"corruptions": list(BENCHMARK_CORRUPTIONS), "severities": [5], "per_domain": per_domain}
    got: dict[str, list[Path]] = {}
    for name, (setting, params) in SETTINGS.items():
        if name == "online":
            continue
        got[name] = []
        for seed in range(seeds if "seed" in params else 1):
            path, _ = build_manifest("cifar-c", build / "c", out / (f"{name}.parquet" if seed == 0 else f"{name}-s{seed}.parquet"),
                                     setting=setting, setting_params={**params, "seed": seed} if "seed" in params else params,
                                     **opts)
            got[name].append(path)
    if orders > 1:
        got["continual_orders"] = [p for p, _ in build_order_manifests("cifar-c", build / "c", out / "continual.parquet",
                                                                      orders, order_seed=0, **opts)][1:]
    got["online"] = got["continual"]
    return got


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--build", default=".cache/fmnistc/n2000-sev5-seed0")
    p.add_argument("--checkpoint", default=".cache/models/fashion_resnet8w8-v1-seed0-e3.pt")
    p.add_argument("--per-domain", type=int, default=1000)
    p.add_argument("--methods", default="source,norm,tent,eata,sar,rotta,lame,roid")
    p.add_argument("--settings", default="continual,online,mixed,correlated")
    p.add_argument("--orders", type=int, default=1, help="continual: this many domain orders (the first = listed)")
    p.add_argument("--seeds", type=int, default=1, help="mixed / correlated: this many shuffle seeds (0 first)")
    p.add_argument("--order-methods", default="norm,tent", help="methods run on every order and seed")
    p.add_argument("--only", action="append", default=[], metavar="SETTING=M1,M2",
                   help="run SETTING for these methods only (repeatable; default: every method in every setting)")
    p.add_argument("--stamp", default=None, help="run-id prefix; an earlier run's resumes its cells (default: now)")
    p.add_argument("--probe-method", default="tent", help="continual offline of this method runs with probes too")
    p.add_argument("--end-probes", action="store_true",
                   help="every other cell probes the source and its end-of-stream state (forgetting at the end)")
    p.add_argument("--out", default="runs/bench-fmnistc")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--summarise", action="store_true",
                   help="only rebuild OUT/orders.csv from OUT/table.csv and print the BENCHMARKS tables")
    p.add_argument("--num-workers", type=int, default=1, help="the pool's workers: cells run side by side")
    args = p.parse_args()
    build, out = Path(args.build), Path(args.out)
    if args.summarise:
        over_orders(pd.read_csv(out / "table.csv").to_dict("records")).to_csv(out / "orders.csv", index=False)
        print(markdown_tables(out))
        return
    out.mkdir(parents=True, exist_ok=True)
    files = manifests(build, args.per_domain, args.orders, out / "manifests", args.seeds)
    base = [f"model.checkpoint={args.checkpoint}", f"output_root={out}", "workers.num_shards=1", "workers.num_cpus=1",
            f"workers.num_workers={args.num_workers}",
            "workers.checkpoint_every=10", "workers.progress_interval_s=30", f"probes.clean={build / 'clean.parquet'}",
            "probes.clean_n=1000", "probes.per_domain=100", f"ttt.eata.fisher_data={build / 'train.npz'}"]
    stamp = args.stamp or time.strftime("%H%M%S")
    methods = args.methods.split(",")
    only = {k: v.split(",") for k, _, v in (o.partition("=") for o in args.only)}
    # Setting-major, extra orders last: a campaign cut short still has whole settings for every method.
    plan = [(setting, method, 0, files[setting][0]) for setting in args.settings.split(",") for method in methods
            if method in only.get(setting, methods)]
    plan += [("continual", method, k + 1, path) for method in methods if method in args.order_methods.split(",")
             for k, path in enumerate(files.get("continual_orders", []))]
    # mixed / correlated on more shuffle seeds: labelled as orders, so orders.csv aggregates them the same way
    plan += [(setting, method, k, files[setting][k]) for setting in ("mixed", "correlated") if setting in args.settings.split(",")
             for method in methods if method in args.order_methods.split(",") and method in only.get(setting, methods)
             for k in range(1, len(files[setting]))]
    cells = []  # (label dict, config)
    for setting, method, k, path in plan:
        extra = ["ttt.protocol=online", f"ttt.online.eta={args.eta}"] if setting == "online" else []
        probe = method == args.probe_method and setting == "continual" and k == 0
        for probed in ([False, True] if probe else [False]):
            run_id = f"{stamp}-{method}-{setting}-o{k}" + ("-probes" if probed else "")
            # a period longer than any stream probes only position 0 and the final state
            every = 1 if probed else (10**9 if args.end_probes else 0)
            cfg = load_config(f"configs/fmnistc_{method}.yaml", base + extra + [
                f"data.manifest={path}", f"run_id={run_id}", f"probes.every={every}"])
            cells.append(({"method": method, "setting": setting, "order": k, "probes": probed}, cfg))
    from pipeline.job.runner import run_jobs

    rows: list[dict] = []
    pd.set_option("display.width", 250)

    def done(i: int, run_dir: Path) -> None:  # the table after every cell: a cut-short campaign keeps what ran
        rows.append(table_row(cells[i][0], run_dir, out))
        pd.DataFrame(rows).to_csv(out / "table.csv", index=False)
        over_orders(rows).to_csv(out / "orders.csv", index=False)
        print(f"[bench] cell {len(rows)}/{len(cells)} done: {cells[i][0]} error {rows[-1]['error']:.4f}", flush=True)

    t0 = time.perf_counter()
    print(f"[bench] {len(cells)} cells", flush=True)
    run_jobs([c for _, c in cells], on_done=done)
    print(f"{len(cells)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


ORDER_COLUMNS = ["method", "setting", "orders", "error", "lo", "hi", "min", "max", "ece", "clean_error_end",
                 "clean_orders", "worker_s"]


def over_orders(rows: list[dict]) -> pd.DataFrame:
    """One row per (method, setting) run on several domain orders: the error averaged over orders
    with a two-level bootstrap interval (orders, then each domain's samples; pipeline/analysis/stats),
    the orders' range, and the clean-data error at the end averaged over the orders that probed it."""
    table = pd.DataFrame(rows)
    got = []
    for (method, setting), cells in (table[~table["probes"]].groupby(["method", "setting"]) if len(table) else []):
        if len(cells) < 2:
            continue
        per_domain = [json.loads((Path(d) / "summary.json").read_text())["per_domain"] for d in cells["run_dir"]]
        domains = sorted(per_domain[0])
        n = np.array([[pdm[d]["n"] for d in domains] for pdm in per_domain])
        wrong = np.array([[round(pdm[d]["error"] * pdm[d]["n"]) for d in domains] for pdm in per_domain])
        error, lo, hi = hierarchical_bootstrap(wrong, n)
        clean = cells["clean_error_end"].dropna() if "clean_error_end" in cells else pd.Series(dtype=float)
        got.append({"method": method, "setting": setting, "orders": len(cells), "error": error, "lo": lo, "hi": hi,
                    "min": cells["error"].min(), "max": cells["error"].max(), "ece": cells["ece"].mean(),
                    "clean_error_end": clean.mean() if len(clean) else None, "clean_orders": len(clean),
                    "worker_s": cells["worker_s"].mean()})
    return pd.DataFrame(got, columns=ORDER_COLUMNS)  # the columns even when no cell has several orders yet


STATELESS = ("source", "norm", "lame")  # no state from one batch to the next: every domain order gives the same rows


def markdown_tables(out: Path) -> str:
    """BENCHMARKS.md's two tables from OUT/table.csv and OUT/orders.csv: error per setting, then
    calibration, clean error at the end, cost. Order 0 of each setting unless a column says otherwise."""
    full = pd.read_csv(out / "table.csv")
    cells, orders = full[~full["probes"]], pd.read_csv(out / "orders.csv")
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    with_ci = lambda r: "not run" if r is None else f"{pct(r.error)} [{pct(r.lo)}, {pct(r.hi)}]"  # noqa: E731

    def cell(method: str, setting: str):
        got = cells[(cells["method"] == method) & (cells["setting"] == setting) & (cells["order"] == 0)]
        return None if got.empty else got.iloc[0]

    lines = ["| method | continual offline (order 0) | continual, 3 orders: mean [95%] (range) | online, eta 1 (adapted) "
             "| mixed | correlated |", "| --- | --- | --- | --- | --- | --- |"]
    table2 = ["| method | ECE: cont. / online / mixed / corr. | NLL cont. | clean error at the end: cont. / online / mixed / "
              "corr. | worker s: cont. / online / mixed / corr. | fwd / bwd per sample (cont.) | peak RSS MB |",
              "| --- | --- | ---: | --- | --- | --- | ---: |"]
    published = ["source", "norm", "tent", "eata", "sar", "cotta", "rotta", "lame", "roid"]  # the published table's order
    for method in sorted(set(cells["method"]), key=lambda m: (published.index(m) if m in published else len(published), m)):
        cont, online, mixed, corr = (cell(method, s) for s in ("continual", "online", "mixed", "correlated"))
        agg = orders[(orders["method"] == method) & (orders["setting"] == "continual")]
        if len(agg) and agg.iloc[0]["orders"] >= 3:
            a = agg.iloc[0]
            over = f"{pct(a.error)} [{pct(a.lo)}, {pct(a.hi)}] ({pct(a['min'])}-{pct(a['max'])})"
        else:
            over = "= order 0 (no state across batches)" if method in STATELESS else "not run"
        if online is None:
            onl = "= offline (cost 1)" if method in STATELESS else "not run"
        else:
            onl = f"{with_ci(online)} ({online.adapted:.2f})"
        lines.append(f"| {method} | {with_ci(cont)} | {over} | {onl} | {with_ci(mixed)} | {with_ci(corr)} |")
        probed = full[(full["method"] == method) & (full["setting"] == "continual") & full["clean_error_end"].notna()]
        clean = ["-" if probed.empty else pct(probed["clean_error_end"].mean()) + (f" ({len(probed)} orders)" if len(probed) > 1 else "")]
        if method in STATELESS and mixed is not None and pd.notna(mixed.clean_error_end):
            clean = [pct(mixed.clean_error_end) + " (no state)"]
        clean += ["-" if r is None or pd.isna(r.clean_error_end) else pct(r.clean_error_end) for r in (online, mixed, corr)]
        four = (cont, online, mixed, corr)
        table2.append(f"| {method} | {' / '.join('-' if r is None else f'{r.ece:.3f}' for r in four)} | {cont.nll:.2f} | "
                      f"{' / '.join(clean)} | {' / '.join('-' if r is None else f'{r.worker_s:.0f}' for r in four)} | "
                      f"{cont.fwd:.2f} / {cont.bwd:.2f} | {cont.rss_mb:.0f} |")
    return "\n".join(lines + [""] + table2)


def table_row(label: dict, run_dir: Path, out: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    o, cost = s["overall"], s.get("cost") or {}
    wrong = round(o["error"] * o["scored"])
    lo, hi = wilson_ci(wrong, o["scored"])
    row = {**label, "n": o["scored"], "error": o["error"], "lo": lo, "hi": hi, "ece": o.get("ece"),
           "nll": o.get("nll"), "brier": o.get("brier"), "worker_s": cost.get("worker_s"),
           "adapt_s_per_1k": 1000 * (cost.get("adapt_s_per_sample") or 0), "fwd": cost.get("forward_passes_per_sample"),
           "bwd": cost.get("backward_passes_per_sample"),
           "rss_mb": max([v["rss_mb"] or 0 for v in (cost.get("peak_memory_mb") or {}).values()] or [0]),
           "adapted": (s.get("protocol") or {}).get("adapted_fraction"), "samples_per_s": s["throughput"]["samples_per_s"],
           "run_dir": str(run_dir)}
    probes_dir = run_dir / "probes"
    if probes_dir.is_dir():
        pr = pd.read_parquet(probes_dir)
        clean = pr[pr["probe_set"] == "clean"].set_index("position")["error"]
        row["clean_error_end"] = float(clean.loc[clean.index.max()])
        # a resumed run probes no source model (position 0): it was not the one that started the stream
        row["clean_error_start"] = float(clean.loc[0]) if 0 in clean.index else None
        if label["probes"]:  # the along-the-stream probes; end-only probes stay in the run's probes/
            pr.to_csv(out / f"probes-{label['method']}.csv", index=False)
    return row


if __name__ == "__main__":
    main()
