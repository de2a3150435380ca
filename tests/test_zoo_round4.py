"""A fourth round of upstream-style architectures, folded, recalibrated and inspected per format.

Each model re-creates, at toy size, the way its upstream project writes it (timm's LeViT, speechbrain's
ECAPA-TDNN, Cadene's Xception, hszhao's PSPNet, Jongchan's CBAM ResNet, PANNs' Cnn14, dreamquark's TabNet,
apple's MobileOne in its train-time form), with the hand-derived set of BN layers that fold exactly and the
reason each other one is kept. They are checked as test_zoo_round3.py checks its models (fold
eager/ONNX/.pt2/TorchScript at another batch size, recalibrate exact and fast against the oracle, inspect).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
import tests.test_zoo_acceptance as acceptance
import tests.test_zoo_more as more
import tests.test_zoo_patterns as patterns
from tests.test_zoo_acceptance import REL_TOLERANCE, forward, rel_error
from tests.test_zoo_recalibration import (
    BATCH,
    NEVER_REACHED,
    OUTPUT_TOLERANCE,
    assert_recalibrated,
    assert_skipped,
    calibration_data,
    module_statistics,
    onnx_export,
    onnx_statistics,
    outputs,
    probe_input,
    unreached,
)
from tests.zoo import ZooModel, _build

# ---------------------------------------------------------------------------------------------------------
# 1. LeViT (timm levit.py): Conv2d_BN and Linear_BN wrappers (nn.Sequential subclasses; Linear_BN runs its BN
#    on the (B*N, C) flattened tokens), a b16 stem with Hardswish, attention whose biases are a Parameter
#    indexed by a LongTensor buffer, an AttentionSubsample whose queries come from strided tokens, Residual
#    wrappers, BN_Linear heads (BN1d then Linear) averaged with a distillation head
# ---------------------------------------------------------------------------------------------------------


class Conv2d_BN(nn.Sequential):
    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, bn_weight_init: float = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        self.add_module("bn", bn)


class Linear_BN(nn.Sequential):
    def __init__(self, a: int, b: int, bn_weight_init: float = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Linear(a, b, bias=False))
        bn = nn.BatchNorm1d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        self.add_module("bn", bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l, bn = self._modules.values()
        x = l(x)
        return bn(x.flatten(0, 1)).reshape_as(x)


class BN_Linear(nn.Sequential):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b, bias=True))


def b16(n: int, activation: type[nn.Module]) -> nn.Sequential:
    """The patch embedding, two stride-2 stages here (four upstream)."""
    return nn.Sequential(Conv2d_BN(3, n // 2, 3, 2, 1), activation(), Conv2d_BN(n // 2, n, 3, 2, 1))


class Residual(nn.Module):
    def __init__(self, m: nn.Module, drop: float) -> None:
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop).detach()
            return x + self.m(x) * keep
        return x + self.m(x)


def _attention_bias_idxs(points_q: list, points_k: list, stride: int) -> tuple[int, torch.Tensor]:
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points_q:
        for p2 in points_k:
            offset = (abs(p1[0] * stride - p2[0]), abs(p1[1] * stride - p2[1]))
            if offset not in offsets:
                offsets[offset] = len(offsets)
            idxs.append(offsets[offset])
    return len(offsets), torch.LongTensor(idxs).view(len(points_q), len(points_k))


class _Heads(nn.Module):
    """The head sizes both LeViT attentions set up alike (upstream repeats these lines in each)."""

    def __init__(self, key_dim: int, num_heads: int, attn_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads


class Attention(_Heads):
    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, activation: type[nn.Module],
                 resolution: int) -> None:
        super().__init__(key_dim, num_heads, attn_ratio)
        nh_kd = key_dim * num_heads
        self.qkv = Linear_BN(dim, self.dh + nh_kd * 2)
        self.proj = nn.Sequential(activation(), Linear_BN(self.dh, dim, bn_weight_init=0))
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets, idxs = _attention_bias_idxs(points, points, 1)
        self.attention_biases = nn.Parameter(torch.randn(num_heads, offsets) * 0.1)
        self.register_buffer("attention_bias_idxs", idxs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, self.dh)
        return self.proj(x)


class Subsample(nn.Module):
    def __init__(self, stride: int, resolution: int) -> None:
        super().__init__()
        self.stride = stride
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, self.resolution, self.resolution, C)[:, ::self.stride, ::self.stride].reshape(B, -1, C)


class AttentionSubsample(_Heads):
    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: int,
                 activation: type[nn.Module], stride: int, resolution: int, resolution_: int) -> None:
        super().__init__(key_dim, num_heads, attn_ratio)
        nh_kd = key_dim * num_heads
        self.resolution_2 = resolution_ ** 2
        self.kv = Linear_BN(in_dim, self.dh + nh_kd)
        self.q = nn.Sequential(Subsample(stride, resolution), Linear_BN(in_dim, nh_kd))
        self.proj = nn.Sequential(activation(), Linear_BN(self.dh, out_dim))
        points = list(itertools.product(range(resolution), range(resolution)))
        points_ = list(itertools.product(range(resolution_), range(resolution_)))
        offsets, idxs = _attention_bias_idxs(points_, points, stride)
        self.attention_biases = nn.Parameter(torch.randn(num_heads, offsets) * 0.1)
        self.register_buffer("attention_bias_idxs", idxs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.d], dim=3)
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        q = self.q(x).view(B, self.resolution_2, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, -1, self.dh)
        return self.proj(x)


def _levit_mlp(dim: int, hidden: int) -> Residual:
    return Residual(nn.Sequential(Linear_BN(dim, hidden), nn.Hardswish(), Linear_BN(hidden, dim, bn_weight_init=0)),
                    0.0)


class LeViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        act = nn.Hardswish
        self.patch_embed = b16(16, act)
        self.blocks = nn.Sequential(
            Residual(Attention(16, 4, 2, 2, act, resolution=4), 0.0), _levit_mlp(16, 32),
            AttentionSubsample(16, 24, 4, 4, 2, act, stride=2, resolution=4, resolution_=2), _levit_mlp(24, 48))
        self.head = BN_Linear(24, 5)
        self.head_dist = BN_Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.blocks(x).mean(1)
        return (self.head(x) + self.head_dist(x)) / 2


def _linear_bn(*prefixes: str) -> list[str]:
    return [f"{prefix}.bn" for prefix in prefixes]


# Every Linear_BN's BN normalizes the Linear's output features (flattened to rows), read by that BN alone:
# folds into the Linear; each Conv2d_BN's into its conv. Each head's BN1d reads the token mean that the other
# head reads too, and feeds only its own Linear (no padding): folds forward into it.
LEVIT_BN = frozenset([
    "patch_embed.0.bn", "patch_embed.2.bn",
    *_linear_bn("blocks.0.m.qkv", "blocks.0.m.proj.1", "blocks.1.m.0", "blocks.1.m.2", "blocks.2.kv", "blocks.2.q.1",
                "blocks.2.proj.1", "blocks.3.m.0", "blocks.3.m.2", "head", "head_dist")])

# ---------------------------------------------------------------------------------------------------------
# 2. ECAPA-TDNN (speechbrain.lobes.models.ECAPA_TDNN): speechbrain's Conv1d (F.pad with mode="reflect" to
#    "same" length, computed from in_channels as upstream does, then an unpadded nn.Conv1d) and its
#    BatchNorm1d wrapper (skip_transpose=True), TDNNBlock = conv -> ReLU -> BN (the BN after the
#    activation), SE-Res2Net blocks (chunk, hierarchical adds, cat, SE on the time mean), multi-layer
#    feature aggregation (cat), attentive statistics pooling with global context, asp_bn -> 1x1 fc; then
#    the Classifier with one lin block (BN1d over the transposed (B, 1, C) embedding -> Linear) and cosine
#    scores against a normalized weight
# ---------------------------------------------------------------------------------------------------------


def get_padding_elem(L_in: int, stride: int, kernel_size: int, dilation: int) -> list[int]:
    if stride > 1:
        return [math.floor(kernel_size / 2), math.floor(kernel_size / 2)]
    L_out = math.floor((L_in - dilation * (kernel_size - 1) - 1) / stride) + 1
    return [math.floor((L_in - L_out) / 2), math.floor((L_in - L_out) / 2)]


class SbConv1d(nn.Module):
    """speechbrain.nnet.CNN.Conv1d with skip_transpose=True, padding="same", padding_mode="reflect"."""

    def __init__(self, out_channels: int, kernel_size: int, in_channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.dilation, self.stride, self.in_channels = kernel_size, dilation, 1, in_channels
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=1, dilation=dilation, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = get_padding_elem(self.in_channels, self.stride, self.kernel_size, self.dilation)
        return self.conv(F.pad(x, padding, mode="reflect"))


class SbBatchNorm1d(nn.Module):
    """speechbrain.nnet.normalization.BatchNorm1d: transposes (B, T, C) to (B, C, T) unless skip_transpose."""

    def __init__(self, input_size: int, skip_transpose: bool = True) -> None:
        super().__init__()
        self.skip_transpose = skip_transpose
        self.norm = nn.BatchNorm1d(input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.skip_transpose:
            x = x.transpose(-1, 1)
        x_n = self.norm(x)
        return x_n if self.skip_transpose else x_n.transpose(1, -1)


class TDNNBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv = SbConv1d(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                             dilation=dilation)
        self.activation = nn.ReLU()
        self.norm = SbBatchNorm1d(input_size=out_channels)
        self.dropout = nn.Dropout1d(p=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.activation(self.conv(x))))


class Res2NetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, scale: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TDNNBlock(in_channels // scale, out_channels // scale, kernel_size, dilation)
                                    for _ in range(scale - 1))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = []
        for i, x_i in enumerate(torch.chunk(x, self.scale, dim=1)):
            if i == 0:
                y_i = x_i
            elif i == 1:
                y_i = self.blocks[i - 1](x_i)
            else:
                y_i = self.blocks[i - 1](x_i + y_i)
            y.append(y_i)
        return torch.cat(y, dim=1)


class SEBlock1d(nn.Module):
    def __init__(self, in_channels: int, se_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = SbConv1d(in_channels=in_channels, out_channels=se_channels, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = SbConv1d(in_channels=se_channels, out_channels=out_channels, kernel_size=1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=2, keepdim=True)
        s = self.sigmoid(self.conv2(self.relu(self.conv1(s))))
        return s * x


class SERes2NetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, res2net_scale: int, se_channels: int, kernel_size: int,
                 dilation: int) -> None:
        super().__init__()
        self.tdnn1 = TDNNBlock(in_channels, out_channels, kernel_size=1, dilation=1)
        self.res2net_block = Res2NetBlock(out_channels, out_channels, res2net_scale, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(out_channels, out_channels, kernel_size=1, dilation=1)
        self.se_block = SEBlock1d(out_channels, se_channels, out_channels)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = SbConv1d(in_channels=in_channels, out_channels=out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x) if self.shortcut is not None else x
        x = self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))
        return x + residual


class AttentiveStatisticsPooling(nn.Module):
    """With lengths=None every frame is valid: the mask is all ones (upstream builds it from the lengths)."""

    def __init__(self, channels: int, attention_channels: int) -> None:
        super().__init__()
        self.eps = 1e-12
        self.tdnn = TDNNBlock(channels * 3, attention_channels, 1, 1)
        self.tanh = nn.Tanh()
        self.conv = SbConv1d(in_channels=attention_channels, out_channels=channels, kernel_size=1)

    def _compute_statistics(self, x: torch.Tensor, m: torch.Tensor, dim: int = 2) -> tuple[torch.Tensor, ...]:
        mean = (m * x).sum(dim)
        std = torch.sqrt((m * (x - mean.unsqueeze(dim)).pow(2)).sum(dim).clamp(self.eps))
        return mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[-1]
        mask = torch.ones_like(x[:, :1, :])
        total = mask.sum(dim=2, keepdim=True)
        mean, std = self._compute_statistics(x, mask / total)
        attn = torch.cat([x, mean.unsqueeze(2).repeat(1, 1, L), std.unsqueeze(2).repeat(1, 1, L)], dim=1)
        attn = self.conv(self.tanh(self.tdnn(attn)))
        attn = F.softmax(attn.masked_fill(mask == 0, float("-inf")), dim=2)
        mean, std = self._compute_statistics(x, attn)
        return torch.cat((mean, std), dim=1).unsqueeze(2)


class EcapaClassifier(nn.Module):
    def __init__(self, input_size: int, lin_neurons: int, out_neurons: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([SbBatchNorm1d(input_size=input_size, skip_transpose=False),
                                     nn.Linear(input_size, lin_neurons)])
        self.weight = nn.Parameter(torch.empty(out_neurons, lin_neurons))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.blocks:
            x = layer(x)
        return F.linear(F.normalize(x.squeeze(1)), F.normalize(self.weight)).unsqueeze(1)


class ECAPA_TDNN(nn.Module):
    def __init__(self, input_size: int = 8, lin_neurons: int = 8, channels: tuple[int, ...] = (16, 16, 16, 48),
                 kernel_sizes: tuple[int, ...] = (5, 3, 3, 1), dilations: tuple[int, ...] = (1, 2, 3, 1)) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TDNNBlock(input_size, channels[0], kernel_sizes[0], dilations[0])])
        for i in range(1, len(channels) - 1):
            self.blocks.append(SERes2NetBlock(channels[i - 1], channels[i], res2net_scale=4, se_channels=8,
                                              kernel_size=kernel_sizes[i], dilation=dilations[i]))
        self.mfa = TDNNBlock(channels[-2] * (len(channels) - 2), channels[-1], kernel_sizes[-1], dilations[-1])
        self.asp = AttentiveStatisticsPooling(channels[-1], attention_channels=8)
        self.asp_bn = SbBatchNorm1d(input_size=channels[-1] * 2)
        self.fc = SbConv1d(in_channels=channels[-1] * 2, out_channels=lin_neurons, kernel_size=1)
        self.classifier = EcapaClassifier(lin_neurons, 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        xl = []
        for layer in self.blocks:
            x = layer(x)
            xl.append(x)
        x = self.mfa(torch.cat(xl[1:], dim=1))
        x = self.fc(self.asp_bn(self.asp(x))).transpose(1, 2)
        return self.classifier(x)


def _tdnn_norms() -> list[str]:
    blocks = [f"blocks.{b}.{part}" for b in (1, 2) for part in
              ("tdnn1", *(f"res2net_block.blocks.{i}" for i in range(3)), "tdnn2")]
    return [f"{block}.norm.norm" for block in ("blocks.0", *blocks, "mfa", "asp.tdnn")]


# asp_bn normalizes the pooled statistics (a cat, not a layer) and feeds only fc, whose reflect F.pad adds
# nothing at kernel size 1: it folds forward into fc. The classifier's BN normalizes fc's output (transposed
# twice) and folds back into fc too. Every TDNN block's BN follows its ReLU; their outputs feed the residual
# and the next conv, the Res2Net chunks, the SE gate and its multiply, the pooling statistics: kept.
ECAPA_BN = frozenset(["asp_bn.norm", "classifier.blocks.0.norm"])
ECAPA_KEPT = {name: "it follows `relu`" for name in _tdnn_norms()}

# ---------------------------------------------------------------------------------------------------------
# 3. Xception (Cadene pretrainedmodels): SeparableConv2d = depthwise conv then pointwise conv, no BN between;
#    blocks of [ReLU, SeparableConv2d, BN] repeated, where one inplace ReLU module is appended at several
#    places of the nn.Sequential and the first is replaced by a non-inplace one (its input is the skip too),
#    a max-pool after the last BN of a strided block, a 1x1 stride-2 conv + BN skip, `x += skip`
# ---------------------------------------------------------------------------------------------------------


class SeparableConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation, groups=in_channels,
                               bias=bias)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, 1, 0, 1, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))


class XceptionBlock(nn.Module):
    def __init__(self, in_filters: int, out_filters: int, reps: int, strides: int = 1, start_with_relu: bool = True,
                 grow_first: bool = True) -> None:
        super().__init__()
        if out_filters != in_filters or strides != 1:
            self.skip = nn.Conv2d(in_filters, out_filters, 1, stride=strides, bias=False)
            self.skipbn = nn.BatchNorm2d(out_filters)
        else:
            self.skip = None
        self.relu = nn.ReLU(inplace=True)
        rep: list[nn.Module] = []
        filters = in_filters
        if grow_first:
            rep += [self.relu, SeparableConv2d(in_filters, out_filters, 3, 1, 1), nn.BatchNorm2d(out_filters)]
            filters = out_filters
        for _ in range(reps - 1):
            rep += [self.relu, SeparableConv2d(filters, filters, 3, 1, 1), nn.BatchNorm2d(filters)]
        if not grow_first:
            rep += [self.relu, SeparableConv2d(in_filters, out_filters, 3, 1, 1), nn.BatchNorm2d(out_filters)]
        if not start_with_relu:
            rep = rep[1:]
        else:
            rep[0] = nn.ReLU(inplace=False)
        if strides != 1:
            rep.append(nn.MaxPool2d(3, strides, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.rep(inp)
        skip = self.skipbn(self.skip(inp)) if self.skip is not None else inp
        x += skip
        return x


class Xception(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU(inplace=True)
        self.block1 = XceptionBlock(8, 12, 2, 2, start_with_relu=False, grow_first=True)
        self.block2 = XceptionBlock(12, 12, 3, 1, start_with_relu=True, grow_first=True)
        self.block3 = XceptionBlock(12, 16, 2, 2, start_with_relu=True, grow_first=False)
        self.conv3 = SeparableConv2d(16, 20, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(20)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv4 = SeparableConv2d(20, 24, 3, 1, 1)
        self.bn4 = nn.BatchNorm2d(24)
        self.last_linear = nn.Linear(24, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        x = self.block3(self.block2(self.block1(x)))
        return self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(nn.ReLU(inplace=True)(self.features(x)), (1, 1))
        return self.last_linear(x.view(x.size(0), -1))


def _xception_block(prefix: str, bn_indices: tuple[int, ...], skip: bool) -> list[str]:
    return [f"{prefix}.rep.{i}" for i in bn_indices] + ([f"{prefix}.skipbn"] if skip else [])


# Every BN follows a conv read by it alone: a separable conv's BN folds into its pointwise conv (the depthwise
# conv before it has no BN), the skip BN into the stride-2 1x1 conv; the adds, pools and ReLUs come after.
XCEPTION_BN = frozenset(["bn1", "bn2", "bn3", "bn4", *_xception_block("block1", (1, 4), True),
                         *_xception_block("block2", (2, 5, 8), False), *_xception_block("block3", (2, 5), True)])

# ---------------------------------------------------------------------------------------------------------
# 4. PSPNet (hszhao/semseg): a deep-base stem, a dilated last stage, the pyramid pooling module
#    (AdaptiveAvgPool2d(1, 2, 3, 6) -> 1x1 conv -> BN -> ReLU -> bilinear upsample with align_corners=True,
#    cat with its input), the cls head (3x3 conv + BN + ReLU + Dropout2d + 1x1 conv), the output upsampled by
#    a zoom factor; the aux head is built but only run in training
# ---------------------------------------------------------------------------------------------------------


class PPM(nn.Module):
    def __init__(self, in_dim: int, reduction_dim: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        self.features = nn.ModuleList(nn.Sequential(
            nn.AdaptiveAvgPool2d(bin), nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True)) for bin in bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_size = x.size()
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), x_size[2:], mode="bilinear", align_corners=True))
        return torch.cat(out, 1)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class PSPNet(nn.Module):
    def __init__(self, bins: tuple[int, ...] = (1, 2, 3, 6), classes: int = 3, zoom_factor: int = 8) -> None:
        super().__init__()
        self.zoom_factor = zoom_factor
        self.layer0 = nn.Sequential(*_conv_bn_relu(3, 4, 2), *_conv_bn_relu(4, 4), *_conv_bn_relu(4, 8),
                                    nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = nn.Sequential(*_conv_bn_relu(8, 8))
        self.layer2 = nn.Sequential(*_conv_bn_relu(8, 16, stride=2))
        self.layer3 = nn.Sequential(*_conv_bn_relu(16, 16, dilation=2))
        self.layer4 = nn.Sequential(*_conv_bn_relu(16, 16, dilation=4))
        fea_dim = 16
        self.ppm = PPM(fea_dim, fea_dim // len(bins), bins)
        self.cls = nn.Sequential(nn.Conv2d(fea_dim * 2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                 nn.ReLU(inplace=True), nn.Dropout2d(p=0.1), nn.Conv2d(8, classes, 1))
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                 nn.Dropout2d(p=0.1), nn.Conv2d(8, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_size = x.size()
        h = int((x_size[2] - 1) / 8 * self.zoom_factor + 1)
        w = int((x_size[3] - 1) / 8 * self.zoom_factor + 1)
        x = self.layer2(self.layer1(self.layer0(x)))
        x_tmp = self.layer3(x)
        x = self.cls(self.ppm(self.layer4(x_tmp)))
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)
        if self.training:
            return x, self.aux(x_tmp)
        return x


# Every BN that runs follows a conv read by it alone (the pyramid's after a 1x1 conv on pooled maps down to
# 1x1); the aux head's BN is never run in eval mode.
PSPNET_BN = frozenset(["layer0.1", "layer0.4", "layer0.7", "layer1.1", "layer2.1", "layer3.1", "layer4.1",
                       *(f"ppm.features.{i}.2" for i in range(4)), "cls.1"])
PSPNET_KEPT = {"aux.1": "the forward never calls it"}

# ---------------------------------------------------------------------------------------------------------
# 5. CBAM (Jongchan/attention-module ResidualNet): basic blocks with CBAM after bn2; ChannelGate runs one
#    shared MLP (Flatten, Linear, ReLU, Linear) on the avg- and the max-pooled map (pools sized from
#    x.size()), sums, sigmoid, expand_as; SpatialGate pools over channels (max and mean, cat) into
#    BasicConv(2, 1, 7x7) with BatchNorm2d(1, momentum=0.01) and no ReLU, then sigmoid
# ---------------------------------------------------------------------------------------------------------


class BasicConv(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 relu: bool = True, bn: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=stride, padding=padding,
                              bias=bias)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class ChannelGate(nn.Module):
    def __init__(self, gate_channels: int, reduction_ratio: int = 16, pool_types: tuple[str, ...] = ("avg", "max")):
        super().__init__()
        self.mlp = nn.Sequential(Flatten(), nn.Linear(gate_channels, gate_channels // reduction_ratio), nn.ReLU(),
                                 nn.Linear(gate_channels // reduction_ratio, gate_channels))
        self.pool_types = pool_types

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_att_sum = None
        for pool_type in self.pool_types:
            if pool_type == "avg":
                pool = F.avg_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
            else:
                pool = F.max_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
            channel_att_raw = self.mlp(pool)
            channel_att_sum = channel_att_raw if channel_att_sum is None else channel_att_sum + channel_att_raw
        scale = torch.sigmoid(channel_att_sum).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * scale


class ChannelPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        kernel_size = 7
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.spatial(self.compress(x)))


class CBAM(nn.Module):
    def __init__(self, gate_channels: int, reduction_ratio: int = 16) -> None:
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio)
        self.SpatialGate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class CbamBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.cbam = CBAM(planes, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = self.cbam(out)
        out += residual
        return self.relu(out)


class CbamResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(CbamBasicBlock(8, 8))
        self.layer2 = nn.Sequential(CbamBasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False),
                                                                           nn.BatchNorm2d(16))))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


def _cbam_block(prefix: str, downsample: bool) -> list[str]:
    names = [f"{prefix}.bn1", f"{prefix}.bn2", f"{prefix}.cbam.SpatialGate.spatial.bn"]
    return names + ([f"{prefix}.downsample.1"] if downsample else [])


# Every BN follows a conv read by it alone: bn2 before the gates (its output is pooled twice and multiplied),
# the spatial gate's one-channel BN after the 7x7 conv over the channel pool.
CBAM_BN = frozenset(["bn1", *_cbam_block("layer1.0", False), *_cbam_block("layer2.0", True)])

# ---------------------------------------------------------------------------------------------------------
# 6. PANNs Cnn14 (qiuqiangkong/audioset_tagging_cnn), from the log-mel spectrogram on: bn0 is a
#    BatchNorm2d over the mel bins, applied by transposing (B, 1, T, mel) to (B, mel, T, 1) and back, so it
#    normalizes the last spatial axis of the first conv's input, not a channel; ConvBlocks of two
#    3x3 conv + BN + F.relu_ and an average pool; mean over frequency, max + mean over time, fc1, sigmoid
# ---------------------------------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, (3, 3), (1, 1), (1, 1), bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, (3, 3), (1, 1), (1, 1), bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int] = (2, 2), pool_type: str = "avg") -> torch.Tensor:
        x = F.relu_(self.bn1(self.conv1(x)))
        x = F.relu_(self.bn2(self.conv2(x)))
        if pool_type == "max":
            return F.max_pool2d(x, kernel_size=pool_size)
        if pool_type == "avg":
            return F.avg_pool2d(x, kernel_size=pool_size)
        return F.avg_pool2d(x, kernel_size=pool_size) + F.max_pool2d(x, kernel_size=pool_size)


class Cnn14(nn.Module):
    def __init__(self, mel_bins: int = 8, classes_num: int = 5) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(mel_bins)
        self.conv_block1 = ConvBlock(in_channels=1, out_channels=4)
        self.conv_block2 = ConvBlock(in_channels=4, out_channels=8)
        self.conv_block3 = ConvBlock(in_channels=8, out_channels=16)
        self.fc1 = nn.Linear(16, 16, bias=True)
        self.fc_audioset = nn.Linear(16, classes_num, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        x = F.dropout(self.conv_block1(x, pool_size=(2, 2), pool_type="avg"), p=0.2, training=self.training)
        x = F.dropout(self.conv_block2(x, pool_size=(2, 2), pool_type="avg"), p=0.2, training=self.training)
        x = F.dropout(self.conv_block3(x, pool_size=(1, 1), pool_type="avg"), p=0.2, training=self.training)
        x = torch.mean(x, dim=3)
        (x1, _) = torch.max(x, dim=2)
        x = F.dropout(x1 + torch.mean(x, dim=2), p=0.5, training=self.training)
        x = F.relu_(self.fc1(x))
        return torch.sigmoid(self.fc_audioset(x))


CNN14_BN = frozenset(f"conv_block{i}.bn{j}" for i in (1, 2, 3) for j in (1, 2))
CNN14_KEPT = {"bn0": "cannot prove that it normalizes conv_block1.conv1's input channels"}

# ---------------------------------------------------------------------------------------------------------
# 7. TabNet (dreamquark-ai/tabnet): initial_bn, a BatchNorm1d on the raw features; ghost batch norm (GBN:
#    the batch chunked into virtual batches, one BN module called on each chunk, cat); GLU layers
#    (Linear without bias -> GBN -> first half * sigmoid(second half)) whose first n_shared Linears are one
#    ModuleList shared by every feature transformer, each call followed by its own GBN; attentive
#    transformers (Linear -> GBN -> * priors -> selector) masking the normalized input; the steps' ReLU'd
#    outputs summed into a final mapping. The selector is a softmax here (sparsemax upstream).
# ---------------------------------------------------------------------------------------------------------


class GBN(nn.Module):
    def __init__(self, input_dim: int, virtual_batch_size: int = 128, momentum: float = 0.01) -> None:
        super().__init__()
        self.virtual_batch_size = virtual_batch_size
        self.bn = nn.BatchNorm1d(input_dim, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(int(np.ceil(x.shape[0] / self.virtual_batch_size)), 0)
        return torch.cat([self.bn(x_) for x_ in chunks], dim=0)


class GLU_Layer(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, fc: nn.Module | None = None) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.fc = fc if fc is not None else nn.Linear(input_dim, 2 * output_dim, bias=False)
        self.bn = GBN(2 * output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.fc(x))
        return torch.mul(x[:, :self.output_dim], torch.sigmoid(x[:, self.output_dim:]))


class GLU_Block(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, n_glu: int = 2, first: bool = False,
                 shared_layers: nn.ModuleList | None = None) -> None:
        super().__init__()
        self.first = first
        self.n_glu = n_glu
        self.glu_layers = nn.ModuleList()
        for glu_id in range(n_glu):
            fc = shared_layers[glu_id] if shared_layers else None
            self.glu_layers.append(GLU_Layer(input_dim if glu_id == 0 else output_dim, output_dim, fc=fc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt(torch.FloatTensor([0.5]).to(x.device))
        if self.first:
            x = self.glu_layers[0](x)
            layers_left = range(1, self.n_glu)
        else:
            layers_left = range(self.n_glu)
        for glu_id in layers_left:
            x = torch.add(x, self.glu_layers[glu_id](x))
            x = x * scale
        return x


class FeatTransformer(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, shared_layers: nn.ModuleList, n_glu_independent: int) -> None:
        super().__init__()
        self.shared = GLU_Block(input_dim, output_dim, first=True, shared_layers=shared_layers,
                                n_glu=len(shared_layers))
        self.specifics = GLU_Block(output_dim, output_dim, first=False, n_glu=n_glu_independent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.specifics(self.shared(x))


class AttentiveTransformer(nn.Module):
    def __init__(self, input_dim: int, group_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(input_dim, group_dim, bias=False)
        self.bn = GBN(group_dim)
        self.selector = nn.Softmax(dim=-1)

    def forward(self, priors: torch.Tensor, processed_feat: torch.Tensor) -> torch.Tensor:
        return self.selector(torch.mul(self.bn(self.fc(processed_feat)), priors))


class TabNetEncoder(nn.Module):
    def __init__(self, input_dim: int, n_d: int = 4, n_a: int = 4, n_steps: int = 2, gamma: float = 1.3,
                 n_independent: int = 2, n_shared: int = 2) -> None:
        super().__init__()
        self.n_d, self.n_steps, self.gamma, self.attention_dim = n_d, n_steps, gamma, input_dim
        self.initial_bn = nn.BatchNorm1d(input_dim, momentum=0.01)
        self.register_buffer("group_attention_matrix", torch.eye(input_dim))
        shared_feat_transform = nn.ModuleList(
            nn.Linear(input_dim if i == 0 else n_d + n_a, 2 * (n_d + n_a), bias=False) for i in range(n_shared))
        self.initial_splitter = FeatTransformer(input_dim, n_d + n_a, shared_feat_transform, n_independent)
        self.feat_transformers = nn.ModuleList(
            FeatTransformer(input_dim, n_d + n_a, shared_feat_transform, n_independent) for _ in range(n_steps))
        self.att_transformers = nn.ModuleList(AttentiveTransformer(n_a, self.attention_dim) for _ in range(n_steps))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.initial_bn(x)
        prior = torch.ones((x.shape[0], self.attention_dim)).to(x.device)
        att = self.initial_splitter(x)[:, self.n_d:]
        steps_output = []
        for step in range(self.n_steps):
            M = self.att_transformers[step](prior, att)
            prior = torch.mul(self.gamma - M, prior)
            masked_x = torch.mul(torch.matmul(M, self.group_attention_matrix), x)
            out = self.feat_transformers[step](masked_x)
            steps_output.append(nn.ReLU()(out[:, :self.n_d]))
            att = out[:, self.n_d:]
        return steps_output


class TabNetNoEmbeddings(nn.Module):
    def __init__(self, input_dim: int = 6, output_dim: int = 3, n_d: int = 4) -> None:
        super().__init__()
        self.encoder = TabNetEncoder(input_dim, n_d=n_d)
        self.final_mapping = nn.Linear(n_d, output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_mapping(torch.sum(torch.stack(self.encoder(x), dim=0), dim=0))


def _feat_transformer(prefix: str, block: str) -> list[str]:
    return [f"encoder.{prefix}.{block}.glu_layers.{i}.bn.bn" for i in (0, 1)]


_TABNET_TRANSFORMERS = ("initial_splitter", "feat_transformers.0", "feat_transformers.1")
# The independent GLU layers' and the attentive transformers' BNs follow a Linear of their own, read by the
# BN alone (through a chunk into one virtual batch and a cat of one): they fold. The shared Linears are
# called by all three feature transformers, each call followed by a different BN: kept (in ONNX each call is
# its own MatMul, and they fold). initial_bn normalizes the input, read by the splitter's first Linear and by
# every step's mask multiply: kept.
TABNET_BN = frozenset([*(name for t in _TABNET_TRANSFORMERS for name in _feat_transformer(t, "specifics")),
                       *(f"encoder.att_transformers.{i}.bn.bn" for i in (0, 1))])
_SHARED = "and not every call is followed by"
TABNET_KEPT = {"encoder.initial_bn": "there is no layer before it to fold into",
               **{name: _SHARED for t in _TABNET_TRANSFORMERS for name in _feat_transformer(t, "shared")}}
# In ONNX each call of a shared Linear is a MatMul node of its own: it can take its own copy of the weight.
TABNET_ONNX_KEPT = {"encoder.initial_bn": "graph input"}

# ---------------------------------------------------------------------------------------------------------
# 8. MobileOne (apple/ml-mobileone), train-time form: each block sums num_conv_branches conv+BN branches, a
#    1x1 conv+BN scale branch (for k > 1) and a BN-only skip branch on the block's input (where shapes
#    match), `out = scale_out + identity_out` then `out += branch`, an SE on the sum, ReLU; depthwise k x k
#    blocks then pointwise 1x1 blocks
# ---------------------------------------------------------------------------------------------------------


class MobileOneSE(nn.Module):
    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, max(int(in_channels * rd_ratio), 2), 1, 1, bias=True)
        self.expand = nn.Conv2d(max(int(in_channels * rd_ratio), 2), in_channels, 1, 1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, c, h, w = inputs.size()
        x = F.avg_pool2d(inputs, kernel_size=[h, w])
        x = torch.sigmoid(self.expand(F.relu(self.reduce(x))))
        return inputs * x.view(-1, c, 1, 1)


class MobileOneBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, use_se: bool = False, num_conv_branches: int = 1) -> None:
        super().__init__()
        self.groups, self.stride, self.kernel_size = groups, stride, kernel_size
        self.in_channels, self.out_channels, self.num_conv_branches = in_channels, out_channels, num_conv_branches
        self.se = MobileOneSE(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip = nn.BatchNorm2d(in_channels) if out_channels == in_channels and stride == 1 else None
        self.rbr_conv = nn.ModuleList(self._conv_bn(kernel_size, padding) for _ in range(num_conv_branches))
        self.rbr_scale = self._conv_bn(1, 0) if kernel_size > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))

    def _conv_bn(self, kernel_size: int, padding: int) -> nn.Sequential:
        mod_list = nn.Sequential()
        mod_list.add_module("conv", nn.Conv2d(self.in_channels, self.out_channels, kernel_size, self.stride, padding,
                                              groups=self.groups, bias=False))
        mod_list.add_module("bn", nn.BatchNorm2d(self.out_channels))
        return mod_list


class MobileOne(nn.Module):
    def __init__(self, num_conv_branches: int = 2) -> None:
        super().__init__()
        self.k = num_conv_branches
        self.in_planes = 8
        self.stage0 = MobileOneBlock(3, self.in_planes, 3, stride=2, padding=1)
        self.stage1 = self._make_stage(16, 2, num_se_blocks=0)
        self.stage2 = self._make_stage(24, 1, num_se_blocks=1)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(24, 5)

    def _make_stage(self, planes: int, num_blocks: int, num_se_blocks: int) -> nn.Sequential:
        strides = [2] + [1] * (num_blocks - 1)
        blocks = []
        for ix, stride in enumerate(strides):
            use_se = ix >= num_blocks - num_se_blocks
            blocks.append(MobileOneBlock(self.in_planes, self.in_planes, 3, stride, 1, groups=self.in_planes,
                                         use_se=use_se, num_conv_branches=self.k))
            blocks.append(MobileOneBlock(self.in_planes, planes, 1, 1, 0, use_se=use_se, num_conv_branches=self.k))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stage0(x)))
        return self.linear(self.gap(x).view(x.size(0), -1))


def _mobileone_block(prefix: str, branches: int, scale: bool) -> list[str]:
    return [f"{prefix}.rbr_conv.{i}.bn" for i in range(branches)] + ([f"{prefix}.rbr_scale.bn"] if scale else [])


# Every conv branch's BN and the scale branch's BN follow a conv read by it alone (the sum comes after the
# BN); the skip branch's BN normalizes the block's input (a ReLU output) and feeds the sum beside convs that
# read that input with stride 1 and centred padding: it folds into the centre tap of the first of them
# (stage1.2's depthwise 1x1 scale conv, stage1.3's 1x1 conv, through its `0 + identity_out`).
MOBILEONE_BN = frozenset([*_mobileone_block("stage0", 1, True), *_mobileone_block("stage1.0", 2, True),
                          *_mobileone_block("stage1.1", 2, False), *_mobileone_block("stage1.2", 2, True),
                          *_mobileone_block("stage1.3", 2, False), *_mobileone_block("stage2.0", 2, True),
                          *_mobileone_block("stage2.1", 2, False), "stage1.2.rbr_skip", "stage1.3.rbr_skip"])

# ---------------------------------------------------------------------------------------------------------
# The entries
# ---------------------------------------------------------------------------------------------------------


def levit() -> nn.Module:
    return _build(LeViT, 80)


def ecapa_tdnn() -> nn.Module:
    return _build(ECAPA_TDNN, 81)


def xception() -> nn.Module:
    return _build(Xception, 82)


def pspnet() -> nn.Module:
    return _build(PSPNet, 83)


def cbam() -> nn.Module:
    return _build(CbamResNet, 84)


def cnn14() -> nn.Module:
    return _build(Cnn14, 85)


def tabnet() -> nn.Module:
    return _build(TabNetNoEmbeddings, 86)


def mobileone() -> nn.Module:
    return _build(MobileOne, 87)


# CBAM's channel gate and MobileOne's SE pool with kernels read from x.size(): the TorchScript-based ONNX
# exporter takes them as constants only with a fixed batch.
ROUND4 = [
    ZooModel("levit", levit, (1, 3, 16, 16),
             "Conv2d_BN/Linear_BN Sequential subclasses, BN over flattened tokens, attention biases indexed by a "
             "buffer, AttentionSubsample, BN_Linear heads (fold forward)", LEVIT_BN),
    ZooModel("ecapa_tdnn", ecapa_tdnn, (1, 32, 8),
             "reflect-padded Conv1d, conv -> ReLU -> BN, Res2Net chunks, SE-1d, MFA cat, attentive statistics "
             "pooling, asp_bn -> 1x1 fc (fold forward), BN1d over a transposed embedding -> Linear",
             ECAPA_BN, ECAPA_KEPT),
    ZooModel("xception", xception, (1, 3, 32, 32),
             "separable convs (depthwise, pointwise, BN), one inplace ReLU module at several places, strided "
             "blocks with max-pool and a 1x1 conv+BN skip, x += skip", XCEPTION_BN),
    ZooModel("pspnet", pspnet, (1, 3, 48, 48),
             "deep-base stem, dilated convs, pyramid pooling (adaptive pools to 1/2/3/6, 1x1 conv+BN, bilinear "
             "align_corners upsample, cat), an aux head unused in eval", PSPNET_BN, PSPNET_KEPT),
    ZooModel("cbam", cbam, (1, 3, 32, 32),
             "CBAM after bn2: shared MLP on avg- and max-pooled maps, channel pool into a 7x7 conv + BN(1)",
             CBAM_BN, onnx_dynamic_batch=False),
    ZooModel("cnn14", cnn14, (1, 1, 16, 8),
             "bn0 over the mel axis through transposes before a zero-padded conv, ConvBlocks with F.relu_",
             CNN14_BN, CNN14_KEPT),
    ZooModel("tabnet", tabnet, (1, 6),
             "initial BN1d on raw features, ghost BN (chunk, BN per chunk, cat), GLU halves, Linears shared by "
             "every feature transformer with a BN per call", TABNET_BN, TABNET_KEPT, TABNET_ONNX_KEPT,
             pt2_skip="torch.export cannot keep the batch dynamic: GBN's chunk count np.ceil(batch / 128) "
                      "specializes it"),
    ZooModel("mobileone", mobileone, (1, 3, 16, 16),
             "train-time reparameterizable blocks: k conv+BN branches, 1x1 conv+BN scale branch, BN-only skip "
             "branch, summed in place; depthwise then pointwise; SE", MOBILEONE_BN,
             onnx_dynamic_batch=False),
]
BY_NAME = {entry.name: entry for entry in ROUND4}


def entries(names: list[str] | None = None, **marked: dict[str, str]) -> list:
    return acceptance.marked_params(BY_NAME, names, **marked)


# ---------------------------------------------------------------------------------------------------------
# Fold
# ---------------------------------------------------------------------------------------------------------


def test_ground_truth_covers_every_bn() -> None:
    more.assert_ground_truth_covers_every_bn(ROUND4)


# GBN's `x.chunk(ceil(batch / 128), 0)` is one chunk at these batches: chunk -> getitem 0 -> BN -> cat of one.
GHOST_BN_ONNX = {"tabnet": "the one-piece chunk exports as a Slice on axis 0 whose end is computed from Shape "
                           "(the batch size): bnfold does not prove that it slices the whole batch"}
CONVERTER_GUARDS = {"cbam": "torch.export cannot convert the trace: ChannelGate's pool kernel (x.size(2), "
                            "x.size(3)) becomes symbols it cannot solve (Eq(16*((x/8)//4) - 16, 0))"}
PT2_SKIP = {entry.name: entry.pt2_skip for entry in ROUND4 if entry.pt2_skip}


@pytest.mark.parametrize("entry", entries())
def test_fold_eager(entry: ZooModel) -> None:
    more.test_fold_eager(entry)


@pytest.mark.parametrize("entry", entries(xfail=GHOST_BN_ONNX))
def test_fold_onnx(entry: ZooModel, tmp_path: Path) -> None:
    acceptance.test_fold_onnx_export(acceptance.OnnxCase(entry, tmp_path))


@pytest.mark.parametrize("entry", entries(skip=PT2_SKIP))
def test_fold_pt2(entry: ZooModel, tmp_path: Path) -> None:
    if entry.name == "pspnet":  # the program holds no op of the aux head, so no decision on its BN either
        entry = dataclasses.replace(entry, kept={})
    acceptance.test_fold_pt2_dynamic_batch(entry, tmp_path)


@pytest.mark.parametrize("entry", entries(xfail=CONVERTER_GUARDS))
def test_fold_torchscript(entry: ZooModel) -> None:
    """The model traced at batch 2 folds as the eager one does and runs at batches 2 and 3."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(entry.factory(), entry.example(batch=2))
    report = bnfold.fold(traced, input_shape=entry.shape_text(batch=2))
    acceptance.assert_decisions(report, entry)
    acceptance.assert_verified(report)
    more.assert_kept_reasons(report, entry)
    for batch in (2, 3):
        x = entry.example(batch=batch, seed=7)
        assert rel_error(forward(entry.factory(), x), forward(report.folded_model.module, x)) <= REL_TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# Recalibrate and inspect
# ---------------------------------------------------------------------------------------------------------

METHODS = ["exact", "fast"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", entries())
def test_recalibrate_eager(entry: ZooModel, method: str) -> None:
    """Every layer the data reaches holds the oracle's statistics; PSPNet's aux head (training only) is
    skipped as never reached."""
    found = patterns._oracle(entry, method, ddof=1)
    report = bnfold.recalibrate(entry.factory(), calibration_data(entry), method=method, batch_size=BATCH)
    assert_skipped(report, {name: NEVER_REACHED for name in unreached(entry, found, set())})
    assert set(found.statistics) == set(entry.bn_layers) - ({"aux.1"} if entry.name == "pspnet" else set())
    assert_recalibrated(report, module_statistics(report.result.module, found), found)
    x = probe_input(entry)
    assert rel_error(outputs(found.reference_model(), x.double()), outputs(report.result.module, x)) <= OUTPUT_TOLERANCE


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", entries())
def test_recalibrate_onnx(entry: ZooModel, method: str, tmp_path: Path) -> None:
    """The export with BN kept (a fixed-batch export takes one batch of calibration data at a time)."""
    proto = onnx_export(entry, tmp_path)
    found = patterns._oracle(entry, method, ddof=0, per_call=True)
    report = bnfold.recalibrate(proto, calibration_data(entry), method=method, batch_size=BATCH)
    assert_skipped(report, {})
    assert_recalibrated(report, onnx_statistics(report.result.proto, entry, set()), found)
    x = probe_input(entry, batch=4 if entry.onnx_dynamic_batch else BATCH)
    (actual,) = acceptance.ort_session(report.result.proto.SerializeToString()).run(None, {"input": x.numpy()})
    assert rel_error(found.outputs(x), actual) <= OUTPUT_TOLERANCE


@pytest.mark.parametrize("entry", entries())
def test_inspect_lists_every_bn_with_its_channels(entry: ZooModel) -> None:
    more.test_inspect_lists_every_bn_with_its_channels(entry)
