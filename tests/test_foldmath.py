"""The pure fold arithmetic against torch's own layers evaluated in float64."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.foldmath import (bn_affine, fold_into_consumer, fold_into_conv_transpose, fold_into_matrix_consumer,
                             fold_into_producer, round_to)

SETTINGS = settings(max_examples=25, deadline=None)


def bn_params(rng, channels):
    return (rng.uniform(0.5, 1.5, channels), rng.normal(size=channels), rng.normal(size=channels) * 3,
            rng.uniform(0.1, 4.0, channels))


def bn_reference(y, gamma, beta, mean, var, eps):
    return F.batch_norm(y, torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(gamma),
                        torch.from_numpy(beta), training=False, eps=eps)


@SETTINGS
@given(groups=st.sampled_from([1, 2, 4]), per_group_in=st.integers(1, 3), per_group_out=st.integers(1, 3),
       kernel=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 1000))
def test_conv_then_bn(groups, per_group_in, per_group_out, kernel, bias, seed):
    rng = np.random.default_rng(seed)
    c_in, c_out = groups * per_group_in, groups * per_group_out
    weight = rng.normal(size=(c_out, per_group_in, kernel, kernel))
    b = rng.normal(size=c_out) if bias else None
    gamma, beta, mean, var = bn_params(rng, c_out)
    x = torch.from_numpy(rng.normal(size=(2, c_in, 6, 6)))
    expected = bn_reference(F.conv2d(x, torch.from_numpy(weight), None if b is None else torch.from_numpy(b),
                                     padding=1, groups=groups), gamma, beta, mean, var, 1e-5)
    scale, shift = bn_affine(gamma, beta, mean, var, 1e-5)
    new_w, new_b = fold_into_producer(weight, b, scale, shift, out_axis=0)
    actual = F.conv2d(x, torch.from_numpy(new_w), torch.from_numpy(new_b), padding=1, groups=groups)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(groups=st.sampled_from([1, 2, 3]), per_group_in=st.integers(1, 3), per_group_out=st.integers(1, 3),
       stride=st.integers(1, 2), seed=st.integers(0, 1000))
def test_grouped_conv_transpose_then_bn(groups, per_group_in, per_group_out, stride, seed):
    rng = np.random.default_rng(seed)
    c_in, c_out = groups * per_group_in, groups * per_group_out
    weight = rng.normal(size=(c_in, per_group_out, 3, 3))
    b = rng.normal(size=c_out)
    gamma, beta, mean, var = bn_params(rng, c_out)
    x = torch.from_numpy(rng.normal(size=(2, c_in, 5, 5)))
    expected = bn_reference(F.conv_transpose2d(x, torch.from_numpy(weight), torch.from_numpy(b), stride=stride,
                                               groups=groups), gamma, beta, mean, var, 1e-3)
    scale, shift = bn_affine(gamma, beta, mean, var, 1e-3)
    new_w, new_b = fold_into_conv_transpose(weight, b, scale, shift, groups)
    actual = F.conv_transpose2d(x, torch.from_numpy(new_w), torch.from_numpy(new_b), stride=stride, groups=groups)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(groups=st.sampled_from([1, 2, 4]), per_group_in=st.integers(1, 3), per_group_out=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_bn_then_unpadded_conv(groups, per_group_in, per_group_out, seed):
    rng = np.random.default_rng(seed)
    c_in, c_out = groups * per_group_in, groups * per_group_out
    weight = rng.normal(size=(c_out, per_group_in, 3, 3))
    b = rng.normal(size=c_out)
    gamma, beta, mean, var = bn_params(rng, c_in)
    x = torch.from_numpy(rng.normal(size=(2, c_in, 6, 6)))
    expected = F.conv2d(bn_reference(x, gamma, beta, mean, var, 1e-5), torch.from_numpy(weight),
                        torch.from_numpy(b), groups=groups)
    scale, shift = bn_affine(gamma, beta, mean, var, 1e-5)
    new_w, new_b = fold_into_consumer(weight, b, scale, shift, groups)
    actual = F.conv2d(x, torch.from_numpy(new_w), torch.from_numpy(new_b), groups=groups)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_linear_and_matmul_both_directions():
    rng = np.random.default_rng(0)
    weight, b = rng.normal(size=(5, 7)), rng.normal(size=5)  # Linear: (out, in)
    x = rng.normal(size=(4, 7))
    gamma, beta, mean, var = bn_params(rng, 5)
    scale, shift = bn_affine(gamma, beta, mean, var, 1e-5)
    new_w, new_b = fold_into_producer(weight, b, scale, shift, out_axis=0)
    np.testing.assert_allclose(x @ new_w.T + new_b, (x @ weight.T + b) * scale + shift, rtol=1e-12)

    gamma, beta, mean, var = bn_params(rng, 7)
    scale, shift = bn_affine(gamma, beta, mean, var, 1e-5)
    matrix = weight.T  # MatMul B: (K=in, N=out), input features on axis 0
    new_b_matrix, new_bias = fold_into_matrix_consumer(matrix, b, scale, shift, in_axis=0)
    np.testing.assert_allclose(x @ new_b_matrix + new_bias, (x * scale + shift) @ matrix + b, rtol=1e-12)


def test_float64_then_one_rounding_beats_float32_arithmetic():
    """The pitfall STYLE.md names: float32 folding costs ulps; float64 + one rounding is correctly rounded."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(64, 32, 3, 3)).astype(np.float32)
    gamma, beta, mean, var = (a.astype(np.float32) for a in bn_params(rng, 64))
    scale, shift = bn_affine(gamma, beta, mean, var, 1e-5)
    exact, _ = fold_into_producer(weight, None, scale, shift)
    ours = round_to(exact, np.float32)
    naive = weight * (gamma / np.sqrt(var + np.float32(1e-5))).reshape(-1, 1, 1, 1)
    assert np.abs(ours - exact).max() <= np.abs(naive.astype(np.float64) - exact).max()
    np.testing.assert_array_equal(ours, exact.astype(np.float32))
