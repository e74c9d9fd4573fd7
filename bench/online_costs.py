"""Each method's step cost relative to the source model's forward, measured the way
MotasemAlfarra/Online_Test_Time_Adaptation measures it (utils/online_eval.py: the wall time of the
method's adapt-and-predict on a batch divided by the plain forward of the same network on it; here
the median over batches, as utils/compute_average_complexity.py takes the median over runs), on
this machine, plus the passes counted (ttt/passes.py). Prints a table and the `--set` overrides
that make `ttt.protocol: online` use these ratios instead of the default table.

  .venv/bin/python bench/online_costs.py --manifest .cache/fmnistc/n2000-sev5-seed0/continual.parquet \
      --checkpoint .cache/models/fashion_resnet8w8-v1-seed0-e3.pt --batches 6
"""
from __future__ import annotations

import argparse
import statistics
import time

import pyarrow.parquet as pq
import torch

from pipeline.config import load_config
from ttt import build_method
from ttt.passes import counter_for
from ttt.protocol import DEFAULT_COSTS
from workers.ttt_worker import build_adapter

METHODS = ["source", "norm", "tent", "eata", "sar", "rotta", "lame", "roid", "deyo", "cotta"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config-dir", default="configs")
    p.add_argument("--manifest", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = pq.read_table(args.manifest).slice(0, args.batches * args.batch_size).to_pylist()
    print(f"{'method':<8}{'ratio':>8}{'default':>9}{'fwd/sample':>12}{'bwd/sample':>12}{'step ms':>9}")
    sets = []
    for name in args.methods.split(","):
        cfg = load_config(f"{args.config_dir}/fmnistc_{name}.yaml",
                          [f"data.manifest={args.manifest}", f"model.checkpoint={args.checkpoint}",
                           f"ttt.batch_size={args.batch_size}"])
        adapter = build_adapter(cfg.model.model_dump(), "cpu")
        method = build_method(adapter, cfg.ttt)
        counter = counter_for(method)
        ratios, steps, f_rows, b_rows = [], [], 0, 0
        for batch in adapter.build_loader(rows, batch_size=args.batch_size):
            f0, b0 = counter.snapshot()
            t0 = time.perf_counter()
            method.step(batch.inputs)
            t_step = time.perf_counter() - t0
            f1, b1 = counter.snapshot()
            f_rows, b_rows = f_rows + f1 - f0, b_rows + b1 - b0
            with torch.no_grad():  # the plain forward of the same network, as the reference's model.model
                t0 = time.perf_counter()
                method.model(batch.inputs)
                t_base = time.perf_counter() - t0
            ratios.append(t_step / t_base)
            steps.append(t_step)
        n = len(ratios) * args.batch_size
        ratio = statistics.median(ratios)
        print(f"{name:<8}{ratio:>8.2f}{DEFAULT_COSTS.get(name, 1.0):>9.1f}{f_rows / n:>12.2f}{b_rows / n:>12.2f}"
              f"{1000 * statistics.median(steps):>9.0f}", flush=True)
        sets.append(f"--set ttt.online.costs.{name}={ratio:.2f}")
    print("measured table for ttt.protocol=online:\n  " + " ".join(sets))


if __name__ == "__main__":
    main()
