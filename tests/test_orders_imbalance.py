"""Domain orders (`manifest --orders N`) and the class-imbalanced setting (pipeline/benchmarks/settings.py)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.benchmarks.commands import manifest_main
from pipeline.benchmarks.settings import SettingError, domain_orders, imbalanced, long_tail_counts
from pipeline.manifest import read_manifest_meta

DOMAINS = ["gaussian_noise", "shot_noise", "fog", "contrast", "snow"]


def make_pool(n=200, n_classes=10, seed=0):
    labels = np.tile(np.arange(n_classes), n // n_classes)
    np.random.default_rng(seed).shuffle(labels)
    cols = {k: [] for k in ("sample_id", "label", "domain", "corruption", "severity")}
    for c in DOMAINS:
        for i in range(n):
            cols["sample_id"].append(f"{c}-5-{i:05d}")
            cols["label"].append(int(labels[i]))
            cols["domain"].append(f"{c}-5")
            cols["corruption"].append(c)
            cols["severity"].append(5)
    return pa.table(cols)


def test_orders_are_distinct_permutations_covering_every_domain():
    orders = domain_orders(DOMAINS, 10, seed=3)
    assert orders[0] == DOMAINS
    assert len({tuple(o) for o in orders}) == 10
    assert all(sorted(o) == sorted(DOMAINS) for o in orders)
    assert domain_orders(DOMAINS, 10, seed=3) == orders  # seeded
    assert domain_orders(DOMAINS, 10, seed=4) != orders
    with pytest.raises(SettingError):
        domain_orders(DOMAINS[:3], 7)  # only 3! = 6 exist


def _write_cifar_c(root, n=20):
    root.mkdir()
    labels = np.arange(n) % 10
    for c in DOMAINS:
        np.save(root / f"{c}.npy", np.random.default_rng(0).integers(0, 255, (n, 8, 8), dtype=np.uint8))
    np.save(root / "labels.npy", labels)


@pytest.mark.parametrize("setting", ["continual", "gradual"])
def test_manifest_orders_command_writes_n_ordered_manifests(tmp_path, setting):
    root = tmp_path / "c"
    _write_cifar_c(root)
    sev = "5" if setting == "continual" else "4,5"  # 20 images = 5 severity blocks of 4, as CIFAR-10-C
    out = tmp_path / "m.parquet"
    assert manifest_main(["cifar-c", str(root), "--out", str(out), "--corruptions", ",".join(DOMAINS),
                          "--severities", sev, "--setting", setting, "--orders", "4", "--orders-seed", "1"]) == 0
    seen = []
    for k in range(4):
        path = tmp_path / f"m-order{k}.parquet"
        meta = read_manifest_meta(path)
        key = "corruption" if setting == "gradual" else "domain"
        blocks = list(dict.fromkeys(pq.read_table(path).column(key).to_pylist()))
        assert blocks == meta["domain_order"] and meta["order_index"] == k
        assert sorted(b.split("-")[0] for b in blocks) == sorted(DOMAINS)  # every domain, once
        seen.append(tuple(b.split("-")[0] for b in blocks))
    assert len(set(seen)) == 4 and list(seen[0]) == DOMAINS


def test_imbalanced_label_counts_follow_the_ratio():
    pool = make_pool(n=200, n_classes=10)  # 20 of each class per domain
    table, meta = imbalanced(pool, ratio=10.0, seed=2)
    ranking = meta["class_ranking"]
    expected = long_tail_counts(20, 10, 10.0)
    # hand: floor(20 * 10^(-i/9)) = floor(20, 15.49, 11.99, 9.28, 7.19, 5.57, 4.31, 3.34, 2.58, 2)
    assert expected == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    for domain in dict.fromkeys(table.column("domain").to_pylist()):
        labels = [lab for lab, d in zip(table.column("label").to_pylist(), table.column("domain").to_pylist()) if d == domain]
        counts = Counter(labels)
        assert [counts[c] for c in ranking] == expected
        assert counts[ranking[0]] / counts[ranking[-1]] == 10.0
    assert meta["reset_on_domain_change"] is False and meta["params"] == {"ratio": 10.0, "seed": 2}
    assert table.column("position").to_pylist() == list(range(table.num_rows))
    # the same images in every domain; a seeded ranking
    ids = lambda d: sorted(s.split("-")[-1] for s, dd in zip(table.column("sample_id").to_pylist(),  # noqa: E731
                                                              table.column("domain").to_pylist()) if dd == d)
    assert ids("fog-5") == ids("snow-5")
    assert imbalanced(pool, ratio=10.0, seed=2)[1]["class_ranking"] == ranking
    with pytest.raises(SettingError):
        imbalanced(pool, ratio=0.5)


def test_imbalanced_manifest_command(tmp_path):
    root = tmp_path / "c"
    _write_cifar_c(root, n=500)  # 5 severity blocks of 100: 10 per class
    out = tmp_path / "imb.parquet"
    assert manifest_main(["cifar-c", str(root), "--out", str(out), "--corruptions", "fog,snow",
                          "--setting", "imbalanced", "--imbalance-ratio", "5"]) == 0
    meta = read_manifest_meta(out)
    assert meta["setting"] == "imbalanced" and sorted(meta["class_counts"].values())[::-1] == long_tail_counts(10, 10, 5.0)
