"""Retrieval TTT on the embedded tiny LM: bits per byte on held-out text, no TTT vs `nn` with
k neighbours, and the adapter cache on a stream that asks each query twice. Every variant runs
through the real pipeline (configs/lm_nn.yaml) in one Ray instance, one after another.

    .venv/bin/python bench/lm_nn.py [--limit 200] [--ks 0,5,20,50] [--repeat 50] [--shards 2]
    .venv/bin/python bench/lm_nn.py --choices      # next-line multiple choice instead

Prints two markdown tables:
1. per variant: bits per byte (pooled over bytes), mean per-query bits per byte, the share of
   queries whose bits per byte went down against no TTT, fine-tuning seconds per query, wall s;
2. the cache: the first `--repeat` queries, each asked twice in a row (a user re-asking), with
   the cache off and on: hit rate, summed fine-tuning seconds, wall s, and whether the cached
   answers' bits per byte equal the freshly adapted ones.
The first run builds the text default (LM ~3-5 min, KB ~2 min on 2 cores); later runs reuse it.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
CONFIG = Path("configs") / "lm_nn.yaml"


def run(overrides: list[str]) -> Path:
    from pipeline.config import load_config
    from pipeline.job.runner import run_job

    return run_job(load_config(CONFIG, overrides))


def read(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    results = pd.read_parquet(run_dir / "results").sort_values("position").reset_index(drop=True)
    analysis = pd.read_parquet(run_dir / "analysis")
    return results, analysis, json.loads((run_dir / "summary.json").read_text())


def repeated_manifest(queries: Path, n: int, out: Path) -> Path:
    """The first n queries, each twice in a row: the second ask is a cache hit in the same shard."""
    rows = pq.read_table(queries).slice(0, n).to_pylist()
    twice = [dict(r, sample_id=f"{r['sample_id']}-{ask}") for r in rows for ask in ("a", "b")]
    for i, r in enumerate(twice):
        r["position"] = i
    path = out / "repeated.parquet"
    pq.write_table(pa.Table.from_pylist(twice), path)
    return path


def choice_table(common: list[str], limit: int | None) -> pd.DataFrame:
    """Next-line multiple choice (data.dataset=text_choices): no TTT vs nn, accuracy by summed
    and by per-byte log-likelihood of the choices, and the contexts' bits per byte."""
    rows = []
    for name, extra in (("no TTT (source)", ["ttt.method=source"]), ("nn", [])):
        run_dir = run(common + ["data.dataset=text_choices", *extra] + ([f"data.limit={limit}"] if limit else []))
        results, _, summary = read(run_dir)
        manifest = pq.read_table(json.loads((run_dir / "run.json").read_text())["config"]["data"]["manifest"],
                                 columns=["sample_id", "choices"]).to_pandas().set_index("sample_id")
        per_byte = [
            int(max(range(len(ll)), key=lambda i: ll[i] / len(manifest.loc[sid, "choices"][i].encode()))) == label
            for sid, ll, label in zip(results["sample_id"], results["choice_logliks"], results["label"])]
        rows.append({"variant": name, "questions": len(results), "accuracy": results["correct"].astype(bool).mean(),
                     "accuracy, per-byte log-lik": sum(per_byte) / len(per_byte),
                     "context bits/byte": summary["overall"]["bits_per_byte"], "wall s": summary["throughput"]["wall_s"]})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=200, help="held-out queries (of 200)")
    parser.add_argument("--ks", default="0,5,20,50", help="neighbour counts to compare")
    parser.add_argument("--repeat", type=int, default=50, help="queries in the asked-twice cache stream (0: skip)")
    parser.add_argument("--choices", action="store_true",
                        help="only the multiple-choice comparison (text_choices; --limit questions if < 163)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import ray

    out = Path(tempfile.mkdtemp(prefix="bench-lm-nn-"))
    common = [f"output_root={out}", f"workers.num_shards={args.shards}", "ttt.nn.logit_lens_top_k=0",
              *args.overrides]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    if args.choices:
        print("\nnext-line multiple choice, 4 options (chance 0.25)\n")
        print(choice_table(common, args.limit if args.limit < 163 else None).to_markdown(index=False, floatfmt=".4f"))
        return

    rows, per_query = [], {}
    variants = [("no TTT (source)", ["ttt.method=source"])] + [
        (f"nn k={k}", [f"ttt.nn.k={k}"]) for k in (int(k) for k in args.ks.split(","))]
    for name, extra in variants:
        run_dir = run(common + [f"data.limit={args.limit}", *extra])
        results, analysis, summary = read(run_dir)
        per_query[name] = results["bits_per_byte"]
        rows.append({"variant": name, "bits/byte": summary["overall"]["bits_per_byte"],
                     "mean per-query bits/byte": results["bits_per_byte"].mean(),
                     "fine-tune s/query": analysis["timing_fine_tuning"].mean() if "nn" in name else 0.0,
                     "wall s": summary["throughput"]["wall_s"], "error rows": summary["overall"]["errors_rows"]})
    base = per_query["no TTT (source)"]
    for row in rows:
        row["queries improved %"] = 100 * float((per_query[row["variant"]] < base - 1e-12).mean())
    print(f"\n{args.limit} held-out queries, {args.shards} shards\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"))

    if args.repeat == 0:
        print(f"\nruns under {out}")
        return
    from pipeline.config import load_config
    from pipeline.embedded.text import ensure_text_manifest

    queries = ensure_text_manifest(Path(load_config(CONFIG, common).data.cache_dir) / "text")
    manifest = repeated_manifest(queries, args.repeat, out)
    cache_rows, fresh = [], None
    for name, extra in (("cache off", ["ttt.nn.use_cache=false"]), ("cache on @0.95", ["ttt.nn.use_cache=true"])):
        results, analysis, summary = read(run(common + [f"data.manifest={manifest}", *extra]))
        cache = summary["cache"] or {}
        same = None
        if fresh is not None:
            same = bool((results["bits_per_byte"] == fresh["bits_per_byte"]).all())
        else:
            fresh = results
        cache_rows.append({"variant": name, "queries": len(results), "hit rate": cache.get("hit_rate", 0.0),
                           "fine-tune s (sum)": analysis["timing_fine_tuning"].sum(),
                           "wall s": summary["throughput"]["wall_s"],
                           "bits/byte": summary["overall"]["bits_per_byte"],
                           "bits/byte equal to cache off": same})
    off, on = cache_rows
    print(f"\n{args.repeat} queries asked twice in a row; fine-tuning time saved "
          f"{100 * (1 - on['fine-tune s (sum)'] / off['fine-tune s (sum)']):.0f}%, "
          f"wall time ratio on/off {on['wall s'] / off['wall s']:.2f}\n")
    print(pd.DataFrame(cache_rows).to_markdown(index=False, floatfmt=".4f"))
    print(f"\nruns under {out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
