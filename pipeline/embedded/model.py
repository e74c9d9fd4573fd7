"""The embedded default source model: a small CNN with BatchNorm and an auxiliary
reconstruction decoder (the `reconstruct` hook MIM needs), for 28x28 grayscale digits.

`small_cnn` is an ordinary model factory, referenced from configs as
`pipeline.embedded.model:small_cnn`, exactly as a user's own model would be.
`small_cnn_rotation` is the same network with TTT's self-supervised rotation head (Sun et al. 2020)
on the shared trunk (`features`): the `rotation_logits` hook method `ttt` needs, trained jointly with
the classifier (cross-entropy + the 4-way rotation cross-entropy over all four rotations of each
training batch, the reference's `--rotation_type expand`), cached as its own checkpoint, so the
other methods' source model is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        # flatten, not global pooling: three convs see too little to classify from pooled features
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, n_classes)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 1, 3, padding=1),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(x))


class SmallCNNRotation(SmallCNN):
    """SmallCNN plus a rotation head on the trunk, the classifier's `proj` + `head` copied for
    4 classes (the reference's head_on_layer2 copies the layers after the shared ones)."""

    def __init__(self, n_classes: int = 10, width: int = 32):
        super().__init__(n_classes, width)
        self.rotation_head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 4))

    def rotation_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation_head(self.features(x))


def small_cnn(n_classes: int = 10) -> SmallCNN:
    return SmallCNN(n_classes=n_classes)


def small_cnn_rotation(n_classes: int = 10) -> SmallCNNRotation:
    return SmallCNNRotation(n_classes=n_classes)


def _mask_patches(x: torch.Tensor, prob: float, patch: int, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    keep = torch.rand(n, 1, h // patch, w // patch, generator=gen) >= prob
    keep = keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return x * keep


def train_source_model(x_train, y_train, *, seed: int = 0, epochs: int = 6, batch_size: int = 64,
                       mean: float = 0.1307, std: float = 0.3081, rotation: bool = False) -> dict[str, torch.Tensor]:
    """Train SmallCNN on clean digits: cross-entropy plus masked-input reconstruction through the
    decoder (so MIM's test-time objective is one the model was trained on); with `rotation`,
    SmallCNNRotation with the rotation cross-entropy over all four rotations of each batch added
    (TTT's joint training). Returns a state_dict."""
    import numpy as np

    from ttt.augment import expand_rotations

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = small_cnn_rotation() if rotation else small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    x = (torch.from_numpy(np.asarray(x_train, dtype=np.float32)).unsqueeze(1) / 255.0 - mean) / std
    y = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    background = (0.0 - mean) / std
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            # small random translations: digits in the stream are not always centred
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            logits = model(xb)
            masked = _mask_patches(xb - background, 0.5, 4, gen) + background
            recon = model.reconstruct(masked)
            loss = torch.nn.functional.cross_entropy(logits, yb) + torch.nn.functional.mse_loss(recon, xb)
            if rotation:
                rotated, labels = expand_rotations(xb)
                loss = loss + torch.nn.functional.cross_entropy(model.rotation_logits(rotated), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            total += len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        sched.step()
        print(f"[train-source] epoch {epoch + 1}/{epochs} loss {loss_sum / total:.3f} train acc {correct / total:.3f}", flush=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ensure_default_checkpoint(cache_dir: str = ".cache", seed: int = 0, rotation: bool = False) -> str:
    """Train and cache the default source model (with `rotation`, SmallCNNRotation) on first use;
    return its checkpoint path."""
    import json
    import os
    from pathlib import Path

    from pipeline.embedded.mnistc import split_digits

    path = Path(cache_dir) / "models" / f"small_cnn{'_rotation' if rotation else ''}-seed{seed}.pt"
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    split = split_digits(seed)
    print(f"[train-source] training the default SmallCNN on {len(split['y_train'])} clean digits", flush=True)
    state = train_source_model(split["x_train"], split["y_train"], seed=seed, rotation=rotation)
    model = small_cnn_rotation() if rotation else small_cnn()
    model.load_state_dict(state)
    model.eval()
    x = (torch.from_numpy(split["x_test"].astype("float32")).unsqueeze(1) / 255.0 - 0.1307) / 0.3081
    with torch.no_grad():
        acc = float((model(x).argmax(1) == torch.from_numpy(split["y_test"])).float().mean())
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({"seed": seed, "clean_test_accuracy": acc}, indent=2))
    print(f"[train-source] clean held-out accuracy {acc:.4f}; saved {path}", flush=True)
    return str(path)
