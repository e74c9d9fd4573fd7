"""Image augmentations and masks on batched tensors, with every random draw from a torch.Generator.

Images are [N, C, H, W] in pixel space ([0, 1]); a model adapter converts from and to its own
normalisation (`ImageClassifierAdapter.augment`). Draws happen on the CPU in a fixed order, then
move to the images' device, so a seed gives the same augmentations on CPU and GPU and a run is
reproducible.

`cotta_augment` is the CoTTA reference's `get_tta_transforms` (qinenergy/cotta, cifar/cotta.py and
my_transforms.py), drawn the way the reference draws it: torchvision transforms applied to a
batched tensor draw ONE parameter set per call, so every image of an augmented copy of the batch
gets the same jitter factors, jitter order, rotation, translation, scale, blur and flip (only the
Gaussian noise is per pixel). This matters because the teacher normalises each copy with its own
batch statistics. The pipeline, as in the reference:
  clip -> colour jitter (brightness, contrast, saturation, hue, gamma in a random order) ->
  pad by half the image size (edge mode) -> random affine (rotation, integer translation of up to
  1/16 of the PADDED size, i.e. 1/8 of the image, scale; bilinear) -> Gaussian blur (5 taps) ->
  centre crop -> horizontal flip (p = 0.5, switchable) -> Gaussian noise (std 0.005) -> clip.
Saturation and hue leave one-channel images unchanged, as torchvision's do.
The flip is off by default here because the adapter hook has no switch: a method flips its views
itself when its config says so (`ttt.cotta.flips`); flipping after the noise instead of before is
the same distribution, since i.i.d. noise flipped is i.i.d. noise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64))


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        r, g, b = x.unbind(1)
        return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)
    return x.mean(1, keepdim=True)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, rgb in enumerate(choices):
        mask = i == k
        for ch in range(3):
            out[ch] = torch.where(mask, rgb[ch], out[ch])
    return torch.stack(out, 1)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x * factor).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with each image's mean grey level (torchvision's adjust_contrast)."""
    mean = _grey(x).mean((1, 2, 3), keepdim=True)
    return (factor * x + (1.0 - factor) * mean).clamp(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    return (factor * x + (1.0 - factor) * _grey(x)).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return _hsv_to_rgb(hsv)


def adjust_gamma(x: torch.Tensor, gamma: float) -> torch.Tensor:
    # the reference clamps to 1e-8 first (gamma after contrast can hit 0 and give NaN gradients)
    return x.clamp(1e-8, 1.0).pow(gamma).clamp(0.0, 1.0)


def color_jitter(x: torch.Tensor, generator: torch.Generator, *, brightness: tuple[float, float] = (0.6, 1.4),
                 contrast: tuple[float, float] = (0.7, 1.3), saturation: tuple[float, float] = (0.5, 1.5),
                 hue: tuple[float, float] = (-0.06, 0.06), gamma: tuple[float, float] = (0.7, 1.3)) -> torch.Tensor:
    """CoTTA's ColorJitterPro: the five adjustments in a random order, one factor each for the batch."""
    order = torch.randperm(5, generator=generator).tolist()
    ops = [(adjust_brightness, brightness), (adjust_contrast, contrast), (adjust_saturation, saturation),
           (adjust_hue, hue), (adjust_gamma, gamma)]
    for k in order:
        fn, (low, high) = ops[k]
        x = fn(x, _uniform(generator, low, high))
    return x


def random_affine(x: torch.Tensor, generator: torch.Generator, *, degrees: float = 15.0,
                  translate: float = 1 / 16, scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """torchvision's RandomAffine on a batch: one rotation U(-degrees, degrees), one integer
    translation of up to `translate` x the size (rounded, as torchvision does) and one scale for
    every image; bilinear, zeros outside. Rotation is done in pixel units, so non-square images are
    not sheared."""
    n, _, h, w = x.shape
    angle = math.radians(_uniform(generator, -degrees, degrees))
    tx = round(_uniform(generator, -translate * w, translate * w))
    ty = round(_uniform(generator, -translate * h, translate * h))
    zoom = _uniform(generator, *scale)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    # affine_grid maps output to input coordinates, so this is the inverse transform: rotate back
    # and shrink by the zoom in normalised coordinates (hence the h/w factors), shift back by t.
    inv = torch.tensor([[cos, sin * h / w], [-sin * w / h, cos]], dtype=torch.float64)
    shift = torch.tensor([[2.0 * tx / w], [2.0 * ty / h]], dtype=torch.float64)
    theta = torch.cat([inv, -(inv @ shift)], 1).to(x.device, x.dtype).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_blur(x: torch.Tensor, generator: torch.Generator, *, sigma: tuple[float, float] = (0.001, 0.5),
                  kernel_size: int = 5) -> torch.Tensor:
    """torchvision's GaussianBlur: one sigma U(sigma) for the batch, separable, reflect padding."""
    n, c, h, w = x.shape
    s = _uniform(generator, *sigma)
    r = kernel_size // 2
    offsets = torch.linspace(-r, r, kernel_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = (kernel / kernel.sum()).to(x.device, x.dtype)
    flat = x.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1))
    return flat.view(n, c, h, w)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """torchvision's RandomHorizontalFlip on a batch: one coin for every image."""
    return x.flip(-1) if float(torch.rand(1, generator=generator)) < p else x


def gaussian_noise(x: torch.Tensor, generator: torch.Generator, *, std: float = 0.005) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    return x + std * noise


def cotta_augment(x: torch.Tensor, generator: torch.Generator, *, soft: bool = False,
                  flip: bool = False) -> torch.Tensor:
    """One augmented copy of the batch with the CoTTA reference's transforms and ranges (`soft` =
    its milder set), one parameter set for the whole batch (see the module docstring)."""
    _, _, h, w = x.shape
    x = x.clamp(0.0, 1.0)
    x = color_jitter(x, generator,
                     brightness=(0.8, 1.2) if soft else (0.6, 1.4),
                     contrast=(0.85, 1.15) if soft else (0.7, 1.3),
                     saturation=(0.75, 1.25) if soft else (0.5, 1.5),
                     hue=(-0.03, 0.03) if soft else (-0.06, 0.06),
                     gamma=(0.85, 1.15) if soft else (0.7, 1.3))
    # the reference pads by half the size (edge mode) before its affine, so translate=1/16 moves
    # the content by up to 1/16 of the padded, i.e. 1/8 of the original, size
    ph, pw = h // 2, w // 2
    x = F.pad(x, (pw, pw, ph, ph), mode="replicate")
    x = random_affine(x, generator, degrees=8.0 if soft else 15.0, translate=1 / 16,
                      scale=(0.95, 1.05) if soft else (0.9, 1.1))
    x = gaussian_blur(x, generator, sigma=(0.001, 0.25) if soft else (0.001, 0.5))
    x = x[:, :, ph:ph + h, pw:pw + w]
    if flip:
        x = random_hflip(x, generator)
    x = gaussian_noise(x, generator, std=0.005)
    return x.clamp(0.0, 1.0)


def patch_mask(shape: torch.Size | tuple[int, ...], prob: float, patch_size: int,
               generator: torch.Generator) -> torch.Tensor:
    """A boolean [N, 1, H, W] mask, True where masked: the image is cut into patch_size x
    patch_size patches (edge patches cropped) and each patch is masked with probability `prob`."""
    n, _, h, w = shape
    grid = torch.rand(n, 1, math.ceil(h / patch_size), math.ceil(w / patch_size), generator=generator) < prob
    return grid.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)[:, :, :h, :w]


def patch_shuffle(x: torch.Tensor, patch_len: int, generator: torch.Generator) -> torch.Tensor:
    """DeYO's object-destructive view: cut each image into a grid of patch_len x patch_len patches
    (patch_len is the number of patches per side, as in the reference's rearrange) and permute
    them, an independent permutation per image. Images whose size is not a multiple of patch_len
    are resized to the nearest smaller multiple and back (bilinear), as the reference does."""
    n, c, h, w = x.shape
    th, tw = (h // patch_len) * patch_len, (w // patch_len) * patch_len
    resized = (th, tw) != (h, w)
    if resized:
        x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    ph, pw = th // patch_len, tw // patch_len
    patches = x.reshape(n, c, patch_len, ph, patch_len, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, patch_len * patch_len, c, ph, pw)
    perm = torch.argsort(torch.rand(n, patch_len * patch_len, generator=generator), dim=-1).to(x.device)
    patches = patches[torch.arange(n, device=x.device).unsqueeze(-1), perm]
    out = patches.reshape(n, patch_len, patch_len, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, th, tw)
    if resized:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out


def pixel_shuffle(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DeYO's `pixel` view: one permutation of the pixel positions for the whole batch."""
    n, c, h, w = x.shape
    perm = torch.randperm(h * w, generator=generator).to(x.device)
    return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def rotate_batch(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image of [N, C, H, W] rotated by labels[i] x 90 degrees (counter-clockwise, the
    ttt_cifar_release reference's tensor_rot_90 / 180 / 270); square images only."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    out = x.clone()
    for k in (1, 2, 3):
        idx = (labels == k).nonzero().flatten().to(x.device)
        if len(idx):
            out[idx] = torch.rot90(x[idx], k, dims=(2, 3))
    return out


def expand_rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four rotations of every image (the reference's rotate_batch(..., 'expand')): the batch
    repeated 4 times, block k rotated by k x 90 degrees, and the labels 0..3 per block."""
    labels = torch.arange(4).repeat_interleave(len(x))
    return rotate_batch(x.repeat(4, 1, 1, 1), labels), labels.to(x.device)
