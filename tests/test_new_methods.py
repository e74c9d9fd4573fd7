"""The methods of issue 25 (RMT, AdaContrast, CMF, MEMO, RPL, SANTA, T3A, SHOT-IM, alpha-BN, TTT):
each one's defining property on a small hand-checkable case, its refusals, determinism with a seed,
resuming from a checkpoint, their analysis columns, and real pipeline jobs."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.embedded.model import SmallCNN, SmallCNNRotation, train_source_model
from ttt import TTTConfig, build_method
from ttt.checkpoint import capture
from ttt.losses import softmax_entropy
from ttt.methods.adacontrast import knn_pseudo_labels
from ttt.methods.base import MissingHookError
from ttt.methods.bn_alpha import AlphaBN
from ttt.methods.memo import marginal_entropy
from ttt.methods.rmt import supcon_loss
from ttt.methods.rpl import generalized_cross_entropy
from ttt.methods.t3a import select_supports
from ttt.params import snapshot
from ttt.schema import measured
from workers.adapters import ImageClassifierAdapter
from workers.stream import run_stream, stream_chunks

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
NEW = ["rmt", "adacontrast", "cmf", "memo", "rpl", "santa", "t3a", "shot_im", "bn_alpha", "ttt"]


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def small_cnn(seed: int = 0, rotation: bool = False) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNNRotation(width=8) if rotation else SmallCNN(width=8)


@pytest.fixture(scope="module")
def source_npz(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("source") / "train.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=(rng.random((60, 28, 28)) * 255).astype(np.uint8), y=np.arange(60) % 10)
    return str(path)


def config(name: str, source: str | None = None, **extra) -> dict:
    """Small, fast settings per method (the reference defaults otherwise)."""
    base = {"rmt": {"update_filter": "all", "rmt": {"source_data": source, "warmup_samples": 40, "flips": False}},
            "santa": {"santa": {"source_data": source, "flips": False}},
            "adacontrast": {"update_filter": "all", "optimizer": "sgd", "lr": 2e-4,
                            "adacontrast": {"queue_size": 64, "refine_after": 16, "flips": False}},
            "cmf": {"cmf": {"flips": False}},
            "memo": {"update_filter": "all", "optimizer": "sgd", "lr": 5e-3,
                     "memo": {"n_augmentations": 4, "flips": False}},
            "shot_im": {"update_filter": "all"},
            "ttt": {"update_filter": "all", "optimizer": "sgd", "momentum": 0.0}}.get(name, {})
    return {**copy.deepcopy(base), **extra}


def build(name: str, model: nn.Module | None = None, source: str | None = None, **extra):
    model = model if model is not None else small_cnn(rotation=name == "ttt")
    return build_method(ImageClassifierAdapter(model), TTTConfig(method=name, batch_size=8, **config(name, source, **extra)))


def same_state(a: nn.Module, b: dict) -> bool:
    return all(torch.equal(v, b[k]) for k, v in snapshot(a).items())


# -- alpha-BN --------------------------------------------------------------------------------------
def test_alpha_bn_at_0_is_the_source_model_and_at_1_the_norm_baseline():
    x = images(8) * 2 + 1
    model = small_cnn()
    with torch.no_grad():  # give the BatchNorms source statistics that differ from the batch's
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    with torch.no_grad():
        source = copy.deepcopy(model)(x)
        zero = build("bn_alpha", copy.deepcopy(model), bn_alpha={"alpha": 0.0}).step(x).logits
        one = build("bn_alpha", copy.deepcopy(model), bn_alpha={"alpha": 1.0}).step(x).logits
        norm = build("norm", copy.deepcopy(model)).step(x).logits
        half = build("bn_alpha", copy.deepcopy(model), bn_alpha={"alpha": 0.5}).step(x).logits
    assert torch.equal(zero, source)
    torch.testing.assert_close(one, norm, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(half, source) and not torch.allclose(half, norm)


def test_alpha_bn_mixes_the_statistics():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    layer = AlphaBN(bn, alpha=0.25)
    x = torch.randn(5, 3, 4, 4) * 3 + 2
    var, mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=False)
    m, v = 0.75 * 1.0 + 0.25 * mean, 0.75 * 4.0 + 0.25 * var
    torch.testing.assert_close(layer(x), (x - m.view(1, -1, 1, 1)) / torch.sqrt(v.view(1, -1, 1, 1) + bn.eps))
    assert set(layer.state_dict()) == {"running_mean", "running_var", "weight", "bias"}


class NormNet(nn.Module):
    """No BatchNorm: GroupNorm after the conv, LayerNorm before the head; embed + head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 14 * 14, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.ln(self.fc(F.relu(self.gn(self.conv(x))).flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def test_alpha_bn_refuses_a_model_without_batch_norm():
    with pytest.raises(ValueError, match="bn_alpha mixes BatchNorm statistics, and model NormNet has no BatchNorm"):
        build("bn_alpha", NormNet())


# -- MEMO ------------------------------------------------------------------------------------------
def test_memo_marginal_is_the_mean_of_the_augmented_softmaxes():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)) * 3
    entropy, log_mean = marginal_entropy(logits)
    mean = logits.softmax(1).mean(0)
    torch.testing.assert_close(log_mean.exp(), mean)
    torch.testing.assert_close(entropy, -(mean * mean.log()).sum())


def test_memo_adapts_each_test_point_on_its_own_views_and_resets_between_them():
    x = images(2)
    method = build("memo", episodic=True)
    source = snapshot(method.model)
    result = method.step(x)
    assert result.record["n_loss_samples"] == 2 and result.record["steps"] == 2
    # after the second point the model holds only that point's update: one SGD step from the source
    twin = build("memo", episodic=True)
    twin.step(x[:1])  # the first point uses the generator's first draws
    twin.reset()
    views = twin.views(x[1:])  # the second point's views, as drawn in `method`
    loss, _, _ = twin.loss(views)
    grads = torch.autograd.grad(loss, twin.params, allow_unused=True)
    moved = 0
    for p, name, g in zip(method.params, method.param_names, grads):
        # Nesterov SGD's first step from a fresh optimiser: lr x (1 + momentum) x g
        step = -5e-3 * 1.9 * g if g is not None else torch.zeros_like(p)
        torch.testing.assert_close(p.detach() - source[name], step, rtol=1e-3, atol=1e-7)  # float32 rounding of p
        moved += int((step != 0).sum())
    assert moved > 0
    assert result.logits.shape == (2, 10)


def test_memo_runs_at_batch_size_one_and_needs_the_augment_hook():
    method = build("memo")
    assert method.step(images(1)).logits.shape == (1, 10)

    class NoAugment(ImageClassifierAdapter):
        def has_hook(self, name: str) -> bool:
            return name != "augment" and super().has_hook(name)

    with pytest.raises(MissingHookError, match=r"method 'memo' needs hook\(s\) \['augment'\]"):
        build_method(NoAugment(small_cnn()), TTTConfig(method="memo"))


# -- RPL -------------------------------------------------------------------------------------------
def test_rpl_loss_is_the_generalised_cross_entropy_of_the_argmax():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.3, 0.2]])
    p = logits.softmax(1)
    expected = torch.stack([(1 - p[0, 0] ** 0.8) / 0.8, (1 - p[1, 1] ** 0.8) / 0.8])
    torch.testing.assert_close(generalized_cross_entropy(logits, 0.8), expected)
    # q -> 0 is the cross-entropy
    torch.testing.assert_close(generalized_cross_entropy(logits.double(), 1e-6), -p.double().max(1).values.log(),
                               rtol=1e-4, atol=1e-5)
    method = build("rpl")
    loss, out, _ = method.loss(images(8))
    torch.testing.assert_close(loss, generalized_cross_entropy(out, 0.8).mean())


# -- CMF -------------------------------------------------------------------------------------------
def test_cmf_filters_the_parameters_like_a_kalman_filter():
    cfg = {"optimizer": "sgd", "momentum": 0.0, "lr": 0.5, "cmf": {"flips": False, "q": 20.0, "alpha": 0.9, "gamma": 0.8}}
    x = images(8)
    method, twin = build("cmf", **cfg), build("cmf", **cfg)
    source = [p.detach().clone() for p in method.params]
    n = sum(p.numel() for p in method.params)
    q = 20.0 * n / 38400
    result = method.step(x)

    loss, _, _ = twin.loss(x)
    grads = torch.autograd.grad(loss, twin.params, allow_unused=True)
    beta = (1 - q) / (q + 1 - q)  # v = alpha^2 * 0 + q
    beta = max(beta, 0.89)
    assert result.record["kalman_beta"] == pytest.approx(beta)
    assert method.hidden_var == pytest.approx(beta * q)
    for p, h, src, g in zip(method.params, method.hidden, source, grads):
        stepped = src - 0.5 * (g if g is not None else torch.zeros_like(src))
        hidden = beta * src + (1 - beta) * stepped  # predict step keeps h = source (h0 = theta0)
        torch.testing.assert_close(h, hidden)
        torch.testing.assert_close(p.detach(), 0.8 * stepped + 0.2 * hidden)
    method.reset()
    assert method.hidden_var == 0.0 and all(torch.equal(h, s) for h, s in zip(method.hidden, source))


def test_cmf_gain_is_clipped_and_saturates():
    method = build("cmf")
    method.hidden_var = 10.0
    assert method.kalman_gain(0.01) == 0.89
    method.hidden_var = 1e-6
    assert method.kalman_gain(1e-6) == 1.0


# -- T3A -------------------------------------------------------------------------------------------
class LinearFeatures(nn.Module):
    """embed(x) = x (2-d features), head a fixed 3-class linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
            self.head.bias.zero_()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_t3a_keeps_the_lowest_entropy_supports_per_class_and_changes_no_parameter():
    model = LinearFeatures()
    method = build("t3a", model, t3a={"filter_k": 2})
    before = snapshot(model)
    z = torch.tensor([[3.0, 0.0], [0.5, 0.1], [1.0, 0.2], [0.0, 4.0], [0.1, 0.4], [-2.0, -2.5]])
    result = method.step(z)
    assert same_state(model, before) and result.record["updated_param_count"] == 0

    warm = model.head.weight.detach()
    all_z = torch.cat([warm, z])
    logits = model.head(all_z).detach()
    entropy, labels = softmax_entropy(logits), logits.argmax(1)
    expected = []
    for c in range(3):
        idx = (labels == c).nonzero().flatten()
        expected += idx[entropy[idx].argsort()][:2].tolist()
    assert select_supports(entropy, labels, 3, 2).tolist() == expected
    torch.testing.assert_close(method.supports, all_z[expected])
    assert result.record["support_size"] == len(expected) <= 6
    # the class weights: normalised sums of the normalised supports; logits z . w (no bias)
    w = torch.stack([F.normalize(F.normalize(all_z[[i for i in expected if labels[i] == c]], dim=1).sum(0), dim=0)
                     for c in range(3)], 1)
    torch.testing.assert_close(result.logits, z @ w)
    method.reset()
    torch.testing.assert_close(method.supports, warm)


def test_t3a_needs_embed_and_classifier():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 10, 28)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).flatten(1)

    with pytest.raises(MissingHookError, match=r"method 't3a' needs hook\(s\) \['embed', 'classifier'\]"):
        build("t3a", Plain())


# -- SHOT-IM ---------------------------------------------------------------------------------------
def test_shot_im_maximises_information_with_the_classifier_frozen():
    method = build("shot_im", lr=0.05)
    head_before = {n: p.detach().clone() for n, p in method.model.head.named_parameters()}
    x = images(16)
    loss, logits, parts = method.loss(x)
    p = logits.softmax(1)
    mean = p.mean(0)
    torch.testing.assert_close(loss, softmax_entropy(logits).mean() + (mean * torch.log(mean + 1e-5)).sum())
    assert method.batch_stats["marginal_entropy"] == pytest.approx(float(-(mean * torch.log(mean + 1e-5)).sum().detach()))
    before = snapshot(method.model)
    method.step(x)
    assert all(torch.equal(p, head_before[n]) for n, p in method.model.head.named_parameters())
    assert not torch.equal(method.model.features[0].weight, before["features.0.weight"])
    assert all(id(p) not in {id(h) for h in method.model.head.parameters()} for p in method.params)


# -- RMT -------------------------------------------------------------------------------------------
def test_rmt_teacher_is_the_ema_of_the_student_and_the_prediction_their_sum(source_npz):
    method = build("rmt", source=source_npz)
    x = images(8)
    teacher_before = [p.detach().clone() for p in method.teacher.parameters()]
    with torch.no_grad():
        teacher_logits = method.teacher(x)
        student_logits = method.model(x)
    result = method.step(x)
    m = method.cfg.rmt.ema_momentum
    for t, t0, s in zip(method.teacher.parameters(), teacher_before, method.model.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s.detach())
    torch.testing.assert_close(result.logits, student_logits + teacher_logits)
    rec = result.record
    assert rec["loss_contrastive"] > 0 and rec["loss_source"] > 0 and 0 <= rec["teacher_agreement"] <= 1


def test_rmt_warms_up_then_reset_returns_to_the_warmed_up_state(source_npz):
    method = build("rmt", source=source_npz)
    fresh = small_cnn()
    assert not same_state(method.model, snapshot(fresh))  # 40 // 8 = 5 warm-up steps moved it
    assert method.source_batches == 5 and method.optimizer.param_groups[0]["lr"] == method.cfg.lr
    warmed, teacher = snapshot(method.model), snapshot(method.teacher)
    method.step(images(8))
    method.reset()
    assert same_state(method.model, warmed) and same_state(method.teacher, teacher) and method.source_batches == 5
    no_warmup = build("rmt", source=source_npz, rmt={"source_data": source_npz, "warmup_samples": 0})
    assert same_state(no_warmup.model, {k: v for k, v in snapshot(fresh).items() if k in snapshot(no_warmup.model)})


def test_supcon_positives_are_the_other_views_of_the_same_sample():
    # two samples, three identical views each, orthogonal between samples: the loss is the minimum
    feats = torch.tensor([[[1.0, 0.0]] * 3, [[0.0, 1.0]] * 3])
    loss = supcon_loss(feats, nn.Identity(), temperature=0.1)
    # each anchor: 2 positives at similarity 1, 3 negatives at 0
    expected = -math.log(math.exp(10) / (2 * math.exp(10) + 3 * math.exp(0)))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_rmt_and_santa_refuse_without_source_data(source_npz, tmp_path):
    for name in ("rmt", "santa"):
        with pytest.raises(ValueError, match=f"ttt.{name}.source_data is not set"):
            build(name)
    with pytest.raises(FileNotFoundError, match="ttt.rmt.source_data"):
        build("rmt", source=str(tmp_path / "missing.npz"))
    only_x = tmp_path / "x.npz"
    np.savez(only_x, x=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"lacks array\(s\) \['y'\]"):
        build("santa", source=str(only_x))


# -- SANTA -----------------------------------------------------------------------------------------
def test_santa_keeps_its_anchor_and_trains_only_norm_layers_and_the_projector(source_npz):
    method = build("santa", source=source_npz, lr=0.01)
    anchor, model = snapshot(method.anchor), snapshot(method.model)
    projector = snapshot(method.projector)
    x = images(8)
    loss, logits, _ = method.loss(x)
    result = method.step(x)
    torch.testing.assert_close(result.logits, logits.detach())  # same forward
    assert same_state(method.anchor, anchor)
    changed = {k for k, v in snapshot(method.model).items() if not torch.equal(v, model[k])}
    assert changed and all(k.split(".")[-1] in ("weight", "bias") and
                           isinstance(method.model.get_submodule(k.rsplit(".", 1)[0]), nn.BatchNorm2d) for k in changed)
    assert not same_state(method.projector, projector)


# -- AdaContrast -----------------------------------------------------------------------------------
def test_adacontrast_refines_pseudo_labels_by_nearest_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    probs = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1], [0.7, 0.3]])
    labels, mean = knn_pseudo_labels(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), bank, probs, 2, "cosine")
    torch.testing.assert_close(mean, torch.tensor([[0.3, 0.7], [0.8, 0.2]]))
    assert labels.tolist() == [1, 0]


def test_adacontrast_key_encoder_queue_and_bank():
    method = build("adacontrast")
    key_before = [p.detach().clone() for p in method.key_model.parameters()]
    student_before = [p.detach().clone() for p in method.model.parameters()]
    queue_before = method.queue.clone()
    result = method.step(images(8))
    m = method.cfg.adacontrast.momentum
    for k, k0, s0 in zip(method.key_model.parameters(), key_before, student_before):
        torch.testing.assert_close(k, m * k0 + (1 - m) * s0)  # EMA of the student before its step
    assert method.queue_ptr == 8 and not torch.equal(method.queue[:, :8], queue_before[:, :8])
    assert torch.equal(method.queue[:, 8:], queue_before[:, 8:])
    torch.testing.assert_close(method.queue[:, :8].norm(dim=0), torch.ones(8))
    assert result.record["memory_size"] == 8 and result.record["n_refined"] == 0  # before refine_after
    method.step(images(8, seed=1))
    assert method.step(images(8, seed=2)).record["memory_size"] == 24  # the third batch is refined
    assert method.n_seen == 16


# -- TTT -------------------------------------------------------------------------------------------
def test_ttt_loss_is_the_four_way_rotation_cross_entropy_on_the_trunk():
    model = small_cnn(rotation=True)
    method = build("ttt", copy.deepcopy(model), lr=0.01)
    x = images(4)
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()  # the reference's ssh.train()
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4).repeat_interleave(4)
    expected = F.cross_entropy(reference.rotation_logits(rotated), labels)
    loss, _, parts = method.loss(x)
    torch.testing.assert_close(loss, expected)
    assert parts["rotation"] == pytest.approx(float(expected.detach()))

    before = snapshot(method.model)
    result = method.step(x)
    after = snapshot(method.model)
    moved = {k.split(".")[0] for k in after if k.endswith("weight") and not torch.equal(after[k], before[k])}
    assert moved == {"features", "rotation_head"}  # the classifier's own layers get no gradient
    with torch.no_grad():
        torch.testing.assert_close(result.logits, method.model(x))  # predicted after the update, eval mode
    assert 0.0 <= result.record["rotation_accuracy"] <= 1.0


def test_ttt_is_refused_without_the_rotation_hook_in_one_line(small_default, tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.job.runner import run_job

    with pytest.raises(MissingHookError, match=r"method 'ttt' needs hook\(s\) \['rotation_logits'\]"):
        build("ttt", small_cnn())
    cfg = load_config(ROOT / "configs" / "mnistc_ttt.yaml", [
        f"data.manifest={small_default['manifest']}", f"model.checkpoint={small_default['checkpoint']}",
        "model.factory=pipeline.embedded.model:small_cnn", f"output_root={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError) as err:
        run_job(cfg)
    assert "\n" not in str(err.value) and "ttt.method=ttt needs hook(s) ['rotation_logits']" in str(err.value)


# -- every new method: determinism, checkpoints, analysis columns ----------------------------------
@pytest.mark.parametrize("name", NEW)
def test_same_seed_same_predictions(name, source_npz):
    x = [images(8, seed=s) for s in range(2)]
    runs = []
    for _ in range(2):
        method = build(name, source=source_npz, seed=5)
        runs.append([method.step(b).logits for b in x])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.fixture(scope="module")
def rows(small_default):
    return pq.read_table(small_default["manifest"]).slice(0, 24).to_pylist()


@pytest.mark.parametrize("name", NEW)
def test_resume_from_a_checkpoint_equals_the_uninterrupted_stream(name, rows, source_npz):
    def stream(start=None):
        method = build(name, source=source_npz, seed=3)
        torch.manual_seed(0)
        return list(stream_chunks(method.adapter, method, rows[start.offset if start else 0:], run_id="r", shard=0,
                                  worker="w", start=start, checkpoint_every=1))

    def comparable(chunks):
        return ([r for c in chunks for r in c["results"]],
                [{k: v for k, v in a.items() if not measured(k)} for c in chunks for a in c["analysis"]])

    whole = stream()
    assert len(whole) == 4
    resumed = stream(whole[0]["state"])
    assert comparable(resumed) == comparable(whole[1:])
    state = capture(build(name, source=source_npz))
    assert "source_x" not in state["attrs"] and "features" not in state["attrs"]


def test_every_new_method_writes_its_analysis_fields(rows, source_npz):
    from ttt.schema import ANALYSIS_SCHEMA, to_table

    expected = {"rmt": ["loss_contrastive", "loss_source", "teacher_agreement"],
                "santa": ["loss_contrastive", "teacher_agreement"],
                "adacontrast": ["loss_contrastive", "n_refined", "memory_size", "teacher_agreement"],
                "cmf": ["kalman_beta", "n_loss_samples"], "memo": ["marginal_entropy", "n_loss_samples"],
                "rpl": ["n_loss_samples"], "t3a": ["support_size", "n_changed"], "shot_im": ["marginal_entropy"],
                "ttt": ["rotation_accuracy", "n_loss_samples"], "bn_alpha": ["class_entropy"]}
    assert set(expected) == set(NEW)
    for name, columns in expected.items():
        method = build(name, source=source_npz)
        out = run_stream(method.adapter, method, rows, run_id="t", shard=0, worker="w")
        table = to_table(out["analysis"], ANALYSIS_SCHEMA).to_pandas()
        assert len(out["results"]) == 24 and len(table) == 3 and all(r["error"] is None for r in out["results"])
        for column in columns:
            assert table[column].notna().all(), (name, column)


# -- real jobs through the pipeline ----------------------------------------------------------------
@pytest.fixture(scope="module")
def rotation_checkpoint(tmp_path_factory):
    from pipeline.embedded.mnistc import split_digits

    split = split_digits(0)
    state = train_source_model(split["x_train"][:600], split["y_train"][:600], seed=0, epochs=1, rotation=True)
    path = tmp_path_factory.mktemp("rot") / "cnn_rotation.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("name", ["rmt", "t3a", "ttt"])
def test_new_methods_run_as_jobs(name, ray_session, small_default, rotation_checkpoint, tmp_path):
    from pipeline.config import load_config
    from pipeline.job.runner import run_job

    overrides = [f"data.manifest={small_default['manifest']}", f"output_root={tmp_path / 'runs'}",
                 "ttt.batch_size=50", "workers.num_shards=1", "workers.num_cpus=0.25",
                 f"model.checkpoint={rotation_checkpoint if name == 'ttt' else small_default['checkpoint']}"]
    if name == "rmt":  # the clean split the MNIST-C build writes beside its manifest
        overrides += [f"ttt.rmt.source_data={Path(small_default['manifest']).parent / 'train.npz'}",
                      "ttt.rmt.warmup_samples=100"]
    run_dir = run_job(load_config(ROOT / "configs" / f"mnistc_{name}.yaml", overrides))
    results, analysis = pd.read_parquet(run_dir / "results"), pd.read_parquet(run_dir / "analysis")
    assert len(results) == 150 and results["error"].isna().all() and (results["method"] == name).all()
    assert len(analysis) == 3
    column = {"rmt": "loss_source", "t3a": "support_size", "ttt": "rotation_accuracy"}[name]
    assert analysis[column].notna().all()
    if name == "ttt":
        assert (analysis["updated_param_count"] > 0).all()
