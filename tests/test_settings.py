"""The five evaluation settings: each one's defining property, and the metadata they leave in the
manifest (pure pyarrow: no files, no Ray)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.benchmarks.settings import (
    SettingError,
    apply_setting,
    continual,
    correlated,
    gradual,
    mixed_domains,
    reset_each_shift,
)
from pipeline.manifest import read_manifest_meta, write_manifest

CORRUPTIONS = ["gaussian_noise", "fog", "contrast"]


def make_pool(n: int = 40, n_classes: int = 4, severities=(1, 2, 3, 4, 5), seed: int = 0) -> pa.Table:
    """corruption-major pool; the same n samples (labels i.i.d.) in every domain, as a benchmark's."""
    labels = np.random.default_rng(seed).integers(0, n_classes, n)
    cols: dict[str, list] = {k: [] for k in ("sample_id", "label", "domain", "corruption", "severity")}
    for c in CORRUPTIONS:
        for s in severities:
            for i in range(n):
                cols["sample_id"].append(f"{c}-{s}-{i:05d}")
                cols["label"].append(int(labels[i]))
                cols["domain"].append(f"{c}-{s}")
                cols["corruption"].append(c)
                cols["severity"].append(s)
    return pa.table(cols)


def mean_run(labels: np.ndarray) -> float:
    """Mean length of runs of one label."""
    return len(labels) / (1 + int(np.count_nonzero(labels[1:] != labels[:-1])))


def domain_sequence(table: pa.Table) -> list[str]:
    domains = table.column("domain").to_pylist()
    return [d for i, d in enumerate(domains) if i == 0 or domains[i - 1] != d]


def test_reset_each_shift_and_continual_keep_domain_blocks_and_say_which_reset_they_expect():
    pool = make_pool(n=5, severities=(5,))
    for fn, reset in ((reset_each_shift, True), (continual, False)):
        table, meta = fn(pool)
        assert domain_sequence(table) == [f"{c}-5" for c in CORRUPTIONS]
        assert table.column("sample_id").to_pylist() == pool.column("sample_id").to_pylist()
        assert table.column("position").to_pylist() == list(range(pool.num_rows))
        assert meta["reset_on_domain_change"] is reset and meta["domains"] == [f"{c}-5" for c in CORRUPTIONS]


def test_gradual_follows_cottas_severity_sequence():
    pool = make_pool(n=6)
    table, meta = gradual(pool)
    blocks = [(d.rsplit("-", 1)[0], int(d.rsplit("-", 1)[1])) for d in domain_sequence(table)]
    up_down = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    expected = [(CORRUPTIONS[0], s) for s in (5, 4, 3, 2, 1)] + [(c, s) for c in CORRUPTIONS[1:] for s in up_down]
    assert blocks == expected
    assert meta["severity_sequence"] == [list(b) for b in expected]
    assert table.num_rows == 6 * len(expected)
    ids = table.column("sample_id").to_pylist()
    assert len(set(ids)) == len(ids)  # repeated blocks stay unique ids
    # the second visit of fog-2 holds the same samples as the first
    rows = table.to_pylist()
    first = [r["sample_id"] for r in rows if r["domain"] == "fog-2" and "~" not in r["sample_id"]]
    second = [r["sample_id"][:-2] for r in rows if r["domain"] == "fog-2" and r["sample_id"].endswith("~1")]
    assert first == second and len(first) == 6
    all_rising, _ = gradual(pool, first_descending=False)
    assert [int(d.rsplit("-", 1)[1]) for d in domain_sequence(all_rising)][:9] == up_down


def test_gradual_needs_more_than_one_severity():
    with pytest.raises(SettingError, match="at least two severities"):
        gradual(make_pool(n=3, severities=(5,)))


def test_mixed_domains_is_a_seeded_permutation_covering_every_domain():
    pool = make_pool(n=30, severities=(5,))
    table, meta = mixed_domains(pool, seed=3)
    ids = table.column("sample_id").to_pylist()
    assert sorted(ids) == sorted(pool.column("sample_id").to_pylist())
    assert ids != pool.column("sample_id").to_pylist()
    # shuffled together: every domain appears in the first third of the stream, and domains switch often
    head = set(table.column("domain").to_pylist()[: pool.num_rows // 3])
    assert head == {f"{c}-5" for c in CORRUPTIONS}
    assert len(domain_sequence(table)) > pool.num_rows // 3
    assert mixed_domains(pool, seed=3)[0].equals(table)
    assert mixed_domains(pool, seed=4)[0].column("sample_id").to_pylist() != ids
    assert meta["params"] == {"seed": 3} and meta["reset_on_domain_change"] is False


def test_correlated_small_delta_gives_long_label_runs_and_large_delta_approaches_iid():
    n, k = 200, 4
    pool = make_pool(n=n, n_classes=k, severities=(5,))
    labels = np.asarray(pool.column("label").to_pylist())
    rng = np.random.default_rng(0)
    iid = np.mean([mean_run(labels[rng.permutation(len(labels))]) for _ in range(20)])

    def runs(delta: float, **kw) -> float:
        table, _ = correlated(pool, delta=delta, seed=1, **kw)
        # within each domain the rows are a permutation of that domain's rows
        for c in CORRUPTIONS:
            dom = [r for r in table.to_pylist() if r["corruption"] == c]
            assert sorted(r["sample_id"] for r in dom) == [f"{c}-5-{i:05d}" for i in range(n)]
        return mean_run(np.asarray(table.column("label").to_pylist()))

    small = runs(0.01)
    assert small > 5 * iid
    # RoTTA's slots: with one slot per sample of a class, a large delta spreads every class evenly
    large = runs(1e4, slots=n // k)
    assert 0.67 * iid < large < 1.5 * iid
    assert runs(1e4) < small  # the reference's default slots: shorter runs as delta grows
    sorted_table, _ = correlated(pool, delta=0.0)
    dom_labels = np.asarray(sorted_table.column("label").to_pylist())[:n]
    assert np.all(np.diff(dom_labels) >= 0)  # delta 0 sorts each domain by label


def test_correlated_is_deterministic_by_seed_and_can_mix_domains():
    pool = make_pool(n=40, severities=(5,))
    a, meta = correlated(pool, delta=0.1, seed=5)
    assert correlated(pool, delta=0.1, seed=5)[0].equals(a)
    assert correlated(pool, delta=0.1, seed=6)[0].column("sample_id").to_pylist() != a.column("sample_id").to_pylist()
    assert domain_sequence(a) == [f"{c}-5" for c in CORRUPTIONS]
    mixed, _ = correlated(pool, delta=0.1, seed=5, mix_domains=True)
    assert len(domain_sequence(mixed)) > len(CORRUPTIONS)
    assert meta["params"] == {"delta": 0.1, "seed": 5, "slots": None, "mix_domains": False}


def test_bad_settings_fail_with_one_line():
    pool = make_pool(n=4, severities=(5,))
    with pytest.raises(SettingError, match="unknown setting 'shuffled'"):
        apply_setting(pool, "shuffled")
    with pytest.raises(SettingError, match="delta must be"):
        correlated(pool, delta=-1.0)
    with pytest.raises(SettingError, match="continual"):
        apply_setting(pool, "continual", seed=1)
    unlabelled = pool.set_column(1, "label", pa.array([None] * pool.num_rows, pa.int64()))
    with pytest.raises(SettingError, match="some rows have no label"):
        correlated(unlabelled)


def test_manifest_metadata_round_trips(tmp_path):
    table, meta = apply_setting(make_pool(n=4, severities=(5,)), "mixed_domains", seed=2)
    meta["source"] = {"layout": "cifar-c"}
    path = write_manifest(table, meta, tmp_path / "m.parquet")
    assert read_manifest_meta(path) == meta
    assert pq.read_table(path).column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"sample_id": ["a"]}), plain)
    assert read_manifest_meta(plain) == {}
    assert Counter(read_manifest_meta(path)["domains"]) == Counter(f"{c}-5" for c in CORRUPTIONS)
