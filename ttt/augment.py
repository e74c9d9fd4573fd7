"""Image augmentations and masks on batched tensors, with every random draw from a torch.Generator.

Images are [N, C, H, W] in pixel space ([0, 1]); a model adapter converts from and to its own
normalisation (`ImageClassifierAdapter.augment`). Each sample gets its own random parameters.
Draws happen on the CPU in a fixed order, then move to the images' device, so a seed gives the
same augmentations on CPU and GPU and a run is reproducible.

`cotta_augment` follows the CoTTA reference transforms (colour jitter, random affine with edge
padding, a light Gaussian blur, Gaussian noise, clipping) without the horizontal flip: a flip
turns some digits and characters into other classes or into nothing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [N] vector of parameters, shaped to broadcast over [N, C, H, W] on x's device."""
    return values.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))


def random_affine(x: torch.Tensor, generator: torch.Generator, *, degrees: float = 15.0,
                  translate: float = 1 / 16, scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Rotate by U(-degrees, degrees), shift by up to `translate` of the size, scale by U(scale).

    Out-of-image pixels repeat the border (the reference pads with edge mode before its affine),
    so a dark background stays dark. Rotation is done in pixel units, so non-square images are
    not sheared.
    """
    n, _, h, w = x.shape
    angle = _uniform(generator, n, -degrees, degrees) * math.pi / 180.0
    shift = _uniform(generator, 2 * n, -translate, translate).view(n, 2) * 2.0  # [-1, 1] grid units
    zoom = _uniform(generator, n, *scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates, so this is the inverse transform: rotate
    # back by the angle and shrink by the zoom, in normalised coordinates (hence h/w factors).
    inv = torch.stack([
        torch.stack([cos, sin * h / w], 1),
        torch.stack([-sin * w / h, cos], 1),
    ], 1)
    offset = -(inv @ shift.unsqueeze(2))
    theta = torch.cat([inv, offset], 2).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(x: torch.Tensor, generator: torch.Generator, *, sigma: tuple[float, float] = (0.001, 0.5),
                  kernel_size: int = 5) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma drawn from U(sigma)."""
    n, c, h, w = x.shape
    s = _uniform(generator, n, *sigma)
    r = kernel_size // 2
    offsets = torch.arange(-r, r + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / s.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.device, x.dtype)
    kernel = kernel.repeat_interleave(c, 0)  # one kernel per (sample, channel) group
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def color_jitter(x: torch.Tensor, generator: torch.Generator, *, brightness: tuple[float, float] = (0.6, 1.4),
                 contrast: tuple[float, float] = (0.7, 1.3), saturation: tuple[float, float] = (0.5, 1.5),
                 gamma: tuple[float, float] = (0.7, 1.3)) -> torch.Tensor:
    """Brightness (scale), contrast (blend with the image's mean grey), saturation (blend with its
    grey version; colour images only) and gamma, each factor drawn per sample, clipped to [0, 1]."""
    n, c = x.shape[:2]
    b = _per_sample(_uniform(generator, n, *brightness), x)
    k = _per_sample(_uniform(generator, n, *contrast), x)
    sat = _per_sample(_uniform(generator, n, *saturation), x)
    g = _per_sample(_uniform(generator, n, *gamma), x)
    x = (x * b).clamp(0.0, 1.0)
    grey = _grey(x)
    x = (grey.mean((1, 2, 3), keepdim=True) + k * (x - grey.mean((1, 2, 3), keepdim=True))).clamp(0.0, 1.0)
    if c == 3:
        grey = _grey(x)
        x = (grey + sat * (x - grey)).clamp(0.0, 1.0)
    return x.clamp_min(1e-8).pow(g).clamp(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def gaussian_noise(x: torch.Tensor, generator: torch.Generator, *, std: float = 0.005) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    return x + std * noise


def cotta_augment(x: torch.Tensor, generator: torch.Generator, *, soft: bool = False) -> torch.Tensor:
    """One random view per image, with the CoTTA reference's ranges (`soft` = its milder set)."""
    x = x.clamp(0.0, 1.0)
    x = color_jitter(x, generator,
                     brightness=(0.8, 1.2) if soft else (0.6, 1.4),
                     contrast=(0.85, 1.15) if soft else (0.7, 1.3),
                     saturation=(0.75, 1.25) if soft else (0.5, 1.5),
                     gamma=(0.85, 1.15) if soft else (0.7, 1.3))
    x = random_affine(x, generator, degrees=8.0 if soft else 15.0, translate=1 / 16,
                      scale=(0.95, 1.05) if soft else (0.9, 1.1))
    x = gaussian_blur(x, generator, sigma=(0.001, 0.25) if soft else (0.001, 0.5))
    x = gaussian_noise(x, generator, std=0.005)
    return x.clamp(0.0, 1.0)


def patch_mask(shape: torch.Size | tuple[int, ...], prob: float, patch_size: int,
               generator: torch.Generator) -> torch.Tensor:
    """A boolean [N, 1, H, W] mask, True where masked: the image is cut into patch_size x
    patch_size patches (edge patches cropped) and each patch is masked with probability `prob`."""
    n, _, h, w = shape
    grid = torch.rand(n, 1, math.ceil(h / patch_size), math.ceil(w / patch_size), generator=generator) < prob
    return grid.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)[:, :, :h, :w]
