"""The baselines' defining behaviour on small synthetic batches (EATA, SAR, RoTTA, LAME, DeYO,
ROID), hand-computed where the reference defines a formula, plus one real pipeline run that
writes their analysis columns."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.embedded.model import SmallCNN
from ttt import TTTConfig, build_method
from ttt.augment import patch_shuffle
from ttt.losses import softmax_entropy
from ttt.methods.base import seeded_generator
from ttt.methods.lame import affinity_matrix
from ttt.methods.rotta import CSTUMemory, RobustBN, convert_to_robust_bn
from ttt.params import snapshot
from workers.adapters import ImageClassifierAdapter

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


class ScaledLogits(nn.Module):
    """logits = inputs x w: the inputs are the logits, one trainable scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class TwoParam(nn.Module):
    """Two-class logits (a x0, b x1): two parameters."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.a * x[:, 0], self.b * x[:, 1]], 1)


class NormNet(nn.Module):
    """A BatchNorm-free CNN: GroupNorm after the conv, LayerNorm before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8 * 14 * 14, 32)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn(self.conv(x))).flatten(1)
        return self.head(F.relu(self.ln(self.fc(h))))


def build(name: str, model: nn.Module, **cfg):
    return build_method(ImageClassifierAdapter(model), TTTConfig(method=name, **cfg))


def images(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(width=8)


# -- EATA ----------------------------------------------------------------------------------------
def test_eata_filters_drop_exactly_the_unreliable_and_the_redundant_samples():
    method = build("eata", ScaledLogits(), update_filter="all", optimizer="sgd", momentum=0.0, lr=0.1)
    margin = 0.4 * math.log(10)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 10, generator=g)
    logits[:20, 0] += 8.0  # confident class 0
    logits[20:30, 3] += 8.0  # confident class 3
    logits[30:] *= 0.1  # the last ten are unsure
    entropy = softmax_entropy(logits)
    reliable = entropy < margin
    assert 0 < int(reliable.sum()) < 40

    loss, _, _ = method.loss(logits)  # first batch: only the entropy filter (no average yet)
    weight = torch.exp(margin - entropy[reliable])
    torch.testing.assert_close(loss, (entropy[reliable] * weight).mean())
    assert method.batch_stats["n_reliable"] == int(reliable.sum())
    assert method.batch_stats["n_filtered_redundant"] == 0

    average = F.one_hot(torch.tensor(0), 10).float() * 0.9 + 0.01  # the running average says "class 0"
    method.class_probs = average.clone()
    loss, _, _ = method.loss(logits)
    cosine = F.cosine_similarity(average.unsqueeze(0), logits.softmax(1), dim=1)
    kept = reliable & (cosine.abs() < 0.4)
    assert int(kept.sum()) == 10  # the class-3 samples; the class-0 ones are redundant
    assert method.batch_stats["n_filtered_redundant"] == int(reliable.sum()) - 10
    torch.testing.assert_close(loss, (entropy[kept] * torch.exp(margin - entropy[kept])).mean())
    expected_average = 0.9 * average + 0.1 * logits[kept].softmax(1).mean(0)
    torch.testing.assert_close(method.class_probs, expected_average)


def test_eata_takes_no_step_when_every_sample_is_filtered():
    method = build("eata", ScaledLogits(), update_filter="all", lr=0.1)
    record = method.step(torch.zeros(8, 10)).record  # uniform predictions: all unreliable
    assert record["stop_reason"] == "all_filtered" and record["steps"] == 0 and record["n_reliable"] == 0
    assert float(method.model.w.detach()) == 1.0


def test_eata_fisher_term_from_clean_samples(tmp_path):
    clean = tmp_path / "train.npz"
    np.savez(clean, x=(np.random.default_rng(0).random((60, 28, 28)) * 255).astype(np.uint8))
    eta = build("eata", small_cnn(), batch_size=20)
    eata = build("eata", small_cnn(), batch_size=20, eata={"fisher_data": str(clean), "fisher_samples": 40})
    assert eta.fishers is None
    assert any(f is not None and float(f.sum()) > 0 for f in eata.fishers)
    assert_source = snapshot(small_cnn())
    assert all(torch.equal(v, assert_source[k]) for k, v in snapshot(eata.model).items())  # Fisher pass moved nothing
    assert float(eata.fisher_penalty()) == 0.0  # at the source parameters
    with torch.no_grad():
        for p in eata.params:
            p.add_(0.1)
    assert float(eata.fisher_penalty()) > 0.0
    with pytest.raises(FileNotFoundError, match="ttt.eata.fisher_data"):
        build("eata", small_cnn(), eata={"fisher_data": str(tmp_path / "missing.npz")})


# -- SAR -----------------------------------------------------------------------------------------
def entropy_of(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return softmax_entropy(torch.stack([a * x[:, 0], b * x[:, 1]], 1))


def test_sar_update_equals_a_hand_written_sam_step():
    x = torch.tensor([[2.0, -1.0], [0.3, 0.2], [-1.5, 1.0], [0.05, 0.05]])
    lr, rho, margin = 0.5, 0.05, 0.4 * math.log(2)
    method = build("sar", TwoParam(0.8, 1.2), update_filter="all", optimizer="sgd", momentum=0.0, lr=lr,
                   sar={"rho": rho, "reset_constant": 0.0})
    record = method.step(x).record

    a, b = torch.tensor(0.8, requires_grad=True), torch.tensor(1.2, requires_grad=True)
    entropy = entropy_of(a, b, x)
    s1 = entropy < margin
    assert 0 < int(s1.sum()) < 4  # the filter matters in this batch
    ga, gb = torch.autograd.grad(entropy[s1].mean(), (a, b))
    norm = torch.sqrt(ga ** 2 + gb ** 2)
    a2 = (a + rho * ga / (norm + 1e-12)).detach().requires_grad_(True)
    b2 = (b + rho * gb / (norm + 1e-12)).detach().requires_grad_(True)
    entropy2 = entropy_of(a2, b2, x)[s1]
    ga2, gb2 = torch.autograd.grad(entropy2[entropy2 < margin].mean(), (a2, b2))
    torch.testing.assert_close(method.model.a.detach(), (a - lr * ga2).detach())
    torch.testing.assert_close(method.model.b.detach(), (b - lr * gb2).detach())
    assert record["n_reliable"] == int(s1.sum()) and record["recovered"] is False
    assert record["loss_ema"] == pytest.approx(float(entropy2[entropy2 < margin].mean()))


def test_sar_recovery_restores_the_source_model():
    method = build("sar", small_cnn(), lr=0.05, optimizer="sgd", sar={"e_margin": 1.0, "reset_constant": 10.0})
    source = snapshot(method.model)
    record = method.step(images()).record
    assert record["recovered"] is True and record["stop_reason"] == "model_recovery" and record["steps"] == 1
    assert all(torch.equal(v, source[k]) for k, v in snapshot(method.model).items())
    assert method.loss_ema is None and method.n_recoveries == 1

    kept = build("sar", small_cnn(), lr=0.05, optimizer="sgd", sar={"e_margin": 1.0, "reset_constant": 0.0})
    kept.step(images())
    assert any(not torch.equal(v, source[k]) for k, v in snapshot(kept.model).items())


def test_sar_adapts_a_group_and_layer_norm_model_one_sample_at_a_time():
    torch.manual_seed(0)
    model = NormNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build("sar", model, batch_size=1, lr=0.05, optimizer="sgd", sar={"e_margin": 1.0})
    for i in range(3):
        record = method.step(images(1, seed=i)).record
        assert record["stop_reason"] == "steps_done" and record["steps"] == 1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"gn.weight", "gn.bias", "ln.weight", "ln.bias"}


# -- RoTTA ---------------------------------------------------------------------------------------
def test_rotta_memory_stays_class_balanced_under_a_label_skewed_stream():
    rng = np.random.default_rng(0)
    memory = CSTUMemory(capacity=64, n_classes=10)
    labels = np.where(rng.random(1000) < 0.9, 0, rng.integers(1, 10, 1000))  # 90% class 0
    for i, label in enumerate(labels):
        memory.add(torch.full((1,), float(i)), int(label), float(rng.random()))
        counts = memory.per_class_counts()
        assert memory.occupancy() <= 64 and max(counts) <= math.ceil(64 / 10)
    counts = memory.per_class_counts()
    assert counts[0] == 7  # 900 class-0 arrivals hold no more than their share
    arrivals = np.bincount(labels, minlength=10)
    assert all(counts[c] >= min(arrivals[c], 6) for c in range(1, 10))  # the rare classes keep their share
    assert memory.occupancy() >= 60
    # timeliness: the class-0 items kept are recent ones, not the first to arrive
    data, _ = memory.contents()
    assert min(float(d) for d in data[:counts[0]]) > 500


def test_robust_bn_mixes_source_and_batch_statistics():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    rbn = RobustBN(bn, alpha=0.05)
    x = torch.randn(16, 3, 5, 5) * 3 + 2
    rbn.train()
    rbn(x)
    var, mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=False)
    torch.testing.assert_close(rbn.running_mean, 0.95 * 1.0 + 0.05 * mean)
    torch.testing.assert_close(rbn.running_var, 0.95 * 4.0 + 0.05 * var)
    rbn.eval()
    expected = (x - rbn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(rbn.running_var.view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(rbn(x), expected)


def test_rotta_predicts_with_the_teacher_and_updates_every_64_samples():
    model = small_cnn()
    model.eval()
    method = build("rotta", model, rotta={"flips": False})
    reference = copy.deepcopy(method.teacher)
    x = images(100)
    result = method.step(x)
    with torch.no_grad():
        assert torch.equal(result.logits, reference(x))  # before the batch's updates
    assert result.record["steps"] == 1 and result.record["memory_size"] <= 64
    assert result.record["steps"] + method.step(images(100, seed=1)).record["steps"] == 3  # 200 // 64
    assert method.step(images(20, seed=2)).record["stop_reason"] == "no_update_due"
    assert sum(isinstance(m, RobustBN) for m in method.model.modules()) == 3 + 2
    nu = method.cfg.rotta.nu
    # the teacher moved by nu x (student - teacher): close to the source, not equal to it
    moved = [n for n, p in method.teacher.named_parameters() if not torch.equal(p, dict(reference.named_parameters())[n])]
    assert moved and nu < 0.01
    method.reset()
    assert method.memory is None and method.n_seen == 0
    assert all(torch.equal(v, snapshot(reference)[k]) for k, v in snapshot(method.teacher).items())


def test_convert_to_robust_bn_needs_running_statistics():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        convert_to_robust_bn(model, 0.05)


# -- LAME ----------------------------------------------------------------------------------------
class FeatureModel(nn.Module):
    """Inputs are [features | logits]: embed() returns the first 4 columns, forward() the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(1, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 4:]


def test_lame_leaves_the_model_unchanged_and_moves_predictions_to_neighbour_agreement():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    features = torch.cat([centres[0] + 0.1 * torch.randn(10, 4, generator=g),
                          centres[1] + 0.1 * torch.randn(10, 4, generator=g)])
    logits = torch.zeros(20, 3)
    logits[:10, 0], logits[10:, 1] = 2.0, 2.0
    logits[3] = torch.tensor([0.0, 0.6, 0.0])  # an outlier of cluster 0 that leans to class 1
    logits[15] = torch.tensor([0.5, 0.0, 0.0])  # one of cluster 1 that leans to class 0
    x = torch.cat([features, logits], 1)
    model = FeatureModel()
    method = build("lame", model, lame={"affinity": "knn", "knn": 3})
    before = snapshot(model)
    result = method.step(x)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert result.logits.argmax(1)[3] == 0 and result.logits.argmax(1)[15] == 1
    assert result.record["n_changed"] == 2 and result.record["updated_param_count"] == 0
    kernel = affinity_matrix(F.normalize(features, dim=1), "knn", 3)

    def agreement(pred: torch.Tensor) -> float:
        return float((kernel * (pred.unsqueeze(0) == pred.unsqueeze(1)).float()).sum() / kernel.sum())

    assert agreement(result.logits.argmax(1)) > agreement(logits.argmax(1))
    torch.testing.assert_close(result.logits.softmax(1).sum(1), torch.ones(20))


# -- DeYO ----------------------------------------------------------------------------------------
def test_patch_shuffle_permutes_whole_patches():
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28)
    y = patch_shuffle(x, 4, torch.Generator().manual_seed(0))
    assert not torch.equal(x, y)
    blocks = lambda t: {tuple(t[0, 0, r:r + 7, c:c + 7].flatten().tolist()) for r in range(0, 28, 7) for c in range(0, 28, 7)}  # noqa: E731
    assert blocks(x) == blocks(y)


def test_deyo_computes_plpd_on_the_shuffled_view():
    model = small_cnn()
    x = images(48)
    cfg = {"deyo": {"margin": 1.0, "plpd_threshold": 0.0}, "seed": 7}
    method = build("deyo", copy.deepcopy(model), **cfg)
    loss, logits, _ = method.loss(x)

    reference = build("deyo", copy.deepcopy(model), **cfg).model  # same configuration, untouched
    with torch.no_grad():
        out = reference(x)
        entropy = softmax_entropy(out)
        s1 = entropy < math.log(10)
        shuffled = patch_shuffle(x[s1], 4, seeded_generator(7, "deyo.shuffle"))
        assert torch.equal(method.last_shuffled, shuffled)
        probs, probs_shuffled = out[s1].softmax(1), reference(shuffled).softmax(1)
        label = probs.argmax(1, keepdim=True)
        plpd = (probs.gather(1, label) - probs_shuffled.gather(1, label)).squeeze(1)
        keep = plpd > 0.0
        e = entropy[s1][keep]
        weight = torch.exp(0.4 * math.log(10) - e) + torch.exp(plpd[keep])
    assert 0 < int(keep.sum()) < int(s1.sum())  # PLPD filters some, not all
    assert method.batch_stats["n_filtered_plpd"] == int(s1.sum()) - int(keep.sum())
    torch.testing.assert_close(loss.detach(), (e * weight).mean(), rtol=1e-5, atol=1e-6)


# -- ROID ----------------------------------------------------------------------------------------
def test_roid_weight_ensembling_and_prior_correction_follow_the_formula():
    cfg = {"optimizer": "sgd", "momentum": 0.0, "lr": 0.5, "batch_size": 32,
           "roid": {"momentum_src": 0.8, "flips": False}}
    x = images(32)
    method, twin = build("roid", small_cnn(), **cfg), build("roid", small_cnn(), **cfg)
    source = [p.detach().clone() for p in method.params]
    result = method.step(x)

    loss, logits, _ = twin.loss(x)  # the same loss (same seed, same augmented view) by hand
    grads = torch.autograd.grad(loss, twin.params, allow_unused=True)
    for p, src, g in zip(method.params, source, grads):
        stepped = src - 0.5 * (g if g is not None else torch.zeros_like(src))
        torch.testing.assert_close(p.detach(), 0.8 * stepped + 0.2 * src)

    prior = logits.detach().softmax(1).mean(0)
    smooth = max(1 / 32, 1 / 10) / prior.max()
    torch.testing.assert_close(result.logits, logits.detach() * (prior + smooth) / (1 + smooth * 10))
    assert 0 < result.record["n_loss_samples"] < 32


# -- the shared machinery: guards and predict_from --------------------------------------------------
@pytest.mark.parametrize("name", ["eata", "sar", "deyo", "roid"])
def test_a_non_finite_batch_leaves_every_baseline_unchanged(name):
    method = build(name, small_cnn(), lr=0.05)
    x = images(32)
    x[0, 0, 3, 3] = float("nan")  # batch statistics spread it to every sample
    before = snapshot(method.model)
    record = method.step(x).record
    assert record["steps"] == 0 and record["stop_reason"] in ("nonfinite_loss", "all_filtered")
    assert all(torch.equal(v, before[k]) for k, v in snapshot(method.model).items())


def test_rotta_keeps_non_finite_samples_out_of_its_memory():
    model = small_cnn()
    model.eval()
    method = build("rotta", model, lr=0.05, rotta={"update_frequency": 16, "flips": False})
    x = images(32)
    x[0, 0, 3, 3] = float("nan")  # the teacher normalises with running statistics: only sample 0 is hit
    record = method.step(x).record
    data, _ = method.memory.contents()
    assert 0 < len(data) <= 31 and all(bool(torch.isfinite(d).all()) for d in data)  # sample 0 came first
    assert record["steps"] == 1 and record["stop_reason"] == "steps_done"  # the update at the 32nd sample
    assert all(bool(torch.isfinite(p).all()) for p in method.model.parameters())


@pytest.mark.parametrize("name", ["eata", "sar", "deyo", "roid"])
def test_update_norm_cap_rolls_back_every_baseline(name):
    cfg = {"eata": {"e_margin": 1.0}, "sar": {"e_margin": 1.0}, "deyo": {"margin": 1.0, "plpd_threshold": -1.0}}
    method = build(name, small_cnn(), lr=0.05, guards={"max_update_norm": 1e-9}, **cfg)
    before = snapshot(method.model)
    record = method.step(images(32)).record
    assert record["stop_reason"] == "update_norm_cap" and record["steps"] == 0
    assert all(torch.equal(v, before[k]) for k, v in snapshot(method.model).items())


@pytest.mark.parametrize("name", ["eata", "deyo", "roid", "rotta"])
def test_after_update_predicts_with_one_more_forward(name):
    cfg = {"eata": {"e_margin": 1.0}, "deyo": {"margin": 1.0, "plpd_threshold": -1.0},
           "rotta": {"update_frequency": 16, "flips": False}}
    x = images(32)
    same = build(name, small_cnn(), lr=0.05, **cfg).step(x).logits
    method = build(name, small_cnn(), lr=0.05, predict_from="after_update", **cfg)
    after = method.step(x).logits
    with torch.no_grad():
        expected = method.predict_after_update(x)
    assert torch.equal(after, expected) and not torch.equal(after, same)


# -- analysis fields: every baseline on a real stream, one through the real pipeline ----------------
def test_every_baseline_writes_its_analysis_fields_into_the_parquet_schema(small_default):
    import pyarrow.parquet as pq

    from ttt.schema import ANALYSIS_SCHEMA, to_table
    from workers.stream import run_stream

    rows = pq.read_table(small_default["manifest"]).to_pylist()[:100]
    expected = {"eata": ["n_reliable", "n_filtered_redundant", "n_loss_samples"], "sar": ["n_reliable", "recovered"],
                "rotta": ["memory_size"], "lame": ["n_changed"], "deyo": ["n_reliable", "n_filtered_plpd"],
                "roid": ["n_loss_samples", "sample_weight_mean"]}
    for method, columns in expected.items():
        model = SmallCNN()
        model.load_state_dict(torch.load(small_default["checkpoint"], weights_only=True))
        adapter = ImageClassifierAdapter(model)
        cfg = TTTConfig(method=method, batch_size=50, update_filter="norm_only")
        out = run_stream(adapter, build_method(adapter, cfg), rows, run_id="t", shard=0, worker="w")
        table = to_table(out["analysis"], ANALYSIS_SCHEMA).to_pandas()
        assert len(out["results"]) == 100 and len(table) == 2
        for column in columns:
            assert table[column].notna().all(), (method, column)


def test_eata_with_clean_samples_runs_through_the_pipeline(ray_session, small_default, tmp_path):
    from pipeline.config import load_config
    from pipeline.job.runner import run_job

    train = tmp_path / "train.npz"
    np.savez(train, x=(np.random.default_rng(0).random((40, 28, 28)) * 255).astype(np.uint8))
    overrides = [f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
                 f"output_root={tmp_path / 'runs'}", "ttt.batch_size=50", "workers.num_shards=1",
                 "workers.num_cpus=0.25", f"ttt.eata.fisher_data={train}"]
    run_dir = run_job(load_config(ROOT / "configs" / "mnistc_eata.yaml", overrides))
    results = pd.read_parquet(run_dir / "results")
    analysis = pd.read_parquet(run_dir / "analysis")
    assert len(results) == 150 and results["error"].isna().all() and (results["method"] == "eata").all()
    assert len(analysis) == 3 and analysis["n_reliable"].notna().all()
    assert (analysis["n_reliable"] >= analysis["n_loss_samples"]).all()
