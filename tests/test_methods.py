"""Update rules, guards, resets and determinism of the TTT methods on the real SmallCNN with
synthetic batches (no Ray, no data set)."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.embedded.model import SmallCNN
from ttt import TTTConfig, build_method
from ttt.augment import cotta_augment, patch_mask, random_affine
from ttt.losses import masked_mse
from ttt.methods import MissingHookError
from ttt.methods.base import seeded_generator
from ttt.methods.parts import augmented_view
from ttt.methods.tent import Tent
from ttt.params import UpdateFilterError, snapshot, use_batch_norm_stats
from workers.adapters import ImageClassifierAdapter

torch.set_num_threads(1)

FEATURE_BN = ("features.1.", "features.4.", "features.7.")  # the BatchNorms on the classifier's path
DECODER_BN = ("decoder.1.", "decoder.4.")


def make_model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(width=16)


def batch(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def method_for(name: str, model: torch.nn.Module | None = None, **cfg):
    model = model if model is not None else make_model()
    return build_method(ImageClassifierAdapter(model), TTTConfig(method=name, **cfg))


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def numel(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


# -- source / norm ---------------------------------------------------------------------
def test_source_equals_plain_eval_forward():
    model = make_model()
    reference = copy.deepcopy(model).eval()
    x = batch()
    result = method_for("source", model).step(x)
    with torch.no_grad():
        assert torch.equal(result.logits, reference(x))
    assert result.record["stop_reason"] == "no_adaptation" and result.record["updated_param_count"] == 0


def test_norm_uses_test_batch_statistics():
    model = make_model()
    batch_stats, running_stats = copy.deepcopy(model), copy.deepcopy(model).eval()
    use_batch_norm_stats(batch_stats)
    x = batch()
    method = method_for("norm", model)
    first, second = method.step(x).logits, method.step(x).logits
    with torch.no_grad():
        torch.testing.assert_close(first, batch_stats(x), rtol=0, atol=1e-6)
        assert not torch.allclose(first, running_stats(x), atol=1e-3)
    assert torch.equal(first, second)  # no state carried between batches


# -- tent and update filters -------------------------------------------------------------
def test_tent_changes_only_the_norm_affine_parameters_on_the_loss_path():
    method = method_for("tent", lr=1e-2)
    before = params_of(method.model)
    record = method.step(batch()).record
    after = params_of(method.model)
    for name in before:
        if name.startswith(FEATURE_BN):
            assert not torch.equal(before[name], after[name]), name
        else:  # convs, linears and the decoder's BatchNorms (no gradient from the entropy)
            assert torch.equal(before[name], after[name]), name
    assert record["steps"] == 1 and record["stop_reason"] == "steps_done"
    assert record["updated_param_count"] == numel(method.model, FEATURE_BN)
    assert record["loss_entropy"] == pytest.approx(record["losses"][0])


def test_update_filter_all_counts_only_parameters_that_get_gradients():
    method = method_for("tent", update_filter="all", lr=1e-3)
    record = method.step(batch()).record
    total = sum(p.numel() for p in method.model.parameters())
    assert record["updated_param_count"] == total - numel(method.model, ("decoder.",))


def test_adapter_only_without_adapters_is_a_startup_error():
    with pytest.raises(UpdateFilterError) as err:
        method_for("tent", update_filter="adapter_only")
    assert "\n" not in str(err.value) and "adapter_only" in str(err.value)


def test_missing_hook_fails_at_construction_naming_adapter_method_and_hook():
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))  # no reconstruct()
    with pytest.raises(MissingHookError) as err:
        method_for("mim", plain)
    msg = str(err.value)
    assert "\n" not in msg and "'mim'" in msg and "reconstruct" in msg and "ImageClassifierAdapter" in msg

    class BareAdapter:
        def get_model(self):
            return make_model()

    with pytest.raises(MissingHookError, match="cotta.*augment.*BareAdapter"):
        build_method(BareAdapter(), TTTConfig(method="cotta"))


# -- mim -----------------------------------------------------------------------------------
def test_patch_mask_ratio_matches_probability():
    mask = patch_mask((512, 1, 28, 28), 0.3, 4, torch.Generator().manual_seed(1))
    assert mask.shape == (512, 1, 28, 28) and mask.dtype == torch.bool
    assert abs(float(mask.float().mean()) - 0.3) < 0.01
    # whole patches: every 4x4 block is all masked or all visible
    blocks = mask.float().view(512, 1, 7, 4, 7, 4).mean((3, 5))
    assert torch.all((blocks == 0) | (blocks == 1))


def test_masked_mse_ignores_visible_pixels():
    target = torch.randn(2, 1, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    recon = torch.where(mask, target, torch.full_like(target, 100.0))  # right where masked only
    assert float(masked_mse(recon, target, mask)) == 0.0
    assert float(masked_mse(recon + mask.float(), target, mask)) == pytest.approx(1.0)


def test_mim_records_realised_mask_ratio_and_predicts_from_the_clean_input():
    model = make_model()
    clean = copy.deepcopy(model)
    use_batch_norm_stats(clean)
    x = batch(64)
    method = method_for("mim", model, lr=1e-2, mim={"mask_prob": 0.3, "patch_size": 4})
    result = method.step(x)
    assert abs(result.record["mask_ratio"] - 0.3) < 0.05
    with torch.no_grad():  # same_forward: the classifier's output on the unmasked batch, before the update
        torch.testing.assert_close(result.logits, clean(x), rtol=0, atol=1e-6)
    after = params_of(method.model)
    before = params_of(clean)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if n.startswith(FEATURE_BN + DECODER_BN)}
    assert result.record["updated_param_count"] == numel(model, FEATURE_BN + DECODER_BN)


# -- cotta ---------------------------------------------------------------------------------
COTTA = {"update_filter": "all", "lr": 1e-2}


def test_cotta_teacher_is_the_ema_of_the_student():
    method = method_for("cotta", **COTTA, cotta={"ema_alpha": 0.9, "restore_prob": 0.0, "anchor_threshold": 0.0})
    teacher_before = params_of(method.teacher)
    method.step(batch())
    student, teacher = params_of(method.model), params_of(method.teacher)
    moved = 0
    for name in teacher:
        expected = 0.9 * teacher_before[name] + 0.1 * student[name]
        torch.testing.assert_close(teacher[name], expected, rtol=1e-6, atol=1e-7)
        moved += not torch.equal(teacher[name], teacher_before[name])
    assert moved > 0
    for name in teacher:  # untouched parameters stay bit-identical, not merely close
        if name.startswith("decoder."):
            assert torch.equal(teacher[name], teacher_before[name])


def test_cotta_restore_with_probability_one_gives_back_the_source_weights():
    method = method_for("cotta", **COTTA, cotta={"restore_prob": 1.0, "ema_alpha": 0.5, "anchor_threshold": 0.0})
    source = params_of(method.model)
    method.step(batch())
    assert_state_equal(params_of(method.model), source)
    assert any(not torch.equal(p, source[n]) for n, p in params_of(method.teacher).items())  # teacher saw the update


def test_cotta_predicts_the_teacher_and_averages_augmented_views_when_the_anchor_is_unsure():
    x = batch()
    confident = method_for("cotta", **COTTA, cotta={"anchor_threshold": 0.0, "ema_alpha": 0.5})
    teacher = copy.deepcopy(confident.teacher)
    with torch.no_grad():
        assert torch.equal(confident.step(x).logits, teacher(x))

    unsure = method_for("cotta", **COTTA, seed=3, cotta={"anchor_threshold": 1.0, "n_augmentations": 3})
    teacher, adapter = copy.deepcopy(unsure.teacher), unsure.adapter
    gen = seeded_generator(3, "cotta.augment")
    with torch.no_grad():
        expected = torch.stack([teacher(augmented_view(adapter, x, gen, flips=True)) for _ in range(3)]).mean(0)
    assert torch.equal(unsure.step(x).logits, expected)


def test_cotta_is_deterministic_given_the_seed():
    x1, x2 = batch(seed=1), batch(seed=2)
    cfg = dict(**COTTA, cotta={"anchor_threshold": 1.0, "n_augmentations": 2, "restore_prob": 0.1})

    def run(seed: int) -> list[torch.Tensor]:
        method = method_for("cotta", make_model(), seed=seed, **cfg)
        return [method.step(x1).logits, method.step(x2).logits, *params_of(method.model).values()]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_episodic_reset_restores_the_source_state_exactly():
    x = batch()
    for name, cfg in [("tent", {"lr": 1e-2}),
                      ("cotta", {**COTTA, "cotta": {"anchor_threshold": 1.0, "n_augmentations": 2, "restore_prob": 0.1}}),
                      ("mim", {"lr": 1e-2})]:
        method = method_for(name, **cfg)
        source = snapshot(method.model)
        first = method.step(x).logits
        method.step(batch(seed=5))
        assert method.step(x).logits is not None
        method.reset()
        assert_state_equal(snapshot(method.model), source)
        assert method.optimizer.state_dict()["state"] == {}
        if name == "cotta":
            assert_state_equal(snapshot(method.teacher), source)
        assert torch.equal(method.step(x).logits, first), name  # random streams restart too


# -- guards --------------------------------------------------------------------------------
class NaNLossTent(Tent):
    def loss(self, inputs):
        loss, logits, parts = super().loss(inputs)
        return loss * float("nan"), logits, parts


class NaNGradTent(Tent):
    def loss(self, inputs):
        loss, logits, parts = super().loss(inputs)
        zero = (logits - logits.detach()).pow(2).sum()  # value 0, d sqrt(0) = inf, times 0 = nan
        return loss + zero.sqrt(), logits, parts


class RunningStatsTent(Tent):
    """Tent that keeps BatchNorm running statistics moving, so a rollback has buffers to undo."""

    def configure(self):
        super(Tent, self).configure()
        for m in self.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()


class RisingLossTent(Tent):
    def loss(self, inputs):
        loss, logits, parts = super().loss(inputs)
        self.calls = getattr(self, "calls", 0) + 1
        return loss + self.calls, logits, parts


def guarded(cls, model=None, **cfg):
    model = model if model is not None else make_model()
    return cls(ImageClassifierAdapter(model), TTTConfig(method="tent", **cfg))


@pytest.mark.parametrize("cls, inputs, reason", [
    (Tent, "nan_pixel", "nonfinite_loss"),
    (NaNLossTent, "clean", "nonfinite_loss"),
    (NaNGradTent, "clean", "nonfinite_grad"),
])
def test_nonfinite_loss_or_gradient_leaves_parameters_unchanged(cls, inputs, reason):
    x = batch()
    if inputs == "nan_pixel":
        x[0, 0, 3, 3] = float("nan")
    method = guarded(cls, lr=1e-2)
    before = snapshot(method.model)
    record = method.step(x).record
    assert record["stop_reason"] == reason and record["steps"] == 0 and record["updated_param_count"] == 0
    assert_state_equal(snapshot(method.model), before)
    assert method.optimizer.state_dict()["state"] == {}


def test_update_norm_caps_roll_back_parameters_buffers_and_optimizer_state():
    for cap, reason in [("max_update_norm", "update_norm_cap"),
                        ("max_cumulative_update_norm", "cumulative_update_cap")]:
        method = guarded(RunningStatsTent, lr=1e-2)
        method.step(batch(seed=1))  # an accepted step: Adam has moments, running stats have moved
        before, optim_before = snapshot(method.model), copy.deepcopy(method.optimizer.state_dict())
        assert any("running_mean" in k for k in before)
        setattr(method.cfg.guards, cap, 1e-9)
        record = method.step(batch(seed=2)).record
        assert record["stop_reason"] == reason and record["steps"] == 0
        assert_state_equal(snapshot(method.model), before)
        optim_after = method.optimizer.state_dict()
        for i, state in optim_before["state"].items():
            for key, value in state.items():
                assert torch.equal(optim_after["state"][i][key], value), (reason, key)


def test_early_stop_on_a_collapsing_batch():
    model = make_model()
    with torch.no_grad():
        model.head.bias[3] = 50.0  # every sample predicts class 3
    method = method_for("tent", model, lr=1e-2, guards={"early_stop_entropy": 0.3})
    before = snapshot(method.model)
    record = method.step(batch()).record
    assert record["stop_reason"] == "low_class_entropy" and record["steps"] == 0
    assert record["class_entropy"] < 0.3 and record["unique_classes"] == 1
    assert_state_equal(snapshot(method.model), before)


def test_loss_ratio_stop_rolls_back_the_rising_step():
    method = guarded(RisingLossTent, lr=1e-3, steps=4, guards={"loss_ratio_stop": 1.05})
    record = method.step(batch()).record
    assert record["stop_reason"] == "loss_ratio" and record["steps"] == 1 and len(record["losses"]) == 2


def test_persistent_collapse_resets_to_source():
    method = method_for("tent", lr=1e-2, guards={"early_stop_entropy": 0.3, "collapse_patience": 2})
    source = snapshot(method.model)
    reference = copy.deepcopy(method.model)
    with torch.no_grad():
        method.model.head.bias[3] = 50.0  # drifted into predicting one class
    x = batch()
    assert method.step(x).record["stop_reason"] == "low_class_entropy"
    result = method.step(x)
    assert result.record["stop_reason"] == "collapse_reset"
    assert_state_equal(snapshot(method.model), source)
    with torch.no_grad():  # the collapsed batch is predicted by the source model
        assert torch.equal(result.logits, reference(x))
    assert result.record["class_entropy"] > 0.3


def test_collapse_patience_needs_a_threshold():
    with pytest.raises(ValueError, match="early_stop_entropy"):
        TTTConfig(method="tent", guards={"collapse_patience": 2})


def test_adaptive_diversity_weight_grows_as_diversity_falls():
    guards = {"diversity_weight": 0.5, "diversity_target": 0.7, "diversity_gain": 2.0, "diversity_cap": 1.5}
    method = method_for("tent", guards=guards)
    weights = [method.diversity_weight(h) for h in (0.9, 0.7, 0.5, 0.3, 0.0)]
    assert weights == pytest.approx([0.5, 0.5, 0.9, 1.3, 1.5])

    balanced = method.step(batch()).record
    model = make_model()
    with torch.no_grad():
        model.head.bias[3] = 3.0  # most, not all, samples predict class 3
    skewed = method_for("tent", model, guards=guards).step(batch()).record
    assert skewed["class_entropy"] < balanced["class_entropy"]
    assert skewed["diversity_weight"] > balanced["diversity_weight"] >= 0.5
    assert skewed["loss_diversity"] > balanced["loss_diversity"]


def test_gradient_clipping_bounds_the_update():
    method = method_for("tent", optimizer="sgd", momentum=0.0, lr=1.0, guards={"grad_clip": 1e-4})
    before = [p.detach().clone() for p in method.params]
    record = method.step(batch()).record
    change = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(method.params, before)))
    assert record["grad_norm"] > 1e-4 and float(change) <= 1e-4 * 1.001


def test_prediction_after_update_uses_one_more_forward():
    model = make_model()
    method = method_for("tent", model, lr=1e-2, predict_from="after_update")
    x = batch()
    logits = method.step(x).logits
    with torch.no_grad():
        assert torch.equal(logits, method.model(x))
        assert not torch.equal(logits, method_for("tent", make_model(), lr=1e-2).step(x).logits)


# -- augmentations -------------------------------------------------------------------------
def test_augmentations_are_seeded_real_and_keep_the_range():
    x = torch.rand(6, 1, 28, 28)
    a = cotta_augment(x, torch.Generator().manual_seed(0))
    b = cotta_augment(x, torch.Generator().manual_seed(0))
    c = cotta_augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0 and not torch.allclose(a, x, atol=1e-2)
    identity = random_affine(x, torch.Generator(), degrees=0.0, translate=0.0, scale=(1.0, 1.0))
    torch.testing.assert_close(identity, x, rtol=0, atol=1e-5)
    # a digit-like blob stays mostly in place: a small affine, not a flip
    img = torch.zeros(1, 1, 28, 28)
    img[:, :, 8:20, 6:12] = 1.0
    moved = random_affine(img, torch.Generator().manual_seed(0))
    assert float((moved * img).sum() / img.sum()) > 0.5
    assert float(moved[..., 14:].sum()) < 0.1 * float(img.sum())
