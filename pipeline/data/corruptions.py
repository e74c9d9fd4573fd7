"""MNIST-C-style corruptions (Mu & Gilmer 2019) rebuilt from numpy, SciPy and scikit-image.

The original MNIST-C code needs ImageMagick and breaks on current NumPy/scikit-image; these
re-implementations keep its 15 corruption types and add a severity scale 1..5 (as ImageNet-C).
Every function takes uint8 images [N, 28, 28] (ink white on black), a severity and a numpy
Generator, and is deterministic given the generator.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage
from skimage import draw, feature, transform

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _f(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def shot_noise(images, severity, rng):
    lam = [60, 25, 12, 6, 3][severity - 1]
    return _u8(rng.poisson(_f(images) * lam) / lam)


def impulse_noise(images, severity, rng):
    amount = [0.03, 0.06, 0.1, 0.17, 0.27][severity - 1]
    x = _f(images)
    u = rng.random(x.shape)
    x[u < amount / 2] = 0.0
    x[(u >= amount / 2) & (u < amount)] = 1.0
    return _u8(x)


def glass_blur(images, severity, rng):
    """Blur, then swap each pixel with a random neighbour (frosted glass), then blur again."""
    sigma, delta, iters = [(0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.8, 2, 2), (1.0, 3, 2)][severity - 1]
    x = ndimage.gaussian_filter(_f(images), sigma=(0, sigma, sigma))
    n, h, w = x.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for _ in range(iters):
        dr = rng.integers(-delta, delta + 1, size=(n, h, w))
        dc = rng.integers(-delta, delta + 1, size=(n, h, w))
        r2 = np.clip(rows + dr, 0, h - 1)
        c2 = np.clip(cols + dc, 0, w - 1)
        x = x[np.arange(n)[:, None, None], r2, c2]
    return _u8(ndimage.gaussian_filter(x, sigma=(0, sigma, sigma)))


def motion_blur(images, severity, rng):
    length = [5, 7, 9, 11, 13][severity - 1]
    out = np.empty(images.shape, np.float32)
    x = _f(images)
    for i in range(len(x)):
        angle = rng.uniform(0, np.pi)
        k = np.zeros((length, length), np.float32)
        c = length // 2
        dr, dc = np.sin(angle) * c, np.cos(angle) * c
        rr, cc = draw.line(int(round(c - dr)), int(round(c - dc)), int(round(c + dr)), int(round(c + dc)))
        k[rr, cc] = 1.0
        out[i] = ndimage.convolve(x[i], k / k.sum(), mode="constant")
    return _u8(out)


def _warp(images: np.ndarray, make: Callable[[np.random.Generator], transform.AffineTransform],
          rng: np.random.Generator) -> np.ndarray:
    x = _f(images)
    centre = transform.AffineTransform(translation=(-13.5, -13.5))
    back = transform.AffineTransform(translation=(13.5, 13.5))
    out = np.empty_like(x)
    for i in range(len(x)):
        tf = centre + make(rng) + back
        out[i] = transform.warp(x[i], tf.inverse, order=1, mode="constant", cval=0.0)
    return _u8(out)


def shear(images, severity, rng):
    s = [0.2, 0.35, 0.5, 0.65, 0.8][severity - 1]
    return _warp(images, lambda r: transform.AffineTransform(shear=s * r.choice([-1, 1])), rng)


def scale(images, severity, rng):
    # alternately shrink and stretch: MNIST-C's scale corruption does both
    s = [(0.8, 1.15), (0.7, 1.25), (0.6, 1.35), (0.5, 1.45), (0.45, 1.55)][severity - 1]
    return _warp(images, lambda r: transform.AffineTransform(scale=s[int(r.integers(2))]), rng)


def rotate(images, severity, rng):
    deg = [20, 35, 50, 65, 80][severity - 1]
    return _warp(images, lambda r: transform.AffineTransform(rotation=np.deg2rad(deg * r.choice([-1, 1]))), rng)


def translate(images, severity, rng):
    t = [3, 4, 5, 6, 7][severity - 1]

    def make(r):
        angle = r.uniform(0, 2 * np.pi)
        return transform.AffineTransform(translation=(t * np.cos(angle), t * np.sin(angle)))

    return _warp(images, make, rng)


def brightness(images, severity, rng):
    b = [0.2, 0.35, 0.5, 0.6, 0.7][severity - 1]
    return _u8(_f(images) + b)


def stripe(images, severity, rng):
    """Invert a band of rows or columns."""
    width = [3, 5, 7, 9, 11][severity - 1]
    x = _f(images)
    for i in range(len(x)):
        start = int(rng.integers(4, 24 - width + 1)) if width < 20 else 0
        if rng.random() < 0.5:
            x[i, start:start + width, :] = 1.0 - x[i, start:start + width, :]
        else:
            x[i, :, start:start + width] = 1.0 - x[i, :, start:start + width]
    return _u8(x)


def _fractal(n: int, rng: np.random.Generator, decay: float) -> np.ndarray:
    """Multi-octave value noise in [0, 1], shape [n, 28, 28]."""
    total = np.zeros((n, 28, 28), np.float32)
    amp, norm = 1.0, 0.0
    for cells in (2, 4, 7, 14):
        coarse = rng.random((n, cells, cells)).astype(np.float32)
        total += amp * ndimage.zoom(coarse, (1, 28 / cells, 28 / cells), order=1)[:, :28, :28]
        norm += amp
        amp *= decay
    return total / norm


def fog(images, severity, rng):
    strength, decay = [(0.4, 0.6), (0.55, 0.6), (0.7, 0.55), (0.85, 0.5), (1.0, 0.5)][severity - 1]
    x = _f(images)
    noise = _fractal(len(x), rng, decay)
    return _u8(x * (1 - 0.3 * strength) + strength * noise)


def spatter(images, severity, rng):
    """Random ink blobs: thresholded smoothed noise painted white."""
    thresh = [0.72, 0.68, 0.64, 0.61, 0.58][severity - 1]
    noise = ndimage.gaussian_filter(rng.random(images.shape).astype(np.float32), sigma=(0, 1.5, 1.5))
    noise = (noise - noise.min(axis=(1, 2), keepdims=True)) / np.ptp(noise, axis=(1, 2), keepdims=True)
    x = _f(images)
    x[noise > thresh] = 1.0
    return _u8(x)


def _lines(images, severity, rng, *, dotted: bool):
    n_lines = [1, 2, 3, 4, 5][severity - 1] if dotted else [1, 1, 2, 2, 3][severity - 1]
    x = _f(images)
    for i in range(len(x)):
        for _ in range(n_lines):
            if dotted:
                r0, c0, r1, c1 = rng.integers(0, 28, size=4)
                rr, cc = draw.line(r0, c0, r1, c1)
                x[i, rr[::2], cc[::2]] = 1.0
            else:
                r0 = int(rng.integers(4, 24))
                amp = int(rng.integers(2, 5))
                period = int(rng.integers(4, 8))
                cols = np.arange(0, 28, period // 2 or 1)
                rows = r0 + amp * ((np.arange(len(cols)) % 2) * 2 - 1)
                for k in range(len(cols) - 1):
                    rr, cc = draw.line(int(np.clip(rows[k], 0, 27)), int(cols[k]),
                                       int(np.clip(rows[k + 1], 0, 27)), int(min(cols[k + 1], 27)))
                    x[i, rr, cc] = 1.0
    return _u8(x)


def dotted_line(images, severity, rng):
    return _lines(images, severity, rng, dotted=True)


def zigzag(images, severity, rng):
    return _lines(images, severity, rng, dotted=False)


def canny_edges(images, severity, rng):
    """The digit replaced by its edge map (thicker smoothing at higher severity loses detail)."""
    sigma = [0.5, 0.8, 1.1, 1.4, 1.8][severity - 1]
    x = _f(images)
    return _u8(np.stack([feature.canny(img, sigma=sigma).astype(np.float32) for img in x]))


CORRUPTIONS: dict[str, Corruption] = {
    f.__name__: f for f in (
        shot_noise, impulse_noise, glass_blur, motion_blur, shear, scale, rotate, brightness, translate,
        stripe, fog, spatter, dotted_line, zigzag, canny_edges,
    )
}
FAMILIES: dict[str, str] = {
    "shot_noise": "noise", "impulse_noise": "noise", "glass_blur": "blur", "motion_blur": "blur",
    "shear": "geometric", "scale": "geometric", "rotate": "geometric", "translate": "geometric",
    "brightness": "digital", "stripe": "digital", "fog": "weather", "spatter": "weather",
    "dotted_line": "digital", "zigzag": "digital", "canny_edges": "digital",
}


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be 1..5, got {severity!r}")
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W], got {images.dtype} {images.shape}")
    return CORRUPTIONS[name](images, severity, rng)
