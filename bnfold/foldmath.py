"""Fold arithmetic: pure float64 functions on numpy arrays, no graph and no framework.

Every function returns float64 arrays; the caller rounds them once to the model's dtype with
`round_to`. Folding in float32 costs 2-25 ulp per weight; float64 then one rounding costs 0.5 ulp.

A BN in eval mode is the per-channel affine map y = scale * x + shift with
scale = gamma / sqrt(var + eps) and shift = beta - mean * scale.
"""

from __future__ import annotations

import numpy as np


def bn_affine(gamma: np.ndarray | None, beta: np.ndarray | None, mean: np.ndarray, var: np.ndarray,
              eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of an eval-mode BN, computed once in float64."""
    mean = np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    gamma = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64)
    scale = gamma / np.sqrt(var + np.float64(eps))
    return scale, beta - mean * scale


def _broadcast(vector: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def _bias(bias: np.ndarray | None, channels: int) -> np.ndarray:
    return np.zeros(channels) if bias is None else np.asarray(bias, np.float64)


def fold_into_producer(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
                       out_axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """BN after a layer whose output channel c is weight's slice c on `out_axis`.

    Conv (C_out, C_in/g, *k): axis 0. Linear (out, in): axis 0. MatMul/Gemm B (K, N): axis 1.
    """
    new_weight = np.array(weight, np.float64)  # the one float64 copy, scaled in place (weights can be large)
    new_weight *= _broadcast(scale, new_weight.ndim, out_axis)
    return new_weight, _bias(bias, scale.size) * scale + shift


def fold_into_conv_transpose(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray,
                             shift: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """BN after a ConvTranspose whose weight is (C_in, C_out/groups, *k).

    Output channel g * (C_out/groups) + j is weight[group g's input rows, j]: each group's rows get
    their own slice of `scale` on axis 1.
    """
    weight = np.asarray(weight, np.float64)
    c_in, per_group = weight.shape[0], weight.shape[1]
    if c_in % groups or scale.size != per_group * groups:
        raise ValueError(f"ConvTranspose weight {weight.shape} does not fit groups={groups}, C_out={scale.size}")
    grouped = weight.reshape(groups, c_in // groups, per_group, *weight.shape[2:])
    factors = scale.reshape(groups, 1, per_group, *([1] * (weight.ndim - 2)))
    return (grouped * factors).reshape(weight.shape), _bias(bias, scale.size) * scale + shift


def fold_into_consumer(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
                       groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """BN before a Conv (C_out, C_in/g, *k) or Linear (out, in): fold forward along the input axis.

    Exact for the shift only when the consumer sees no zero padding (the caller checks): padded zeros
    would have been `shift` before the fold. Input channel of group g, row k is g * (C_in/g) + k.
    """
    new_weight = np.array(weight, np.float64, order="C")  # the one float64 copy, scaled in place below
    c_out, per_group = new_weight.shape[0], new_weight.shape[1]
    if c_out % groups or scale.size != per_group * groups:
        raise ValueError(f"weight {new_weight.shape} does not fit groups={groups}, C_in={scale.size}")
    kernel = new_weight.shape[2:]
    grouped = new_weight.reshape(groups, c_out // groups, per_group, *kernel)  # a view
    scale_g = scale.reshape(groups, 1, per_group, *([1] * len(kernel)))
    shift_g = shift.reshape(groups, 1, per_group, *([1] * len(kernel)))
    extra_bias = (grouped * shift_g).reshape(groups, c_out // groups, -1).sum(axis=2).reshape(c_out)
    grouped *= scale_g
    return new_weight, _bias(bias, c_out) + extra_bias


def fold_into_sibling(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
                      groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """BN(x) summed with layer(x): the layer alone computes layer(x) + scale * x + shift afterwards.

    RepVGG's reparameterization of its identity branch: channel o of x reaches output o through the
    layer's centre tap, so scale[o] adds to weight[o, o's row in its group, centre] and the shift to the
    bias. Conv (C, C/g, *k) or Linear (C, C, the diagonal). Exact only when that tap reads x at the
    output's own position (stride 1, odd kernel, padding dilation * (k // 2)): the caller checks.
    """
    new_weight = np.array(weight, np.float64)  # the one float64 copy, changed in place
    channels, per_group = new_weight.shape[0], new_weight.shape[1]
    if channels % groups or per_group * groups != channels or scale.size != channels:
        raise ValueError(f"weight {new_weight.shape} with groups={groups} does not map {scale.size} channels "
                         "to as many")
    rows = np.arange(channels)
    centre = tuple(size // 2 for size in new_weight.shape[2:])
    new_weight[(rows, rows % per_group, *centre)] += scale
    return new_weight, _bias(bias, channels) + shift


def centre_tap_misfit(kernel: tuple[int, ...], stride: list[int], dilation: list[int],
                      padding: list[tuple[int, int]] | None) -> str | None:
    """Why a conv's centre tap does not read its input at the position it writes (so `fold_into_sibling`
    would not be exact), in words that follow the conv's name; None when it does. `padding` is (before,
    after) per spatial axis, all the padding its window sees; None when unknown."""
    if any(s != 1 for s in stride):
        return f"has stride {_sizes(stride)}"
    if any(k % 2 == 0 for k in kernel):
        return f"has an even kernel size {_sizes(kernel)}, so no centre tap"
    wanted = [(d * (k // 2),) * 2 for d, k in zip(dilation, kernel)]
    if padding != wanted:
        shown = "padding bnfold cannot read" if padding is None else f"padding {_pairs(padding)}"
        return f"has {shown} where its centre tap needs {_pairs(wanted)}, so it reads another position"
    return None


def _sizes(values: list[int] | tuple[int, ...]) -> str:
    return "x".join(str(v) for v in values)


def _pairs(padding: list[tuple[int, int]]) -> str:
    return ", ".join(f"{before}+{after}" for before, after in padding)


def compose_step(kind: str, x_first: bool, scale: np.ndarray, shift: np.ndarray,
                 constant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of y = scale * x + shift followed by `y <kind> constant` (`constant <kind> y` when
    not `x_first`); kind is mul, div, add or sub (constant / y is no affine map: the caller refuses it)."""
    if kind == "mul":
        return scale * constant, shift * constant
    if kind == "div":
        return scale / constant, shift / constant
    if kind == "add":
        return scale * np.ones_like(constant), shift + constant
    if x_first:  # y - c
        return scale * np.ones_like(constant), shift - constant
    return -scale * np.ones_like(constant), constant - shift  # c - y


def fold_into_matrix_consumer(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray,
                              shift: np.ndarray, in_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """BN before a MatMul/Gemm with a 2-D weight whose input features lie on `in_axis`."""
    weight = np.asarray(weight, np.float64)
    out_channels = weight.shape[1 - in_axis]
    new_weight = weight * _broadcast(scale, 2, in_axis)
    extra_bias = np.tensordot(shift, weight, axes=([0], [in_axis]))
    return new_weight, _bias(bias, out_channels) + extra_bias


def fold_into_gemm(weight: np.ndarray, bias: np.ndarray | None, alpha: float, beta: float, scale: np.ndarray,
                   shift: np.ndarray, trans_b: bool) -> tuple[np.ndarray, np.ndarray]:
    """BN after Gemm (Y = alpha * A'B' + beta * C): new B and a C meant for beta = 1.

    Output feature n is column n of B', i.e. axis 0 of B when transB. alpha stays on the product.
    """
    bias = None if bias is None else np.float64(beta) * np.asarray(bias, np.float64)
    return fold_into_producer(weight, bias, scale, shift, out_axis=0 if trans_b else 1)


def fold_into_gemm_consumer(weight: np.ndarray, bias: np.ndarray | None, alpha: float, beta: float,
                            scale: np.ndarray, shift: np.ndarray, trans_b: bool) -> tuple[np.ndarray, np.ndarray]:
    """BN before Gemm's A (transA = 0): new B and a C meant for beta = 1."""
    new_weight, extra = fold_into_matrix_consumer(weight, None, scale, shift, in_axis=1 if trans_b else 0)
    base = 0.0 if bias is None else np.float64(beta) * np.asarray(bias, np.float64)
    return new_weight, base + np.float64(alpha) * extra


def round_to(values: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """Round float64 results once to the model's dtype (bfloat16 as an ml_dtypes array, when available)."""
    if str(dtype) == "bfloat16":
        import ml_dtypes

        return bfloat16_bits(values).view(ml_dtypes.bfloat16)
    return np.asarray(values, np.float64).astype(dtype)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float64 rounded once (to nearest, ties to even) to bfloat16, as uint16 bit patterns.

    Casting through float32 rounds twice and can land one ulp off (torch and ml_dtypes both do);
    rounding to float32 *to odd* first keeps the second rounding exact.
    """
    values = np.asarray(values, np.float64)
    with np.errstate(over="ignore"):
        nearest = values.astype(np.float32)
    bits = nearest.view(np.uint32).astype(np.uint64)
    back = nearest.astype(np.float64)
    inexact = np.isfinite(values) & (back != values)
    bits[inexact & (np.abs(back) > np.abs(values))] -= 1  # truncate toward zero ...
    bits[inexact] |= 1  # ... and mark the lost bits in the last place: round to odd
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded[np.isnan(values)] = 0x7FC0
    return rounded.astype(np.uint16)
