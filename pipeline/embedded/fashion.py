"""Fashion-MNIST, offline: the data (Debian's `dataset-fashion-mnist`, 60,000 train / 10,000 test
28 x 28 grey images as idx.gz files), and the benchmark's source model: a small BatchNorm ResNet
trained on the 60,000 training images, cached. The corrupted stream (Fashion-MNIST-C) is built from
these by `pipeline.benchmarks.fmnistc` with the `corrupt` machinery.

Where the idx files come from, first found: a folder the user names (`idx_dir`, the four files
`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-...`), the installed package
(`/usr/share/datasets/fashion-mnist`), or `apt-get download dataset-fashion-mnist` into the cache
unpacked with `dpkg-deb -x` (no install, no root needed).

The model (`fashion_resnet`, a model factory like `small_cnn`): a CIFAR-style ResNet (He et al.
2016, section 4.2: 3x3 stem, three stages of BasicBlocks at widths w, 2w, 4w, stride 2 between
stages, global average pooling), w = 8 and one block per stage (ResNet-8; 20k parameters: on the shared 2-core machine a width-16 step
cost 0.9 s per 128 images, too slow for a stream of 150,000), BatchNorm after every
conv; `embed` gives the pooled features (LAME's kNN affinity, the KB of method nn). It has no
`reconstruct` hook, so MIM does not run on it.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
         "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images (pixel / 255)
MODEL_VERSION = 1


class FashionDataError(RuntimeError):
    """The idx files cannot be found or read; one line."""


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def idx_folder(cache_dir: str | Path, idx_dir: str | Path | None = None) -> Path:
    """A folder holding the four idx files (module docstring: user folder, system, apt download)."""
    if idx_dir is not None:
        folder = Path(idx_dir)
        missing = [s for s in FILES.values() if _find(folder, s) is None]
        if missing:
            raise FashionDataError(f"{folder}: missing Fashion-MNIST idx file(s) {missing}")
        return folder
    for folder in (SYSTEM_DIR, Path(cache_dir) / "fashion-mnist" / "deb" / "usr/share/datasets/fashion-mnist"):
        if all(_find(folder, s) for s in FILES.values()):
            return folder
    return _apt_download(Path(cache_dir) / "fashion-mnist")


def _apt_download(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        print(f"[fashion-mnist] apt-get download {PACKAGE} (~31 MB, once) into {root}", flush=True)
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True, text=True)
            debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
            if not debs:
                raise FashionDataError(f"apt-get download {PACKAGE} left no .deb")
            target = Path(tmp) / "deb"
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target)], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            err = getattr(exc, "stderr", "") or str(exc)
            raise FashionDataError(f"could not fetch {PACKAGE} with apt-get download / dpkg-deb ({err.strip()[:200]}); "
                                   "give the idx files' folder instead (--idx-dir)") from None
        final = root / "deb"
        if final.exists():
            shutil.rmtree(final)
        os.replace(target, final)
    return final / "usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array: images N x H x W, labels N."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise FashionDataError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise FashionDataError(f"{path}: holds {arr.size} values, its header says {shape}")
    return arr.reshape(shape)


def load_fashion(cache_dir: str | Path, idx_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """{"x_train", "y_train", "x_test", "y_test"} as uint8 / int64 arrays."""
    folder = idx_folder(cache_dir, idx_dir)
    out = {k: read_idx(_find(folder, stem)) for k, stem in FILES.items()}
    out["y_train"], out["y_test"] = out["y_train"].astype(np.int64), out["y_test"].astype(np.int64)
    if out["x_train"].shape[1:] != (28, 28) or len(out["x_train"]) != len(out["y_train"]):
        raise FashionDataError(f"{folder}: unexpected shapes {out['x_train'].shape} / {out['y_train'].shape}")
    return out


# ------------------------------------------------------------------------------------ model

class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class FashionResNet(nn.Module):
    def __init__(self, n_classes: int = 10, width: int = 8, blocks: int = 1, in_channels: int = 1):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        layers, c = [], w
        for stage, c_out in enumerate((w, 2 * w, 4 * w)):
            for b in range(blocks):
                layers.append(BasicBlock(c, c_out, 2 if stage > 0 and b == 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def fashion_resnet(n_classes: int = 10, width: int = 8, blocks: int = 1) -> FashionResNet:
    return FashionResNet(n_classes=n_classes, width=width, blocks=blocks)


def normalise(x: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(x, dtype=np.float32)).unsqueeze(1) / 255.0 - MEAN) / STD


def train_fashion_model(x_train: np.ndarray, y_train: np.ndarray, *, seed: int = 0, epochs: int = 4,
                        batch_size: int = 128, lr: float = 0.05, log=print) -> dict[str, torch.Tensor]:
    """SGD (momentum 0.9, weight decay 5e-4, cosine schedule), random crop (pad 2) and horizontal flip
    (a mirrored garment is the same garment); returns the state_dict."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = fashion_resnet()
    steps = epochs * -(-len(x_train) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    x, y = normalise(x_train), torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), value=float((0.0 - MEAN) / STD))
    for epoch in range(epochs):
        model.train()
        t0, order = time.perf_counter(), torch.randperm(len(x), generator=gen)
        total = correct = 0
        loss_sum = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
            xb = pad[idx, :, dy:dy + 28, dx:dx + 28]
            if torch.rand(1, generator=gen).item() < 0.5:
                xb = xb.flip(3)
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            total += len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        log(f"[train-fashion] epoch {epoch + 1}/{epochs} loss {loss_sum / total:.3f} train acc {correct / total:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def clean_accuracy(state: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray) -> float:
    model = fashion_resnet()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(normalise(x[i:i + 1000])).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred.numpy() == y).mean())


def ensure_fashion_model(cache_dir: str | Path, data: dict[str, np.ndarray], *, seed: int = 0, epochs: int = 3,
                         log=print) -> Path:
    """Train the source model on the 60,000 training images once; cached by (seed, epochs, version)."""
    path = Path(cache_dir) / "models" / f"fashion_resnet8w8-v{MODEL_VERSION}-seed{seed}-e{epochs}.pt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    log(f"[train-fashion] training ResNet-8 (width 8) on {len(data['y_train'])} Fashion-MNIST images, "
        f"{epochs} epochs, {threads} torch threads")
    t0 = time.perf_counter()
    state = train_fashion_model(data["x_train"], data["y_train"], seed=seed, epochs=epochs, log=log)
    acc = clean_accuracy(state, data["x_test"], data["y_test"])
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({"seed": seed, "epochs": epochs, "clean_test_accuracy": acc,
                                                     "train_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    log(f"[train-fashion] clean test accuracy {acc:.4f}; saved {path}")
    return path
