"""Campaign wall time vs the same cells run one `python -m pipeline run` process at a time.

    RAY_AUTH_MODE=disabled .venv/bin/python bench/campaign_vs_runs.py configs/sweeps/mnistc_tta.yaml --cells 8

Both sides run the same first N cells of the sweep (test and validation cells in the sweep's
order) into two fresh output roots under --work: the campaign through `pipeline.campaigns.sweep.execute_cells`
in this process (one Ray instance, started once, included in its time), the other side as one
`pipeline run` subprocess per cell (each starts Python, imports torch and Ray, and starts its own
local Ray instance). Streams are built before either clock starts. Prints both times, the ratio,
and whether both sides produced the same predictions (they must: same configs, same seeds).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.campaigns.spec import expand, load_sweep  # noqa: E402
from pipeline.campaigns.sweep import attach_streams, execute_cells  # noqa: E402


def predictions(run_dir: Path) -> list:
    table = pq.read_table(run_dir / "results", columns=["sample_id", "prediction"])
    return sorted(zip(table.column("sample_id").to_pylist(), table.column("prediction").to_pylist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep")
    parser.add_argument("--cells", type=int, default=8, help="the first N cells of the sweep")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(args.work or tempfile.mkdtemp(prefix="campaign-bench-"))
    spec = load_sweep(args.sweep)
    cells = attach_streams(spec, expand(spec))[: args.cells]  # builds (or finds) the streams: not timed
    import ray

    ray.shutdown()  # the campaign side starts its own instance inside its clock, as `pipeline sweep` does

    def configs(root: Path) -> list:
        return [c.config.model_copy(update={"output_root": str(root)}) for c in cells]

    campaign_root, runs_root = work / "campaign", work / "runs"
    for root in (campaign_root, runs_root):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    t0 = time.perf_counter()
    campaign_dirs = execute_cells(configs(campaign_root))
    t_campaign = time.perf_counter() - t0
    ray.shutdown()

    files = []
    for cfg in configs(runs_root):
        path = work / f"{cfg.run_id}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        files.append(path)
    t0 = time.perf_counter()
    for path in files:
        subprocess.run([sys.executable, "-m", "pipeline", "run", str(path)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    t_runs = time.perf_counter() - t0

    same = all(predictions(a) == predictions(runs_root / a.name) for a in campaign_dirs)
    rows = sum(pq.read_metadata(f).num_rows for d in campaign_dirs for f in (d / "results").glob("part-*.parquet"))
    print(f"cells: {len(cells)} ({rows} rows in all); methods: "
          f"{', '.join(sorted({c.config.ttt.method for c in cells}))}")
    print(f"campaign (one process, one Ray instance):  {t_campaign:7.1f} s  ({t_campaign / len(cells):.1f} s per cell)")
    print(f"one `pipeline run` process per cell:       {t_runs:7.1f} s  ({t_runs / len(cells):.1f} s per cell)")
    print(f"ratio runs / campaign: {t_runs / t_campaign:.2f}x; same predictions: {same}")


if __name__ == "__main__":
    main()
