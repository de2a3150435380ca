"""Folding BN in PyTorch models: every pattern that folds, every refusal with its reason, every format.

Each fold is checked against the original model's outputs on a fresh input, and the folded model must
run no BN op of a folded layer (`assert_folds`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.errors import UsageError
from bnfold.layers import FoldDirection, FoldStatus
from bnfold.model import LoadOptions
from tests.conftest import SAMPLES
from tests.torch_builders import (BNAct, FrozenBN, FunctionalNorm, Wrap, assert_folds, bn_calls, fold, outputs,
                                  randomized, runnable)

# ---- Conv / ConvTranspose / Linear -> BN ------------------------------------------------------------------


@pytest.mark.parametrize("dims, groups, stride, dilation, padding, mode, bias, affine", [
    (1, 1, 1, 1, 0, "zeros", True, True),
    (1, 4, 2, 2, 2, "circular", False, True),
    (2, 1, 1, 1, 1, "zeros", False, True),
    (2, 8, 1, 1, 1, "reflect", True, False),  # depthwise, non-affine BN
    (2, 2, 2, 3, 3, "replicate", False, True),
    (3, 2, 1, 1, 1, "zeros", True, True),
])
def test_conv_bn_folds(dims, groups, stride, dilation, padding, mode, bias, affine):
    conv = getattr(nn, f"Conv{dims}d")(8, 8, 3, stride, padding, dilation, groups, bias, padding_mode=mode)
    bn = getattr(nn, f"BatchNorm{dims}d")(8, affine=affine)
    report = assert_folds(randomized(nn.Sequential(conv, bn)), (2, 8, *[7] * dims), {"1"})
    decision = report.decisions[0]
    assert decision.targets == ["0"] and decision.direction is FoldDirection.INTO_PRODUCER
    assert decision.producer_bias == ("Conv%dd 0" % dims if bias else None)


@pytest.mark.parametrize("dims, groups, bias", [(1, 2, False), (2, 4, True), (3, 2, True)])
def test_conv_transpose_bn_folds_per_group(dims, groups, bias):
    """Weights are (C_in, C_out/groups, ...): each group's slice of axis 1 gets its own scale (CASES E7)."""
    up = getattr(nn, f"ConvTranspose{dims}d")(8, 12, 3, 2, 1, output_padding=1, groups=groups, bias=bias)
    bn = getattr(nn, f"BatchNorm{dims}d")(12)
    assert_folds(randomized(nn.Sequential(up, bn)), (2, 8, *[4] * dims), {"1"})


def test_linear_bn1d_folds():
    assert_folds(randomized(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())), (4, 6), {"1"})


class TokenLinearBN(nn.Module):
    """LeViT: Linear over tokens, BN over the flattened (B*N, C) tokens, reshaped back."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 5, bias=False)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_linear_flatten_bn_folds_when_the_axis_is_provably_the_features():
    report = assert_folds(randomized(TokenLinearBN()), (2, 3, 6), {"bn"})
    assert report.decisions[0].targets == ["linear"]


def test_linear_then_bn1d_over_ncl_is_never_folded():
    """BN1d(C) on (N, C, L) normalizes axis 1, the Linear's features are the last axis, even when C == L
    (CASES E8)."""
    model = randomized(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)))
    assert_folds(model, (2, 5, 5), set(), {"1": "axis 1"})


class UnbatchedConvBN(nn.Module):
    """F.batch_norm after a conv: on an unbatched (C, L) input it normalizes L, not the conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(5, 5, 1)
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.5)

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, training=False)


@pytest.mark.parametrize("shape, folds", [((2, 5, 5), True), ((5, 5), False)])
def test_conv_channels_of_unbatched_inputs_are_axis_0(shape, folds):
    assert_folds(UnbatchedConvBN().eval(), shape, {"mean"} if folds else set(), {} if folds else {"mean": "axis 0"})


# ---- concatenation, fold forward --------------------------------------------------------------------------


class ConcatBN(nn.Module):
    def __init__(self, pool_branch: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 3, 3, 1, 1, bias=False)
        self.b = nn.Conv2d(4, 5, 1, bias=True)
        self.c = nn.MaxPool2d(3, 1, 1) if pool_branch else nn.ConvTranspose2d(4, 2, 3, 1, 1, groups=2)
        self.bn = nn.BatchNorm2d(3 + 5 + (4 if pool_branch else 2))

    def forward(self, x):
        return F.relu(self.bn(torch.cat([self.a(x), self.b(x), self.c(x)], 1)))


def test_concat_of_convs_splits_the_bn():
    report = assert_folds(randomized(ConcatBN()), (2, 4, 6, 6), {"bn"})
    assert report.decisions[0].direction is FoldDirection.SPLIT
    assert report.decisions[0].targets == ["a", "b", "c"]


def test_concat_with_a_pooling_branch_is_kept():
    assert_folds(randomized(ConcatBN(pool_branch=True)), (2, 4, 6, 6), set(), {"bn": "c"})


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_bn_folds_forward_into_a_conv_padding_with_its_input(mode):
    model = randomized(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, 1, 1, padding_mode=mode, groups=2)))
    report = assert_folds(model, (2, 4, 6, 6), {"0"})
    assert report.decisions[0].direction is FoldDirection.INTO_CONSUMER


def test_bn_folds_forward_into_unpadded_conv_and_linear():
    model = randomized(Wrap(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3)))
    assert_folds(model, (2, 4, 6, 6), {"layers.0", "layers.4"})


def test_bn_before_a_zero_padded_conv_keeps_its_shift_out():
    model = randomized(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, 1, 1)))
    report = assert_folds(model, (2, 4, 6, 6), set(), {"0": "zeros"})
    assert "shift" in report.decisions[0].reason


class PadThenConv(nn.Module):
    """BN, then an explicit F.pad, then an unpadded conv (how timm's 'same' padding is written)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bn, self.conv, self.mode = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), mode

    def forward(self, x):
        return self.conv(F.pad(self.bn(x), (1, 1, 1, 1), mode=self.mode))


@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("mode, folds", [("constant", False), ("reflect", True)])
def test_explicit_padding_before_the_conv_decides_the_forward_fold(capture, mode, folds):
    model = randomized(PadThenConv(mode))
    x = torch.randn(2, 4, 6, 6)
    source = model if capture == "symbolic" else torch.export.export(model, (x,))
    report = bnfold.fold(source, input_shape="2,4,6,6")
    assert report.verified
    assert [d.status for d in report.decisions] == [FoldStatus.FOLDED if folds else FoldStatus.KEPT]
    assert np.allclose(outputs(runnable(report.folded_model), x), outputs(model, x), rtol=1e-5, atol=1e-5)
    if not folds:
        assert "zeros" in report.decisions[0].reason


def test_bn_without_shift_folds_forward_even_into_zero_padding():
    model = randomized(nn.Sequential(nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 4, 3, 1, 1)))
    with torch.no_grad():
        model[0].running_mean.zero_()
    assert_folds(model, (2, 4, 6, 6), {"0"})


# ---- BN variants and conv subclasses ----------------------------------------------------------------------


class ConvSubclass(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 1.0


def test_bn_subclasses_look_alikes_sync_bn_and_conv_subclasses_fold_keeping_the_rest():
    model = randomized(nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), BNAct(4),  # BN + activation in one module: the activation stays
        nn.Conv2d(4, 4, 1), FrozenBN(4),
        nn.Conv2d(4, 4, 1, bias=False), nn.SyncBatchNorm(4),
        ConvSubclass(4, 4, 1), nn.BatchNorm2d(4),
    ))
    report = assert_folds(model, (2, 3, 6, 6), {"1", "3", "5", "7"})
    assert report.decisions[-1].targets == ["6"]


def test_f_batch_norm_on_oddly_named_buffers_is_found_and_folded():
    model = randomized(Wrap(nn.Conv2d(3, 4, 3), FunctionalNorm(4)))
    layers = {layer.name: layer for layer in bnfold.inspect(model).layers}
    assert layers["layers.1"].channels == 4 and layers["layers.1"].eps == pytest.approx(1e-3)
    report = bnfold.inspect(model)
    assert report.folds["layers.1"].status is FoldStatus.FOLDABLE
    assert report.folds["layers.1"].producer_bias == "Conv2d layers.0"
    assert_folds(model, (2, 3, 6, 6), {"layers.1"})


# ---- refusals ---------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, 1, 1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([self.bn(y) + y, self.head(y)], 1)


def test_conv_output_read_elsewhere_is_kept_naming_the_reader():
    assert_folds(randomized(Residual()), (2, 4, 5, 5), set(), {"bn": "head"})


class Shared(nn.Module):
    def __init__(self, same_bn: bool, tied: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, 1, 1)
        self.other = nn.Conv2d(4, 4, 3, 1, 1)
        if tied:
            self.other.weight = self.conv.weight
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = self.bn1 if same_bn else nn.BatchNorm2d(4)
        self.tied = tied

    def forward(self, x):
        second = self.other if self.tied else self.conv
        return self.bn1(self.conv(x)) + self.bn2(second(torch.relu(x)))


def test_conv_called_twice_before_the_same_bn_folds_once():
    report = assert_folds(randomized(Shared(same_bn=True)), (2, 4, 5, 5), {"bn1"})
    assert report.decisions[0].targets == ["conv"]


def test_conv_called_twice_before_different_bns_is_kept():
    assert_folds(randomized(Shared(same_bn=False)), (2, 4, 5, 5), set(), {"bn1": "2 places", "bn2": "2 places"})


def test_tied_weights_before_different_bns_are_kept():
    assert_folds(randomized(Shared(same_bn=False, tied=True)), (2, 4, 5, 5), set(),
                 {"bn1": "shares its weight", "bn2": "shares its weight"})


class ComputedWeight(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight / self.weight.norm(), self.bias, padding=1)


def test_bn_in_training_mode_without_statistics_or_after_computed_weights_is_kept():
    model = randomized(Wrap(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                            nn.BatchNorm2d(4, track_running_stats=False), ComputedWeight(4, 4, 3),
                            nn.BatchNorm2d(4)))
    model.layers[1].train()
    report = fold(model, (2, 3, 5, 5), verify=False)
    reasons = {d.layer: d.reason for d in report.decisions}
    assert "training mode" in reasons["layers.1"]
    assert "no running statistics" in reasons["layers.3"]
    assert "computes its weight at run time" in reasons["layers.5"]
    assert not report.folded


def test_a_program_exported_in_training_mode_keeps_its_bn():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    report = bnfold.fold(torch.export.export(model, (torch.randn(2, 3, 5, 5),)), verify=False)
    assert [d.status for d in report.decisions] == [FoldStatus.KEPT]
    assert "training mode" in report.decisions[0].reason


@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "functional"])
def test_verifying_a_program_with_a_training_mode_bn_changes_no_statistics(tmp_path, decompose):
    """Running an exported BN in training mode updates its statistics in place (the training IR's
    `aten.batch_norm` says nothing of it in its schema): verification must change neither the caller's
    program nor the statistics the written file keeps."""
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model[3].train()
    program = torch.export.export(model, (torch.randn(2, 3, 5, 5),))
    program = program.run_decompositions() if decompose else program
    before = {name: t.clone() for name, t in program.state_dict.items()}
    torch.export.save(program, tmp_path / "in.pt2")
    for source in (program, tmp_path / "in.pt2"):
        report = bnfold.fold(source, tmp_path / "out.pt2", force=True)
        assert report.verified and [d.status for d in report.decisions] == [FoldStatus.FOLDED, FoldStatus.KEPT]
        for written in (report.folded_model.program, torch.export.load(str(tmp_path / "out.pt2"))):
            kept = {name: t for name, t in written.state_dict.items() if name.startswith("3.")}
            assert len(kept) == 5 and all(torch.equal(t, before[name]) for name, t in kept.items())
    assert all(torch.equal(t, before[name]) for name, t in program.state_dict.items())


def test_the_callers_module_is_not_changed():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_folds(model, (1, 3, 5, 5), {"1"})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d)


def test_captures_share_tensors_only_with_models_bnfold_loaded(tmp_path):
    """A module bnfold loaded from a file is traced without copying its weights (memory, issue #9); a
    caller's module is traced on a copy, so nothing bnfold builds aliases it."""
    from bnfold.formats import as_model
    from bnfold.plan import FoldOptions
    from bnfold.pytorch.engine import TorchEngine

    module = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)))
    torch.save(module, tmp_path / "m.pt")
    for model, shared in ((as_model(tmp_path / "m.pt", LoadOptions(allow_pickle=True)), True),
                          (as_model(module), False)):
        capture = TorchEngine().plan(model, FoldOptions()).actions[0]
        ours = {t.data_ptr() for t in model.module.state_dict().values()}
        assert ({t.data_ptr() for t in capture.module.state_dict().values()} <= ours) is shared


def test_planning_computes_no_folded_weight_and_applying_computes_them_in_fold_order():
    """The plan holds one-element stand-ins where folded weights go (`inspect` costs no copy of the
    weights); apply computes them, here two folds into one conv (a BN from each side), and leaves the
    plan as it was: applying it again gives the same weights."""
    from bnfold.formats import as_model
    from bnfold.plan import FoldOptions
    from bnfold.pytorch.engine import TorchEngine

    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False),
                                     nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 5, 5)
    program = as_model(torch.export.export(model, (x,)))
    engine = TorchEngine()
    plan = engine.plan(program, FoldOptions(example_batch={"x": x.numpy()}))
    assert [(d.layer, d.status, d.targets) for d in plan.decisions] == [
        ("2", FoldStatus.FOLDABLE, ["3"]), ("4", FoldStatus.FOLDABLE, ["3"])]
    planned = plan.actions[0].module.state_dict()
    assert {name for name, t in planned.items() if t.untyped_storage().nbytes() == t.element_size()} == \
        {"3.weight", "3.bias"}
    first, second = (engine.apply(program, plan).program for _ in range(2))
    assert all(torch.equal(t, second.state_dict[name]) for name, t in first.state_dict.items())
    expected, actual = outputs(model, x), outputs(first.module(), x)
    assert np.abs(expected - actual).max() <= 1e-5 * np.abs(expected).max()
    assert first.state_dict["3.weight"].untyped_storage().nbytes() == 4 * 4 * 4


class Branchy(nn.Module):
    """Branches on activation values: neither torch.fx nor torch.export captures it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.bn = nn.BatchNorm2d(4)
        self.left = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.right = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.left(y) if y.mean() > 0 else self.right(y)


class SizeBranch(nn.Module):
    """Branches on the input's size (as detectors pad to a stride): torch.fx cannot trace it, export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_a_model_symbolic_tracing_cannot_capture_is_captured_with_torch_export():
    report = assert_folds(randomized(SizeBranch()), (2, 3, 5, 5), {"bn"})
    assert any("captured with torch.export instead" in note for note in report.notes), report.notes


def test_untraceable_model_folds_module_by_module():
    model = randomized(Branchy())
    report = assert_folds(model, (2, 3, 5, 5), {"bn", "left.1"}, {"right": "captures the model whole"})
    assert any("module by module" in note for note in report.notes)
    with torch.no_grad():  # both branches of the folded model still compute the original function
        for sign in (1.0, -1.0):
            x = sign * torch.rand(2, 3, 5, 5) * 10
            assert np.allclose(outputs(model, x), outputs(runnable(report.folded_model), x), rtol=1e-5, atol=1e-5)


# ---- numerics ---------------------------------------------------------------------------------------------


def _assert_closer_to_exact_than_torch(folded: nn.Module, target: str, producer: nn.Module, bn: nn.Module) -> None:
    """bnfold's folded weight and bias vs torch.nn.utils.fusion's, both against the exact float64 fold."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    fuse = fuse_linear_bn_eval if isinstance(producer, nn.Linear) else fuse_conv_bn_eval
    theirs = fuse(producer, bn)
    with torch.no_grad():
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        exact_weight = producer.weight.double() * scale.reshape(-1, *[1] * (producer.weight.dim() - 1))
        bias = producer.bias.double() if producer.bias is not None else torch.zeros_like(scale)
        exact_bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
    params = dict(folded.named_parameters())
    for name, exact in (("weight", exact_weight), ("bias", exact_bias)):
        ours, torch_fused = params[f"{target}.{name}"].detach(), getattr(theirs, name).detach()
        assert ours.dtype == producer.weight.dtype
        ours_error = (ours.double() - exact).abs()
        assert (ours_error <= (torch_fused.double() - exact).abs()).all()
        # one rounding: within half a unit in the last place of the exact value
        dtype = producer.weight.dtype
        # below the smallest normal number the spacing stops shrinking (subnormals: tiny * eps apart)
        magnitude = exact.abs().clamp_min(torch.finfo(dtype).tiny)
        half_ulp = torch.finfo(dtype).eps / 2 * torch.exp2(torch.floor(torch.log2(magnitude)))
        assert (ours_error <= half_ulp * (1 + 1e-12)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_folded_weights_are_at_least_as_close_to_exact_as_torch_fuse(dtype):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, 3, groups=2).to(dtype).eval(), nn.BatchNorm2d(16).to(dtype)
    randomized(bn, seed=3)
    with torch.no_grad():
        bn.running_var.mul_(0.01)  # large gains: where float32 arithmetic loses most
    folded = runnable(fold(nn.Sequential(conv, bn), (1, 8, 5, 5), verify=False).folded_model)
    _assert_closer_to_exact_than_torch(folded, "0", conv, bn)


@pytest.mark.parametrize("name", ["cnn", "mlp", "resnet"])
def test_sample_models_fold_closer_to_exact_than_torch_fuse(name):
    model = bnfold.load_model(SAMPLES / f"{name}_state_dict.pt",
                              LoadOptions(model_factory=f"sample_models.architectures:make_{name}")).module
    report = fold(model, (2, 1, 8, 8))
    folded = runnable(report.folded_model)
    assert report.folded
    for decision in report.folded:
        (target,) = decision.targets
        _assert_closer_to_exact_than_torch(folded, target, model.get_submodule(target),
                                           model.get_submodule(decision.layer))


def test_half_conv_with_float32_bn_gets_a_half_bias():
    """Autocast-style models (CASES E2): the folded bias takes the conv's dtype."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False).half(), nn.BatchNorm2d(4))
    randomized(model)
    report = assert_folds(model, (2, 3, 6, 6), {"1"}, rtol=2e-3, tolerance=1e-2)
    params = dict(runnable(report.folded_model).named_parameters())
    assert params["0.weight"].dtype == params["0.bias"].dtype == torch.float16


# ---- sample models and formats ----------------------------------------------------------------------------

SAMPLE_SHAPE = "2,1,8,8"
MIXED_KEPT = {"input_bn": "zeros", "bn2": "add"}


def _sample_sources(name: str):
    return [
        (SAMPLES / f"{name}.pt2", {}),
        (SAMPLES / f"{name}_pickle.pt", {"allow_pickle": True, "input_shape": SAMPLE_SHAPE}),
        (SAMPLES / f"{name}_state_dict.pt", {"model_factory": f"sample_models.architectures:make_{name}",
                                             "input_shape": SAMPLE_SHAPE}),
    ]


@pytest.mark.parametrize("name", ["cnn", "mlp", "resnet", "mixed"])
def test_sample_models_fold_in_every_format(name, tmp_path):
    data = np.load(SAMPLES / "test.npz")["x"][:16]
    expected = runnable(bnfold.load_model(SAMPLES / f"{name}.pt2"))(torch.from_numpy(data)).detach().numpy()
    for source, options in _sample_sources(name):  # the pickle stays a pickle, the others become programs
        output = tmp_path / f"{source.stem}.folded{'.pt' if 'pickle' in source.name else '.pt2'}"
        report = bnfold.fold(source, output, **options)
        assert report.passed and report.difference.max_rel <= 1e-5, (source, report.difference)
        kept = {d.layer: d.reason for d in report.kept}
        assert set(kept) == (set(MIXED_KEPT) if name == "mixed" else set()), kept
        for layer, word in (MIXED_KEPT.items() if name == "mixed" else []):
            assert word in kept[layer]
        reloaded = runnable(bnfold.load_model(output, LoadOptions(allow_pickle=True)))
        actual = reloaded(torch.from_numpy(data)).detach().numpy()
        assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()
        assert report.params_after < report.params_before


def test_pt2_output_keeps_the_dynamic_batch(tmp_path):
    output = tmp_path / "cnn.pt2"
    bnfold.fold(SAMPLES / "cnn.pt2", output)
    program = torch.export.load(str(output))
    assert not any("batch_norm" in str(node.target) for node in program.graph.nodes)
    for batch in (1, 7):
        x = torch.rand(batch, 1, 8, 8)
        assert program.module()(x).shape == (batch, 10)


def test_torchscript_folds_to_torchscript(tmp_path):
    output = tmp_path / "resnet.ts"
    report = bnfold.fold(SAMPLES / "resnet.ts", output, input_shape=SAMPLE_SHAPE)
    assert len(report.folded) == 4 and report.verified
    scripted = torch.jit.load(str(output))
    assert "batch_norm" not in str(scripted.inlined_graph)
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(scripted(x), torch.jit.load(str(SAMPLES / "resnet.ts"))(x), rtol=1e-5, atol=1e-5)


def test_frozen_torchscript_runs_and_folds_what_freezing_left(tmp_path):
    """torch.jit.freeze folds Conv -> BN itself and drops the modules' `training` attributes; the BN it
    leaves (before a conv) still folds forward, and verification runs the frozen model as it is."""
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                     nn.BatchNorm2d(4)))
    torch.jit.save(torch.jit.freeze(torch.jit.script(model)), tmp_path / "frozen.ts")
    report = bnfold.fold(tmp_path / "frozen.ts", tmp_path / "out.ts", input_shape="2,3,5,5")
    assert report.verify_error is None and report.verified
    assert [d.direction for d in report.folded] == [FoldDirection.INTO_CONSUMER]
    x = torch.randn(3, 3, 5, 5)
    assert np.allclose(outputs(torch.jit.load(str(tmp_path / "out.ts")), x), outputs(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_input_is_written_as_an_exported_program(tmp_path, suffix):
    source = SAMPLES / "cnn_state_dict.pt"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        source = tmp_path / "cnn.safetensors"
        save_file(dict(torch.load(SAMPLES / "cnn_state_dict.pt", weights_only=True)), source)
    output = tmp_path / "cnn_folded.pt2"
    report = bnfold.fold(source, output, input_shape=SAMPLE_SHAPE, model_factory="sample_models.architectures:make_cnn")
    assert any("torch.export program" in note for note in report.notes)
    program = torch.export.load(str(output))
    assert program.module()(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_state_dict_input_is_written_as_an_exported_program_also_when_nothing_folds(tmp_path):
    """Else the output, which has to be named .pt2, would hold a state_dict that torch.export.load refuses."""
    model = randomized(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    model_path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), model_path)
    (tmp_path / "nothing_folds.py").write_text(
        "from torch import nn\n\ndef make():\n"
        "    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())\n")
    sys.path.insert(0, str(tmp_path))
    try:
        report = bnfold.fold(model_path, tmp_path / "out.pt2", input_shape="2,3,6,6",
                             model_factory="nothing_folds:make")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("nothing_folds", None)
    assert report.passed and not report.folded and report.output
    x = torch.randn(2, 3, 6, 6)
    assert np.allclose(outputs(torch.export.load(str(tmp_path / "out.pt2")).module(), x), outputs(model, x),
                       rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("source, options, output, fragment", [
    ("cnn_state_dict.pt", {"model_factory": "sample_models.architectures:make_cnn", "input_shape": SAMPLE_SHAPE},
     "out.bin", "fold writes a state_dict model as a torch.export program: name the output out.pt2"),
    ("cnn.pt2", {}, "out.folded", "fold writes a .pt2 model as a torch.export program: name the output out.pt2"),
    ("cnn_pickle.pt", {"allow_pickle": True, "input_shape": SAMPLE_SHAPE}, "out.safetensors",
     "fold writes a pickled model as a torch.save pickle: name the output out.pt"),
])
def test_an_output_name_the_written_format_does_not_load_under_is_refused(tmp_path, source, options, output,
                                                                         fragment):
    with pytest.raises(UsageError, match=fragment):
        bnfold.fold(SAMPLES / source, tmp_path / output, **options)
    assert list(tmp_path.iterdir()) == []


def test_pickled_output_loads_with_torch_alone(tmp_path):
    output = tmp_path / "cnn.pt"
    bnfold.fold(SAMPLES / "cnn_pickle.pt", output, allow_pickle=True, input_shape=SAMPLE_SHAPE)
    script = ("import sys; sys.modules['bnfold'] = None\n"  # any import of bnfold would now fail
              "import torch\n"
              f"m = torch.load({str(output)!r}, weights_only=False)\n"
              "print(tuple(m(torch.rand(3, 1, 8, 8)).shape))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(3, 10)"


def test_inspect_shows_the_fold_plan_for_a_mixed_model():
    report = bnfold.inspect(SAMPLES / "mixed.pt2")
    assert {name: d.status for name, d in report.folds.items()} == {
        "input_bn": FoldStatus.KEPT, "bn1": FoldStatus.FOLDABLE, "bn2": FoldStatus.KEPT, "bn3": FoldStatus.FOLDABLE}
    assert [layer.name for layer in report.layers] == ["input_bn", "bn1", "bn2", "bn3"]


def test_cli_fold_json(tmp_path, cli):
    output = tmp_path / "x.pt2"
    result = cli("fold", SAMPLES / "cnn.pt2", "-o", output, "--json")
    assert result.code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["folded"] == 3 and body["kept"] == 0 and body["verified"] is True
    assert [layer["targets"] for layer in body["layers"]] == [["conv1"], ["conv2"], ["conv3"]]
    assert body["max_abs_error"] < 1e-4 and Path(body["output"]).exists()
    assert sum(bn_calls(runnable(bnfold.load_model(output)), torch.rand(2, 1, 8, 8)).values()) == 0
    assert body["size_before"] == (SAMPLES / "cnn.pt2").stat().st_size and body["size_after"] == output.stat().st_size
    program = torch.export.load(str(output))
    assert body["params_after"] == sum(t.numel() for t in {**program.state_dict, **program.constants}.values())
    assert body["params_before"] - body["params_after"] == 4 * 80 + 3 - (16 + 32)  # BN tensors out, 2 conv biases in


def test_cli_fold_over_the_tolerance_exits_1_and_writes_nothing(tmp_path, cli):
    output = tmp_path / "x.pt2"
    result = cli("fold", SAMPLES / "cnn.pt2", "-o", output, "--tolerance", "1e-12")
    assert result.code == 1, result.stderr
    assert "nothing written" in result.stdout and "max rel error" in result.stdout
    assert not output.exists() and list(tmp_path.iterdir()) == []  # no staging file left behind either
    body = json.loads(cli("fold", SAMPLES / "cnn.pt2", "-o", output, "--tolerance", "1e-12", "--json").stdout)
    assert body["verified"] is False and body["output"] is None and body["max_rel_error"] > 1e-12
    assert not output.exists()


def test_cli_fold_table_and_inspect_column_show_where_each_bn_goes(tmp_path, cli):
    folded = cli("fold", SAMPLES / "mixed.pt2", "-o", tmp_path / "x.pt2")
    inspected = cli("inspect", SAMPLES / "mixed.pt2")
    assert folded.code == 0 and inspected.code == 0, (folded.stderr, inspected.stderr)
    for line in ("bn1      │ folded → conv1", "bn2      │ kept: conv2's output also feeds `add`"):
        assert line in folded.stdout, folded.stdout
    size = (SAMPLES / "mixed.pt2").stat().st_size
    assert "parameters 14,658 → 14,510" in folded.stdout and f"file size {size:,} → " in folded.stdout
    lines = inspected.stdout.splitlines()
    header, bn1 = (next(line for line in lines if word in line) for word in ("┃ fold ", "│ bn1 "))
    assert bn1[header.index("┃ fold "):].startswith("│ → conv1"), inspected.stdout  # the fold column
