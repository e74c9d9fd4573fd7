"""Evaluation protocols (ttt/protocol.py): the online protocol's skipped batches, RDumb's periodic
reset, the calibration metrics (ttt/calibration.py) and the pass counter (ttt/passes.py)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.embedded.model import SmallCNN
from ttt import TTTConfig, build_method
from ttt.calibration import Accumulator, ece, from_probs
from ttt.protocol import adapted_schedule, busy_batches
from workers.adapters import ImageClassifierAdapter
from workers.stream import run_stream, stream_chunks

torch.set_num_threads(1)


def _rows(small_default, n):
    return pq.read_table(small_default["manifest"]).slice(0, n).to_pylist()


def _method(name="tent", **cfg):
    torch.manual_seed(0)
    adapter = ImageClassifierAdapter(SmallCNN(width=8))
    return adapter, build_method(adapter, TTTConfig(method=name, batch_size=10, **cfg))


def test_busy_batches_follow_the_reference_delay():
    # delay = max(0, ceil(k * eta) - 1): a step 3x the forward at eta 1 lets 2 batches pass
    assert busy_batches(3.0, 1.0) == 2
    assert busy_batches(1.0, 1.0) == 0 and busy_batches(0.5, 1.0) == 0
    assert busy_batches(37.0, 0.5) == 18  # ceil(18.5) - 1
    assert busy_batches(30.0, 0.1) == 2  # 0.1 * 30 is 3.0000000000000004 in floats: still 3 - 1
    assert busy_batches(5.0, 0.0) == 0  # eta 0: the stream waits, every batch adapted
    assert adapted_schedule(7, 3.0, 1.0) == [True, False, False, True, False, False, True]


def test_online_protocol_skips_exactly_the_batches_the_cost_table_implies(small_default):
    rows = _rows(small_default, 100)  # 10 batches
    # hand computation: tent cost 2.5 at eta 1 -> ceil(2.5) - 1 = 2 batches pass after each adapted one:
    # adapted 0, 3, 6, 9
    adapter, method = _method(protocol="online", online={"eta": 1.0, "costs": {"tent": 2.5}})
    out = run_stream(adapter, method, rows, run_id="r", shard=0, worker="w")
    adapted = [a["adapted"] for a in sorted(out["analysis"], key=lambda a: a["batch_index"])]
    assert adapted == [i in (0, 3, 6, 9) for i in range(10)]
    by_batch = {a["batch_index"]: a for a in out["analysis"]}
    assert all(by_batch[i]["stop_reason"] == "online_skipped" and by_batch[i]["steps"] == 0
               for i in range(10) if not adapted[i])
    for r in out["results"]:
        assert r["adapted"] == (r["position"] // 10 in (0, 3, 6, 9))
    # a skipped batch is predicted by the current model: the model after batch 0's update, unchanged
    _, plain = _method()
    offline = run_stream(adapter, plain, rows[:10], run_id="r", shard=0, worker="w")
    state = {k: v.clone() for k, v in plain.model.state_dict().items()}
    inputs = next(iter(adapter.build_loader(rows[10:20], batch_size=10))).inputs
    plain.model.load_state_dict(state)
    expected = plain.predict_after_update(inputs).softmax(1).amax(1)
    got = [r["confidence"] for r in out["results"] if 10 <= r["position"] < 20]
    assert np.allclose(got, expected.numpy(), atol=1e-6)
    assert offline["analysis"][0]["adapted"] is True


def test_online_delay_survives_a_checkpoint(small_default):
    rows = _rows(small_default, 80)
    cfg = {"protocol": "online", "online": {"costs": {"tent": 3.0}}}
    adapter, method = _method(**cfg)
    whole = list(stream_chunks(adapter, method, rows, run_id="r", shard=0, worker="w", checkpoint_every=2))
    adapter2, method2 = _method(**cfg)
    start = whole[1]["state"]  # after batch 3: batch 3 adapted, 4 and 5 must still pass
    rest = list(stream_chunks(adapter2, method2, rows[start.offset:], run_id="r", shard=0, worker="w",
                              start=start, checkpoint_every=2))
    flags = lambda chunks: [a["adapted"] for c in chunks for a in c["analysis"]]  # noqa: E731
    assert flags(whole) == [True, False, False] * 2 + [True, False]
    assert flags(rest) == flags(whole)[4:]


def test_reset_every_resets_after_n_adapted_batches(small_default):
    rows = _rows(small_default, 100)
    adapter, method = _method(reset_every=3)
    resets = []
    original = method.reset
    method.reset = lambda: (resets.append(method.batches_since_reset), original())
    out = run_stream(adapter, method, rows, run_id="r", shard=0, worker="w")
    flags = {a["batch_index"]: a["periodic_reset"] for a in out["analysis"]}
    assert [i for i, f in sorted(flags.items()) if f] == [3, 6, 9]
    # the reset before batch 3 really restores the source: batch 3's rows equal a fresh stream's first batch
    adapter2, fresh = _method()
    first = run_stream(adapter2, fresh, rows[30:40], run_id="r", shard=0, worker="w")["results"]
    assert [r["prediction"] for r in out["results"][30:40]] == [r["prediction"] for r in first]
    assert np.allclose([r["confidence"] for r in out["results"][30:40]], [r["confidence"] for r in first])


def test_reset_every_counts_only_adapted_batches_under_the_online_protocol(small_default):
    rows = _rows(small_default, 100)
    adapter, method = _method(reset_every=2, protocol="online", online={"costs": {"tent": 2.0}})
    out = run_stream(adapter, method, rows, run_id="r", shard=0, worker="w")
    a = sorted(out["analysis"], key=lambda r: r["batch_index"])
    assert [r["adapted"] for r in a] == [True, False] * 5  # adapted 0, 2, 4, 6, 8
    assert [r["batch_index"] for r in a if r["periodic_reset"]] == [4, 8]  # after 2 adapted batches each


def test_ece_equals_a_hand_computation():
    conf = [0.05, 0.95, 0.9, 0.5, 0.52, 1.0]
    correct = [False, True, False, True, False, True]
    # 15 bins of width 1/15: 0.05 -> bin 0; 0.5, 0.52 -> bin 7 ((0.4667, 0.5333]); 0.9 -> bin 13
    # ((0.8667, 0.9333]); 0.95, 1.0 -> bin 14
    hand = (1 / 6) * abs(0 - 0.05) + (2 / 6) * abs(0.5 - 0.51) + (1 / 6) * abs(0 - 0.9) + (2 / 6) * abs(1 - 0.975)
    assert math.isclose(ece(conf, correct), hand, rel_tol=1e-12)
    acc = Accumulator()
    acc.add(np.array(conf[:3]), np.array(correct[:3]))
    acc.add(np.array(conf[3:]), np.array(correct[3:]))
    assert math.isclose(acc.result()["ece"], hand, rel_tol=1e-12)


def test_nll_and_brier_from_probabilities():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    labels = [0, 1]
    m = from_probs(probs, labels)
    assert math.isclose(m["nll"], (-math.log(0.7) - math.log(0.1)) / 2)
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.9**2 + 0.8**2)) / 2
    assert math.isclose(m["brier"], brier)


def test_result_rows_carry_calibration_inputs_and_passes(small_default):
    rows = _rows(small_default, 20)
    adapter, method = _method("source")
    out = run_stream(adapter, method, rows, run_id="r", shard=0, worker="w")
    for r in out["results"]:
        assert r["adapted"] is True and 0.0 <= r["label_prob"] <= 1.0 and 0.0 <= r["brier"] <= 2.0
    assert all(a["forward_passes"] == 1.0 and a["backward_passes"] == 0.0 for a in out["analysis"])
    adapter, tent = _method("tent")
    out = run_stream(adapter, tent, rows, run_id="r", shard=0, worker="w")
    # tent predicts from the adaptation forward: 1 forward with gradient, 1 backward per sample
    assert all(a["forward_passes"] == 1.0 and a["backward_passes"] == 1.0 for a in out["analysis"])
    assert all(a["peak_rss_mb"] > 0 for a in out["analysis"])


@pytest.mark.parametrize("bad", [{"eta": 1.5}, {"costs": {"tent": -1.0}}])
def test_bad_online_config_fails_validation(bad):
    with pytest.raises(ValueError):
        TTTConfig(method="tent", protocol="online", online=bad)


def test_summary_calibration_and_costs_equal_the_whole_table(tmp_path):
    import pandas as pd
    import pyarrow as pa

    from pipeline.job.outputs import summarise_run

    rng = np.random.default_rng(0)
    (tmp_path / "results").mkdir()
    (tmp_path / "analysis").mkdir()
    frames = []
    for part in range(3):
        k = 40
        df = pd.DataFrame({"sample_id": [f"{part}-{i}" for i in range(k)], "domain": rng.choice(["fog", "snow"], size=k),
                           "correct": rng.random(k) > 0.4, "error": [None] * k, "confidence": rng.random(k),
                           "label_prob": rng.random(k), "brier": rng.random(k) * 2, "adapted": rng.random(k) > 0.5})
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "results" / f"part-{part}.parquet")
        frames.append(df)
        ana = pd.DataFrame({"worker": ["w0", "w1"], "sample_ids": [[f"{part}-{i}" for i in range(10)]] * 2,
                            "timing_fine_tuning": [0.5, 1.5], "timing_total": [1.0, 2.0], "forward_passes": [1.0, 3.0],
                            "backward_passes": [0.0, 1.0], "peak_rss_mb": [100.0 + part, 200.0],
                            "peak_gpu_mb": [None, None], "periodic_reset": [part == 1, False]})
        pq.write_table(pa.Table.from_pandas(ana, preserve_index=False), tmp_path / "analysis" / f"part-{part}.parquet")
    whole = pd.concat(frames, ignore_index=True)
    got = summarise_run(tmp_path)
    assert math.isclose(got["overall"]["ece"], ece(whole["confidence"], whole["correct"]), rel_tol=1e-12)
    assert math.isclose(got["overall"]["nll"], float(np.mean(-np.log(whole["label_prob"]))), rel_tol=1e-12)
    assert math.isclose(got["overall"]["brier"], float(whole["brier"].mean()), rel_tol=1e-12)
    for domain, group in whole.groupby("domain"):
        assert math.isclose(got["per_domain"][domain]["ece"], ece(group["confidence"], group["correct"]), rel_tol=1e-12)
    cost = got["cost"]
    assert cost["samples"] == 60 and math.isclose(cost["adapt_s_per_sample"], 6.0 / 60)
    assert math.isclose(cost["forward_passes_per_sample"], 2.0) and math.isclose(cost["backward_passes_per_sample"], 0.5)
    assert cost["peak_memory_mb"] == {"w0": {"rss_mb": 102.0, "gpu_mb": None}, "w1": {"rss_mb": 200.0, "gpu_mb": None}}
    assert got["protocol"]["periodic_resets"] == 1
    assert math.isclose(got["protocol"]["adapted_fraction"], whole["adapted"].mean())
