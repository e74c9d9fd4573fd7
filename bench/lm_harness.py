"""lm-evaluation-harness runs of `ttt-nn` (pipeline/harness.py) on the embedded tiny GPT-2: the
local tasks with and without TTT, and the fan-out speed-up with 2 Ray workers against 1.

    RAY_AUTH_MODE=disabled .venv/bin/python bench/lm_harness.py [--limit 100] [--fanout-limit 40]
        [--fanout-task ttt_text_rolling] [--workers 2]

Every variant is `python -m pipeline lm-eval --model ttt-nn --tasks TASK --limit N --model_args
workers=W,ttt.method=M` (configs/lm_nn.yaml: k=20, lr 2e-3, LoRA rank 8), run through the same
code (`pipeline.harness.evaluate`) one after another in one process and one Ray instance:
1. ttt_text_choices (next-line multiple choice, acc / acc_norm) and ttt_text_rolling (held-out
   chunks, bits per byte), each `source` vs `nn`, the first `--limit` documents of each;
2. the fan-out: the same `--fanout-limit` documents of `--fanout-task` with `nn` on 1 worker, then
   on 2, twice in that order (the second run of each is reported): evaluation wall time (model start-up excluded) and its ratio, and whether every request's
   answer is identical (nn resets to the base LoRA per context, so it must be).
Prints markdown tables. The first run builds the tiny LM and its KB (`python -m pipeline build-data
configs/lm_nn.yaml`, a few minutes); later runs reuse them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipeline.harness import evaluate  # noqa: E402  (after sys.path: runnable from a checkout)

METRICS = {"ttt_text_choices": ["acc", "acc_norm"], "ttt_text_rolling": ["bits_per_byte", "byte_perplexity"]}


def run(task: str, limit: int, method: str, workers: int) -> dict:
    """One `python -m pipeline lm-eval` run; prints the command it stands for."""
    argv = ["--tasks", task, "--limit", str(limit), "--model_args", f"workers={workers},ttt.method={method}"]
    print(f"[bench] python -m pipeline lm-eval {' '.join(argv)}", flush=True)
    out = evaluate(argv)
    analysis = pd.read_parquet(out["run_dir"] / "analysis")
    out["finetune_s"] = float(analysis["timing_fine_tuning"].fillna(0).mean())
    out["requests"] = pd.read_parquet(out["run_dir"] / "requests").sort_values("request_index")
    return out


def metric(out: dict, task: str, name: str) -> float:
    return float(next(v for k, v in out["results"]["results"][task].items() if k.split(",")[0] == name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100, help="documents per task for the source/nn table (0: no table)")
    p.add_argument("--fanout-limit", type=int, default=40)
    p.add_argument("--fanout-task", default="ttt_text_rolling", choices=sorted(METRICS))
    p.add_argument("--workers", type=int, default=2, help="workers of the source/nn table runs")
    args = p.parse_args()

    rows = []
    for task in (METRICS if args.limit > 0 else []):
        for method in ("source", "nn"):
            out = run(task, args.limit, method, args.workers)
            rows.append({"task": task, "method": method, "documents": args.limit, "adaptations": out["adaptations"],
                         **{m: round(metric(out, task, m), 4) for m in METRICS[task]},
                         "fine-tune s/doc": round(out["finetune_s"], 3), "eval wall s": round(out["wall_s"], 1)})
    if rows:
        print("\n" + pd.DataFrame(rows).to_markdown(index=False))

    fan = {w: run(args.fanout_task, args.fanout_limit, "nn", w) for w in (1, 2, 1, 2)}  # 1 then 2, twice: keep the second of each
    same = fan[1]["requests"]["loglik"].tolist() == fan[2]["requests"]["loglik"].tolist()
    table = [{"workers": w, "documents": args.fanout_limit, "adaptations": fan[w]["adaptations"],
              "eval wall s": round(fan[w]["wall_s"], 1), "speed-up vs 1": round(fan[1]["wall_s"] / fan[w]["wall_s"], 2),
              METRICS[args.fanout_task][0]: round(metric(fan[w], args.fanout_task, METRICS[args.fanout_task][0]), 4)}
             for w in (1, 2)]
    print(f"\nfan-out, {args.fanout_task}, nn (every answer identical across worker counts: {same})\n")
    print(pd.DataFrame(table).to_markdown(index=False))


if __name__ == "__main__":
    main()
