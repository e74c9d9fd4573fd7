"""The pin change's cost (issue 22): the same Tent step and a process's peak RSS under two torch
builds, side by side in one run, each in its own subprocess (alternating, so machine load hits both).

    .venv/bin/python bench/torch_builds.py --old /tmp/vold/bin/python [--rounds 3] [--steps 30]

`--old` is an interpreter with the old pin (torch 2.13.0, the CPU wheel: `python3.11 -m venv /tmp/vold &&
/tmp/vold/bin/pip install torch==2.13.0 numpy`); the new one is this venv's (torch 2.14.1, the PyPI CUDA
build). The child needs only torch: a SmallCNN-shaped BatchNorm CNN (the embedded default's encoder,
1x28x28) and a ResNet-18-shaped CNN at 32 px, Tent's step (entropy, Adam on the BN affine parameters,
BN on batch statistics, batch 200 / 64), one torch thread as a worker runs. Per build: import time,
RSS after `import torch`, median step time, peak RSS (getrusage) of the process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r'''
import json, resource, sys, time
def rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
t0 = time.perf_counter()
import torch
from torch import nn
t_import = time.perf_counter() - t0
rss_import = rss_mb()
torch.set_num_threads(1)
torch.manual_seed(0)
steps = int(sys.argv[1])

def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

models = {
    "small_cnn_28px_b200": (nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)), (200, 1, 28, 28)),
    "resnet18_like_32px_b64": (nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                             block(64, 64, 1), block(64, 128, 2), block(128, 256, 2), block(256, 512, 2),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)), (64, 3, 32, 32)),
}
out = {"torch": torch.__version__, "import_s": t_import, "rss_after_import_mb": rss_import, "step_s": {}}
for name, (model, shape) in models.items():
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train(); m.track_running_stats = False; m.running_mean = None; m.running_var = None
            m.weight.requires_grad_(True); m.bias.requires_grad_(True); params += [m.weight, m.bias]
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    x = torch.rand(shape)
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        logits = model(x)
        loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if i >= 3:  # warm-up steps not counted
            times.append(time.perf_counter() - t)
    times.sort()
    out["step_s"][name] = times[len(times) // 2]
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
'''


def run(python: str, steps: int) -> dict:
    res = subprocess.run([python, "-c", CHILD, str(steps)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="interpreter with the old torch pin")
    p.add_argument("--new", default=sys.executable, help="interpreter with the new pin (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    got: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
            got[label].append(run(getattr(args, label), args.steps))
    rows = {}
    for label, runs in got.items():
        rows[label] = {"torch": runs[0]["torch"],
                       "import_s": statistics.median(r["import_s"] for r in runs),
                       "rss_after_import_mb": statistics.median(r["rss_after_import_mb"] for r in runs),
                       "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                       **{f"step_ms[{k}]": 1e3 * statistics.median(r["step_s"][k] for r in runs)
                          for k in runs[0]["step_s"]}}
    keys = list(rows["old"])[1:]
    print(f"{'':28}{rows['old']['torch']:>16}{rows['new']['torch']:>16}{'new / old':>12}")
    for k in keys:
        o, n = rows["old"][k], rows["new"][k]
        print(f"{k:28}{o:16.3f}{n:16.3f}{n / o:12.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
