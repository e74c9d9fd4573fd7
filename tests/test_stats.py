"""pipeline.analysis.stats against values worked out by hand (formulas in the comments)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.analysis.stats import mcnemar, mean_ci, paired_bootstrap, wilson_ci


def test_mean_ci_student_t() -> None:
    # [1, 2, 3]: mean 2, sd 1, t(0.975, df 2) = 4.302653; half width 4.302653 / sqrt(3) = 2.484138
    mean, low, high, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert low == pytest.approx(2 - 2.484138, abs=1e-6) and high == pytest.approx(2 + 2.484138, abs=1e-6)
    # one seed: a mean but no interval; none: nothing
    assert mean_ci([0.25])[0] == 0.25 and math.isnan(mean_ci([0.25])[1])
    assert mean_ci([])[3] == 0 and math.isnan(mean_ci([])[0])
    # identical seeds: zero width
    assert mean_ci([0.1, 0.1, 0.1])[1:3] == pytest.approx((0.1, 0.1))


def test_wilson_interval() -> None:
    # 5 of 10: p = 0.5, z = 1.959964; half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 0.263413
    low, high = wilson_ci(5, 10)
    assert low == pytest.approx(0.5 - 0.263413, abs=1e-5) and high == pytest.approx(0.5 + 0.263413, abs=1e-5)
    # 0 of 20: lower bound 0, upper z^2 / (n + z^2) = 3.841459 / 23.841459 = 0.161123
    assert wilson_ci(0, 20) == pytest.approx((0.0, 0.161123), abs=1e-5)
    with pytest.raises(ValueError, match="errors must lie"):
        wilson_ci(11, 10)


def test_mcnemar_exact_and_chi_square() -> None:
    # 10 pairs where only A is right (b), 2 where only B is right (c), 8 where both agree:
    # exact two-sided p = 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096 = 0.0385742
    a = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    b = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    out = mcnemar(a, b)
    assert (out["b"], out["c"], out["exact"]) == (10, 2, True)
    assert out["p_value"] == pytest.approx(158 / 4096, rel=1e-9)
    # 30 vs 10 discordant: chi^2 = (|30 - 10| - 1)^2 / 40 = 9.025, p = 0.0026635 (1 df)
    a = [True] * 30 + [False] * 10
    b = [False] * 30 + [True] * 10
    out = mcnemar(a, b)
    assert out["exact"] is False and out["statistic"] == pytest.approx(9.025)
    assert out["p_value"] == pytest.approx(0.0026635, abs=1e-6)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar([True], [True, False])


def test_paired_bootstrap() -> None:
    # identical predictions: difference 0 in every resample
    same = np.array([True, False] * 10)
    out = paired_bootstrap(same, same)
    assert (out["diff"], out["low"], out["high"], out["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    # A wrong on 5 of 20 samples where B is right, equal elsewhere: diff = 0.25; a resample shows no
    # difference only if it misses all 5, with probability (15/20)^20 = 0.0031712, so p = 0.0063424
    a = np.array([False] * 5 + [True] * 15)
    b = np.ones(20, bool)
    out = paired_bootstrap(a, b, n_resamples=200_000, seed=1)
    assert out["diff"] == 0.25 and out["n"] == 20
    assert out["p_value"] == pytest.approx(2 * 0.75**20, abs=0.0015)
    # the bootstrap difference is Binomial(20, 1/4) / 20; P(X <= 1) = 0.024 < 0.025 < P(X <= 2) = 0.091 and
    # P(X <= 8) = 0.959 < 0.975 < P(X <= 9) = 0.986, so its 2.5% / 97.5% quantiles are 2/20 and 9/20
    assert (out["low"], out["high"]) == (pytest.approx(2 / 20), pytest.approx(9 / 20))
    # swapping A and B mirrors the result; the same seed gives the same numbers
    rev = paired_bootstrap(b, a, n_resamples=200_000, seed=1)
    assert rev["diff"] == -0.25 and rev["p_value"] == pytest.approx(out["p_value"], abs=0.0015)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    with pytest.raises(ValueError, match="booleans"):
        paired_bootstrap([0, 2], [1, 1])


def test_hierarchical_bootstrap_counts_seeds_and_samples() -> None:
    from pipeline.analysis.stats import hierarchical_bootstrap

    # one seed, one domain, 0 of 100 wrong: every resample is 0 -> [0, 0]; all wrong -> [1, 1]
    assert hierarchical_bootstrap([[0]], [[100]]) == (0.0, 0.0, 0.0)
    assert hierarchical_bootstrap([[100]], [[100]]) == (1.0, 1.0, 1.0)
    # a deterministic corruption (every seed the same 653 of 1000) is NOT a zero-width interval: the
    # samples still vary. Binomial sd of the mean of 2 identical seeds' draws: sqrt(.653 .347 / 1000 / 2)
    # = 0.01065 at most (a resample may draw the same seed twice: sd sqrt(.653 .347 / 1000) = 0.01506)
    err, low, high = hierarchical_bootstrap([[653], [653]], [[1000], [1000]], n_resamples=20_000)
    assert err == pytest.approx(0.653)
    assert 0.02 < high - low < 2 * 1.96 * 0.01506 and low < 0.653 < high
    # two seeds far apart with few samples: never below 0 (Student-t over 2 seeds gave 3.0 +- 12.7)
    err, low, high = hierarchical_bootstrap([[0], [6]], [[100], [100]])
    assert err == pytest.approx(0.03) and 0.0 <= low <= 0.01 and high <= 0.09
    # the mean over domains, each domain weighing the same: (10/100 + 40/50) / 2 = 0.45
    assert hierarchical_bootstrap([[10, 40]], [[100, 50]])[0] == pytest.approx(0.45)


def test_holm_by_hand() -> None:
    from pipeline.analysis.stats import holm

    # sorted 0.01, 0.02, 0.04 (m = 3): 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # capped at 1, NaN kept out of m: sorted 0.3, 0.6 (m = 2): 0.6, 0.6
    adj = holm([0.6, float("nan"), 0.3])
    assert adj[0] == pytest.approx(0.6) and adj[2] == pytest.approx(0.6) and math.isnan(adj[1])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_p_text_and_win_tie_loss() -> None:
    from pipeline.analysis.stats import format_p, win_tie_loss

    assert (format_p(0.0), format_p(0.0004), format_p(0.0123), format_p(float("nan"))) == ("< 0.001", "< 0.001", "0.012", "-")
    # lower error and significant: win; higher and significant: loss; not significant: tie
    assert win_tie_loss([-0.02, 0.03, -0.10, 0.01], [0.01, 0.001, 0.2, 0.04]) == (1, 1, 2)
