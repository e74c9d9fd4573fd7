"""CoTTA's augmentations drawn as the reference draws them (qinenergy/cotta get_tta_transforms on a
batched tensor): one parameter set per augmented copy of the batch, the translation range of the
padded image, a random colour-jitter order, a switchable flip, all seeded."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ttt.augment import adjust_brightness, adjust_gamma, color_jitter, cotta_augment, random_hflip
from ttt.methods.parts import augmented_view
from workers.adapters import ImageClassifierAdapter

torch.set_num_threads(1)


def digit_batch(n: int = 8) -> torch.Tensor:
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 11:15] = 0.9  # an upright bar: same image n times
    x[:, :, 6:9, 15:19] = 0.9  # with a flag on its right: a flip is visible
    return x


def test_cotta_augment_shares_its_parameters_across_the_batch():
    x = digit_batch()
    views = [cotta_augment(x, torch.Generator().manual_seed(s)) for s in range(6)]
    for v in views:
        # identical inputs stay identical up to the per-pixel noise (std 0.005) and clipping
        assert float((v - v[:1]).abs().max()) < 0.05
    spread = max(float((views[i][0] - views[0][0]).abs().max()) for i in range(1, 6))
    assert spread > 0.3  # different copies get different transforms


def centroid(img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    m = img[0, 0]
    return torch.stack([(m * ys).sum() / m.sum(), (m * xs).sum() / m.sum()])


def test_translation_reaches_the_reference_range_of_the_padded_image():
    dot = torch.zeros(1, 1, 28, 28)
    dot[:, :, 13:15, 13:15] = 1.0  # at the centre: rotation and scale leave its centroid in place
    shifts = torch.stack([centroid(cotta_augment(dot, torch.Generator().manual_seed(s))) - centroid(dot)
                          for s in range(300)])
    largest = float(shifts.abs().max())
    # 1/16 of the padded 56 pixels = 3.5, rounded to whole pixels (3); 1/16 of 28 would stop at 1.75
    assert 2.5 < largest < 3.6


def test_colour_jitter_order_is_random_and_seeded():
    x = torch.rand(4, 1, 8, 8)

    def order_of(seed: int) -> list[int]:
        return torch.randperm(5, generator=torch.Generator().manual_seed(seed)).tolist()

    orders = {tuple(order_of(s)) for s in range(20)}
    assert len(orders) > 10
    # brightness then gamma differs from gamma then brightness on the same factors: order matters
    a = adjust_gamma(adjust_brightness(x, 1.4), 0.7)
    b = adjust_brightness(adjust_gamma(x, 0.7), 1.4)
    assert not torch.allclose(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(color_jitter(x, g1), color_jitter(x, g2))


def test_flips_are_one_coin_per_copy_and_switchable():
    x = digit_batch(4)
    flipped = [random_hflip(x, torch.Generator().manual_seed(s)) for s in range(40)]
    n_flipped = sum(torch.equal(f, x.flip(-1)) for f in flipped)
    assert all(torch.equal(f, x) or torch.equal(f, x.flip(-1)) for f in flipped)  # all or none of the batch
    assert 10 <= n_flipped <= 30

    adapter = ImageClassifierAdapter(torch.nn.Identity())
    inputs = (x - 0.1307) / 0.3081
    on = [augmented_view(adapter, inputs, torch.Generator().manual_seed(s), flips=True) for s in range(30)]
    off = [augmented_view(adapter, inputs, torch.Generator().manual_seed(s), flips=False) for s in range(30)]

    def flag_right(v: torch.Tensor) -> bool:
        """Does the view match the original better than its mirror image, at the best shift?"""
        img = v[:1] * 0.3081 + 0.1307
        best = [float(F.conv2d(img, t[:1], padding=5).max()) for t in (x, x.flip(-1))]
        return best[0] > best[1]

    assert all(flag_right(v) for v in off)
    assert 0 < sum(not flag_right(v) for v in on) < 30


def test_colour_images_get_saturation_and_hue():
    x = torch.rand(2, 3, 16, 16)
    grey = x.mean(1, keepdim=True).expand(2, 3, 16, 16).contiguous()
    a = cotta_augment(x, torch.Generator().manual_seed(0))
    g = cotta_augment(grey, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    # a grey image stays (nearly) grey: saturation and hue act on colour only
    assert float((g - g.mean(1, keepdim=True)).abs().max()) < 0.05
