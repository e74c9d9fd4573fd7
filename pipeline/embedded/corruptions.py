"""MNIST-C-style corruptions (Mu & Gilmer 2019) rebuilt from numpy, SciPy and scikit-image.

Why this exists: the original MNIST-C code shells out to ImageMagick and no longer runs on current
NumPy / scikit-image, and it has one strength per corruption. These re-implementations keep its 15
corruption types (plus gaussian_noise and contrast), add a severity scale 1..5 as ImageNet-C /
CIFAR-10-C do, and need nothing outside the project's pinned dependencies.

Every corruption takes uint8 images [N, 28, 28] (white ink on black, as MNIST), a severity 1..5 and
a numpy Generator, returns uint8 [N, 28, 28], never modifies its input and is deterministic given
the generator. Severities were calibrated against the project's SmallCNN trained on clean digits:
its error rises with severity on every corruption, while the digit stays readable at severity 3.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from scipy import ndimage
from skimage import draw, feature, transform

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
SIZE = 28
_T = TypeVar("_T")


def _level(table: Sequence[_T], severity: int) -> _T:
    """The table entry for `severity`; checked here too, because CORRUPTIONS may be called directly
    and table[0 - 1] would silently give severity 5."""
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity!r}")
    return table[int(severity) - 1]


def _f(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0  # always a copy: callers may write into it


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------- noise

def shot_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise at `lam` photons per unit intensity. A dim light level (`dark`) is added
    before sampling and subtracted after, as a sensor's dark signal would be: with MNIST's exactly
    black background, plain Poisson noise would only ever touch the ink."""
    lam, dark = _level([(30, 0.04), (20, 0.06), (14, 0.075), (10, 0.09), (6, 0.12)], severity)
    x = _f(images)
    return _u8(rng.poisson((x + dark) * lam) / lam - dark)


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = _level([0.05, 0.08, 0.11, 0.15, 0.2], severity)
    return _u8(_f(images) + rng.normal(0.0, sigma, images.shape).astype(np.float32))


def impulse_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: a fraction `amount` of pixels set to 0 or 1 with equal odds."""
    amount = _level([0.015, 0.03, 0.05, 0.08, 0.12], severity)
    x = _f(images)
    u = rng.random(x.shape)
    x[u < amount / 2] = 0.0
    x[(u >= amount / 2) & (u < amount)] = 1.0
    return _u8(x)


# ------------------------------------------------------------------------------------------ blur

def glass_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Frosted glass: blur, replace each pixel by a random neighbour within `delta` (repeated
    `iters` times), blur again."""
    sigma, delta, iters = _level([(0.6, 1, 1), (0.6, 1, 2), (0.65, 1, 3), (0.7, 2, 2), (0.8, 2, 3)], severity)
    x = ndimage.gaussian_filter(_f(images), sigma=(0, sigma, sigma))
    n, h, w = x.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    batch = np.arange(n)[:, None, None]
    for _ in range(iters):
        r2 = np.clip(rows + rng.integers(-delta, delta + 1, size=(n, h, w)), 0, h - 1)
        c2 = np.clip(cols + rng.integers(-delta, delta + 1, size=(n, h, w)), 0, w - 1)
        x = x[batch, r2, c2]
    return _u8(ndimage.gaussian_filter(x, sigma=(0, sigma, sigma)))


def _line_kernel(length: int, angle: float) -> np.ndarray:
    """A centred line of `length` px at `angle`, splatted bilinearly from dense sub-pixel samples:
    a Bresenham (skimage.draw) line kernel leaves visible bands in the smear of a thin stroke."""
    c = (length - 1) / 2.0
    t = np.linspace(-c, c, 8 * length)
    r, col = c + t * np.sin(angle), c + t * np.cos(angle)
    r0, c0 = np.floor(r).astype(int), np.floor(col).astype(int)
    fr, fc = r - r0, col - c0
    kernel = np.zeros((length, length))
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr < length) & (cc < length)  # only weight-0 samples fall off the far edge
        np.add.at(kernel, (rr[ok], cc[ok]), w[ok])
    return (kernel / kernel.sum()).astype(np.float32)


def motion_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Average along a centred line of `length` px at a random angle per image (camera shake)."""
    length = _level([5, 7, 9, 11, 13], severity)
    x = _f(images)
    out = np.empty_like(x)
    for i in range(len(x)):
        out[i] = ndimage.convolve(x[i], _line_kernel(length, rng.uniform(0.0, np.pi)), mode="constant", cval=0.0)
    return _u8(out)


# ------------------------------------------------------------------------------------- geometric

def _warp(images: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    """Apply per-image 2x2 linear maps (in x=col, y=row coordinates) about the image centre plus
    the translation in column 2 of each [2, 3] matrix; bilinear, black outside."""
    x = _f(images)
    centre = (SIZE - 1) / 2.0
    to_origin = np.array([[1, 0, -centre], [0, 1, -centre], [0, 0, 1]], float)
    back = np.array([[1, 0, centre], [0, 1, centre], [0, 0, 1]], float)
    out = np.empty_like(x)
    for i, m in enumerate(matrices):
        forward = back @ np.vstack([m, [0, 0, 1]]) @ to_origin
        # warp wants the output -> input map
        inverse = transform.AffineTransform(matrix=np.linalg.inv(forward))
        out[i] = transform.warp(x[i], inverse, order=1, mode="constant", cval=0.0)
    return _u8(out)


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def shear(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Horizontal or vertical shear by factor k (x' = x + k y), random direction and sign."""
    k = _level([0.3, 0.45, 0.6, 0.8, 1.0], severity)
    mats = []
    for _ in range(len(images)):
        s = k * _sign(rng)
        m = np.array([[1, s, 0], [0, 1, 0]], float) if rng.random() < 0.5 else np.array([[1, 0, 0], [s, 1, 0]], float)
        mats.append(m)
    return _warp(images, mats)


def scale(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Shrink or enlarge about the centre (each with odds 1/2), as MNIST-C's scale does both."""
    shrink, grow = _level([(0.8, 1.15), (0.7, 1.25), (0.6, 1.35), (0.5, 1.45), (0.42, 1.55)], severity)
    mats = []
    for _ in range(len(images)):
        s = shrink if rng.random() < 0.5 else grow
        mats.append(np.array([[s, 0, 0], [0, s, 0]], float))
    return _warp(images, mats)


def rotate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Rotate by +-`deg` degrees, jittered by up to 5 degrees so the set is not two angles only."""
    deg = _level([15, 25, 35, 45, 60], severity)
    mats = []
    for _ in range(len(images)):
        a = np.deg2rad(_sign(rng) * (deg + rng.uniform(-5.0, 5.0)))
        mats.append(np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0]], float))
    return _warp(images, mats)


def translate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Shift by `t` pixels in a random direction (MNIST digits have a ~4 px margin)."""
    t = _level([2.5, 3.5, 4.5, 5.5, 6.5], severity)
    mats = []
    for _ in range(len(images)):
        a = rng.uniform(0.0, 2 * np.pi)
        mats.append(np.array([[1, 0, t * np.cos(a)], [0, 1, t * np.sin(a)]], float))
    return _warp(images, mats)


# --------------------------------------------------------------------------------------- weather

def _fractal(n: int, rng: np.random.Generator, beta: float) -> np.ndarray:
    """Fractal (1/f^beta power spectrum) noise, [n, 28, 28], each image rescaled to [0, 1]. Spectral
    synthesis vectorises over the batch, unlike diamond-square plasma; beta ~2.5 gives soft clouds."""
    m = 2 * SIZE  # synthesise larger and crop, so the periodic wrap-around does not show
    fy = np.fft.fftfreq(m)[:, None]
    fx = np.fft.rfftfreq(m)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2.0)
    amp[0, 0] = 0.0
    white = rng.standard_normal((n, m, m))
    field = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(m, m))[:, :SIZE, :SIZE]
    lo = field.min(axis=(1, 2), keepdims=True)
    hi = field.max(axis=(1, 2), keepdims=True)
    return ((field - lo) / (hi - lo)).astype(np.float32)


def fog(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add fractal haze of strength `s`, then rescale so ink stays at most 1 (as ImageNet-C's fog)."""
    s = _level([0.08, 0.14, 0.22, 0.32, 0.45], severity)
    x = _f(images)
    return _u8((x + s * _fractal(len(x), rng, beta=2.5)) / (1.0 + s))


def spatter(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Soft-edged white drops covering a fraction `cover` of each image: smoothed noise thresholded
    at its per-image quantile, so the covered area is set by severity, not by chance."""
    cover = _level([0.02, 0.04, 0.06, 0.09, 0.13], severity)
    noise = ndimage.gaussian_filter(rng.random(images.shape, dtype=np.float32), sigma=(0, 1.3, 1.3))
    thresh = np.quantile(noise.reshape(len(noise), -1), 1.0 - cover, axis=1)[:, None, None]
    spread = noise.std(axis=(1, 2), keepdims=True)
    alpha = np.clip((noise - thresh) / (0.25 * spread) + 0.5, 0.0, 1.0)  # soft rim around each drop
    x = _f(images)
    return _u8(np.maximum(x, alpha))


# --------------------------------------------------------------------------------------- digital

def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    b = _level([0.04, 0.06, 0.08, 0.11, 0.16], severity)
    return _u8(_f(images) + b)


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Pull every pixel towards the image mean by factor c (ImageNet-C's contrast)."""
    c = _level([0.7, 0.55, 0.42, 0.3, 0.2], severity)
    x = _f(images)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return _u8((x - mean) * c + mean)


def stripe(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Invert a band of `width` rows or columns crossing the middle of the image."""
    width = _level([1, 2, 4, 6, 9], severity)
    x = _f(images)
    for i in range(len(x)):
        start = int(rng.integers(8, 20 - width + 1))
        span = slice(start, start + width)
        band = (span, slice(None)) if rng.random() < 0.5 else (slice(None), span)
        x[i][band] = 1.0 - x[i][band]
    return _u8(x)


def _line_through_centre(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit direction and a point within 6 px of the centre: a random line across the digit."""
    a = rng.uniform(0.0, np.pi)
    centre = (SIZE - 1) / 2.0 + rng.uniform(-6.0, 6.0, size=2)
    return np.array([np.sin(a), np.cos(a)]), centre


def _paint(img: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> None:
    keep = (rr >= 0) & (rr < SIZE) & (cc >= 0) & (cc < SIZE)
    img[rr[keep], cc[keep]] = 1.0


def dotted_line(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`count` dotted lines (one dot every `gap` pixels) right across the image."""
    count, gap = _level([(1, 3), (1, 2), (2, 2), (3, 2), (4, 2)], severity)
    x = _f(images)
    for i in range(len(x)):
        for _ in range(count):
            d, p = _line_through_centre(rng)
            (r0, c0), (r1, c1) = np.rint(p - 40 * d).astype(int), np.rint(p + 40 * d).astype(int)
            rr, cc = draw.line(r0, c0, r1, c1)
            phase = int(rng.integers(gap))
            _paint(x[i], rr[phase::gap], cc[phase::gap])
    return _u8(x)


def zigzag(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`count` zigzag polylines (teeth of +-1.5..2.5 px, a vertex every 2.5..3.5 px) of `length` px
    across the digit."""
    count, length = _level([(1, 8), (1, 12), (1, 18), (1, 26), (2, 26)], severity)
    x = _f(images)
    for i in range(len(x)):
        for _ in range(count):
            d, p = _line_through_centre(rng)
            normal = np.array([-d[1], d[0]])
            amp, step = rng.uniform(1.5, 2.5), rng.uniform(2.5, 3.5)
            ts = np.arange(-length / 2, length / 2 + 1e-6, step)
            signs = np.where(np.arange(len(ts)) % 2 == 0, 1.0, -1.0)
            pts = np.rint(p + ts[:, None] * d + (amp * signs)[:, None] * normal).astype(int)
            for (r0, c0), (r1, c1) in zip(pts[:-1], pts[1:]):
                _paint(x[i], *draw.line(r0, c0, r1, c1))
    return _u8(x)


def canny_edges(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The digit's Canny edge map over a faded copy of the digit. MNIST-C has one strength (the edge
    map alone, severity 5 here); lower severities keep more of the original strokes under the edges."""
    keep = _level([0.9, 0.75, 0.6, 0.45, 0.3], severity)
    x = _f(images)
    edges = np.stack([feature.canny(img, sigma=1.0) for img in x]).astype(np.float32)
    return _u8(np.maximum(edges, keep * x))


CORRUPTIONS: dict[str, Corruption] = {
    f.__name__: f for f in (
        shot_noise, impulse_noise, glass_blur, motion_blur, shear, scale, rotate, brightness, translate,
        stripe, fog, spatter, dotted_line, zigzag, canny_edges, gaussian_noise, contrast,
    )
}
FAMILIES: dict[str, str] = {
    "shot_noise": "noise", "impulse_noise": "noise", "gaussian_noise": "noise",
    "glass_blur": "blur", "motion_blur": "blur",
    "fog": "weather", "spatter": "weather",
    "brightness": "digital", "contrast": "digital", "stripe": "digital", "dotted_line": "digital",
    "zigzag": "digital", "canny_edges": "digital",
    "shear": "geometric", "scale": "geometric", "rotate": "geometric", "translate": "geometric",
}


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Corrupt uint8 images [N, 28, 28] with corruption `name` at `severity` (1..5)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(sorted(CORRUPTIONS))}")
    _level(SEVERITIES, severity)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"images must be uint8 [N, {SIZE}, {SIZE}], got {images.dtype} {images.shape}")
    if len(images) == 0:
        return images.copy()
    return CORRUPTIONS[name](images, severity, rng)
