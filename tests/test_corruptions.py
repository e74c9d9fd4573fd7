"""The MNIST-C corruptions on real digits: shape, dtype, strength rising with severity, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.corruptions import CORRUPTIONS, FAMILIES, corrupt
from pipeline.data.mnistc import load_digits

RANDOM = {"shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate",
          "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag"}


@pytest.fixture(scope="module")
def digits():
    x, _ = load_digits()
    return x[:40]


def _change(a, b):
    return np.abs(a.astype(np.int32) - b.astype(np.int32)).mean()


def test_mnist_c_set_is_complete():
    assert len(CORRUPTIONS) >= 15 and set(FAMILIES) == set(CORRUPTIONS)
    assert len(set(FAMILIES.values())) >= 4


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_changes_image_more_at_higher_severity(digits, name):
    low = corrupt(digits, name, 1, np.random.default_rng(0))
    high = corrupt(digits, name, 5, np.random.default_rng(0))
    assert low.dtype == np.uint8 and low.shape == digits.shape
    assert _change(low, digits) > 1.0
    assert _change(high, digits) > _change(low, digits)


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_seed_fixes_output(digits, name):
    a = corrupt(digits, name, 3, np.random.default_rng(7))
    b = corrupt(digits, name, 3, np.random.default_rng(7))
    c = corrupt(digits, name, 3, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_arguments_name_the_value(digits):
    with pytest.raises(ValueError, match="'snow'"):
        corrupt(digits, "snow", 3, np.random.default_rng(0))
    for bad in (0, 6):
        with pytest.raises(ValueError, match=f"got {bad}"):
            corrupt(digits, "fog", bad, np.random.default_rng(0))
