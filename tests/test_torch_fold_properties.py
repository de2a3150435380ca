"""Property sweeps of the PyTorch fold rules: shapes, groups, strides, dilations, padding modes, dtypes.

Every example folds a small random model, compares it with the original on a fresh input, checks which
layers folded, and checks that the folded weights are the exact float64 fold rounded once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bnfold.layers import FoldStatus
from tests.torch_builders import bn_calls, fold, outputs, randomized, runnable

SWEEP = settings(max_examples=15, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Relative output error a fold may add, by dtype: a few roundings of the activations.
OUTPUT_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


def check(model: nn.Module, shape: tuple[int, ...], folds: bool, dtype: torch.dtype = torch.float32,
          randomize: bool = True):
    """Fold `model` (in `dtype`, with random BN statistics unless `randomize` is False: the caller set
    them); the single BN named "1" folds exactly when `folds`. Returns the folded module."""
    model = (randomized(model) if randomize else model.eval()).to(dtype)
    report = fold(model, shape, verify=False)
    statuses = {d.layer: d.status for d in report.decisions}
    assert statuses == {"1": FoldStatus.FOLDED if folds else FoldStatus.KEPT}, report.decisions
    folded = runnable(report.folded_model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    expected, actual = outputs(model, x), outputs(folded, x)
    assert np.abs(expected - actual).max() <= OUTPUT_RTOL[dtype] * max(np.abs(expected).max(), 1e-3)
    assert sum(bn_calls(folded, x).values()) == (0 if folds else 1)
    return model, folded


@torch.no_grad()
def exact_producer_fold(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module, axis: int,
                        groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The fold computed independently in float64: scale each output channel's weights."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    w = weight.double()
    if axis == 1:  # transposed conv: (C_in, C_out/g, ...), group g's rows own output channels g*(C_out/g)+j
        w = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        w = w * scale.reshape(groups, 1, -1, *[1] * (w.dim() - 3))
        w = w.reshape(weight.shape)
    else:
        w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
    b = (bias.double() if bias is not None else torch.zeros_like(mean)) * scale + beta - mean * scale
    return w.numpy(), b.numpy()


def assert_rounded_once(actual: torch.Tensor, exact: np.ndarray) -> None:
    """Each value is the nearest value of its dtype to the exact one (at most half an ulp away)."""
    finfo = torch.finfo(actual.dtype)
    magnitude = np.maximum(np.abs(exact), finfo.tiny)
    half_ulp = finfo.eps / 2 * 2.0 ** np.floor(np.log2(magnitude))
    assert (np.abs(actual.detach().double().numpy() - exact) <= half_ulp * (1 + 1e-12)).all()


@st.composite
def conv_cases(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    kernel, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]) if padding else st.just("zeros"))
    size = max(5, (kernel - 1) * dilation + 1)
    return dims, cin, cout, kernel, stride, dilation, padding, mode, groups, size


@SWEEP
@given(conv_cases(), st.booleans(), st.booleans(), DTYPES)
def test_conv_bn_always_folds(case, bias, affine, dtype):
    dims, cin, cout, kernel, stride, dilation, padding, mode, groups, size = case
    conv = getattr(nn, f"Conv{dims}d")(cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode=mode)
    model, folded = check(nn.Sequential(conv, getattr(nn, f"BatchNorm{dims}d")(cout, affine=affine)),
                          (2, cin, *[size] * dims), True, dtype)
    weight, new_bias = exact_producer_fold(model[0].weight, model[0].bias, model[1], axis=0)
    params = dict(folded.named_parameters())
    assert params["0.weight"].dtype == params["0.bias"].dtype == dtype
    assert_rounded_once(params["0.weight"], weight)
    assert_rounded_once(params["0.bias"], new_bias)


@SWEEP
@given(st.integers(1, 3), st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 3), st.integers(0, 1),
       st.integers(1, 2), st.booleans(), DTYPES)
def test_conv_transpose_bn_always_folds(dims, groups, kernel, stride, padding, dilation, bias, dtype):
    cin, cout = 2 * groups, 3 * groups
    output_padding = stride - 1
    up = getattr(nn, f"ConvTranspose{dims}d")(cin, cout, kernel, stride, padding, output_padding, groups, bias,
                                              dilation)
    model, folded = check(nn.Sequential(up, getattr(nn, f"BatchNorm{dims}d")(cout)), (2, cin, *[3] * dims),
                          True, dtype)
    weight, new_bias = exact_producer_fold(model[0].weight, model[0].bias, model[1], axis=1, groups=groups)
    params = dict(folded.named_parameters())
    assert_rounded_once(params["0.weight"], weight)
    assert_rounded_once(params["0.bias"], new_bias)


class Tokens(nn.Module):
    """Linear over (B, T, C) tokens with BN over the flattened (B*T, C) rows, or over (B, C, T) directly."""

    def __init__(self, cin: int, cout: int, flatten: bool) -> None:
        super().__init__()
        self.add_module("0", nn.Linear(cin, cout))
        self.add_module("1", nn.BatchNorm1d(cout))
        self.flatten = flatten

    def forward(self, x):
        y = getattr(self, "0")(x)
        bn = getattr(self, "1")
        return bn(y.flatten(0, 1)).reshape_as(y) if self.flatten else bn(y)


@SWEEP
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.booleans(), DTYPES)
def test_linear_bn_folds_only_on_the_feature_axis(cin, cout, tokens, flatten, dtype):
    """(B*T, C) rows fold; BN1d over (B, T, C) with T == C normalizes the token axis and never folds."""
    if flatten:
        check(Tokens(cin, cout, True), (2, tokens, cin), True, dtype)
    else:
        check(Tokens(cin, cout, False), (2, cout, cin), False, dtype)  # axis 1 has cout entries too


@SWEEP
@given(st.sampled_from(["zeros", "reflect", "replicate", "circular"]), st.integers(0, 2), st.sampled_from([1, 2]),
       st.booleans(), st.integers(1, 2), st.integers(1, 2), DTYPES)
def test_bn_folds_forward_unless_zero_padding_meets_a_shift(mode, padding, groups, shifted, stride, dilation, dtype):
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride, padding, dilation, groups, padding_mode=mode)
    model = nn.Sequential(nn.Identity(), bn, conv)
    randomized(model)
    if not shifted:  # exactly no shift: a pure per-channel scale
        with torch.no_grad():
            bn.bias.zero_()
            bn.running_mean.zero_()
    folds = mode != "zeros" or padding == 0 or not shifted
    check(model, (2, 4, 6, 6), folds, dtype, randomize=False)


class Concat(nn.Module):
    """Convs of one input with different kernels (and so "same" paddings), concatenated along channels."""

    def __init__(self, widths: list[int], kernels: list[int], stride: int = 1, dilation: int = 1,
                 mode: str = "zeros") -> None:
        super().__init__()
        self.add_module("0", nn.ModuleList(nn.Conv2d(3, w, k, stride, dilation * (k // 2), dilation,
                                                     padding_mode=mode) for w, k in zip(widths, kernels)))
        self.add_module("1", nn.BatchNorm2d(sum(widths)))

    def forward(self, x):
        return getattr(self, "1")(torch.cat([conv(x) for conv in getattr(self, "0")], 1))


@SWEEP
@given(st.lists(st.tuples(st.integers(1, 4), st.sampled_from([1, 3, 5])), min_size=1, max_size=4),
       st.integers(1, 2), st.integers(1, 2), st.sampled_from(["zeros", "reflect", "replicate", "circular"]), DTYPES)
def test_concat_of_convs_always_splits(branches, stride, dilation, mode, dtype):
    widths, kernels = zip(*branches)
    check(Concat(list(widths), list(kernels), stride, dilation, mode), (2, 3, 11, 11), True, dtype)
