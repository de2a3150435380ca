"""A fifth round of upstream-style architectures, folded, recalibrated and inspected per format.

Each model re-creates, at toy size, the way its upstream project writes it (huawei-noah's GhostNet,
DingXiaoH's Diverse Branch Block in its train-time form, torchaudio's Conformer, ESPNet with ENet's
bottlenecks, WangYueFt's DGCNN, xuebinqin's U^2-Net, dyhan0920's PyramidNet, timm's CondConv), with the
hand-derived set of BN layers that fold exactly and the reason each other one is kept. They are checked as
test_zoo_round4.py checks its models (fold eager/ONNX/.pt2/TorchScript at another batch size, recalibrate
exact and fast against the oracle, inspect).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
import tests.test_zoo_acceptance as acceptance
import tests.test_zoo_more as more
import tests.test_zoo_round4 as round4
from tests.test_zoo_acceptance import REL_TOLERANCE, forward, rel_error
from tests.zoo import BatchNormAct2d, ZooModel, _build

# ---------------------------------------------------------------------------------------------------------
# 1. GhostNet (huawei-noah/Efficient-AI-Backbones ghostnet.py): GhostModule = primary conv+BN(+ReLU) and a
#    cheap depthwise conv+BN(+ReLU) on its output, cat, then `[:, :self.oup]` (an odd oup drops a cheap
#    channel); SqueezeExcite gated by hard_sigmoid (F.relu6(x + 3) / 6); ghost bottlenecks with a depthwise
#    stride-2 conv_dw+bn_dw between the ghost modules and a depthwise+pointwise conv shortcut, `x +=`
# ---------------------------------------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def hard_sigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    if inplace:
        return x.add_(3.).clamp_(0., 6.).div_(6.)
    return F.relu6(x + 3.) / 6.


class SqueezeExcite(nn.Module):
    def __init__(self, in_chs: int, se_ratio: float = 0.25, divisor: int = 4) -> None:
        super().__init__()
        self.gate_fn = hard_sigmoid
        reduced_chs = _make_divisible(in_chs * se_ratio, divisor)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(in_chs, reduced_chs, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced_chs, in_chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.conv_expand(self.act1(self.conv_reduce(self.avg_pool(x))))
        return x * self.gate_fn(x_se)


class GhostConvBnAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostModule(nn.Module):
    def __init__(self, inp: int, oup: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3, stride: int = 1,
                 relu: bool = True) -> None:
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels), nn.ReLU(inplace=True) if relu else nn.Sequential())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels), nn.ReLU(inplace=True) if relu else nn.Sequential())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.oup, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.) -> None:
        super().__init__()
        self.stride = stride
        self.ghost1 = GhostModule(in_chs, mid_chs, relu=True)
        if self.stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride,
                                     padding=(dw_kernel_size - 1) // 2, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se = SqueezeExcite(mid_chs, se_ratio=se_ratio) if se_ratio > 0. else None
        self.ghost2 = GhostModule(mid_chs, out_chs, relu=False)
        if in_chs == out_chs and self.stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, padding=(dw_kernel_size - 1) // 2,
                          groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.ghost1(x)
        if self.stride > 1:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(residual)
        return x


class GhostNet(nn.Module):
    # k, t (expansion), c, SE ratio, s: the upstream cfgs layout, one block per stage
    cfgs = [[[3, 8, 8, 0, 1]], [[3, 24, 12, 0, 2]], [[3, 36, 12, 0.25, 1]], [[5, 36, 15, 0.25, 2]]]

    def __init__(self, num_classes: int = 5, width: float = 1.0) -> None:
        super().__init__()
        output_channel = _make_divisible(8 * width, 4)
        self.conv_stem = nn.Conv2d(3, output_channel, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(output_channel)
        self.act1 = nn.ReLU(inplace=True)
        input_channel = output_channel
        stages = []
        for cfg in self.cfgs:
            layers = []
            for k, exp_size, c, se_ratio, s in cfg:
                output_channel = c  # odd widths (15) keep the ghost slice dropping a channel
                hidden_channel = _make_divisible(exp_size * width, 4)
                layers.append(GhostBottleneck(input_channel, hidden_channel, output_channel, k, s, se_ratio=se_ratio))
                input_channel = output_channel
            stages.append(nn.Sequential(*layers))
        stages.append(nn.Sequential(GhostConvBnAct(input_channel, 24, 1)))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.conv_head = nn.Conv2d(24, 32, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x)))
        return self.classifier(x.view(x.size(0), -1))


def _ghost_bottleneck(prefix: str, stride: int, shortcut: bool) -> list[str]:
    names = [f"{prefix}.ghost{g}.{part}.1" for g in (1, 2) for part in ("primary_conv", "cheap_operation")]
    return names + ([f"{prefix}.bn_dw"] if stride > 1 else []) + (
        [f"{prefix}.shortcut.1", f"{prefix}.shortcut.3"] if shortcut else [])


# Every BN follows a conv that only it reads: the primary BN's output is also read by the cheap conv and the
# cat, and the cheap BN's last channel is sliced away, after the BN; the shortcut's depthwise BN by its
# pointwise conv. The SE multiply, the slices and the in-place adds come after the BNs.
GHOSTNET_BN = frozenset(["bn1", *_ghost_bottleneck("blocks.0.0", 1, False), *_ghost_bottleneck("blocks.1.0", 2, True),
                         *_ghost_bottleneck("blocks.2.0", 1, False), *_ghost_bottleneck("blocks.3.0", 2, True),
                         "blocks.4.0.bn1"])

# ---------------------------------------------------------------------------------------------------------
# 2. Diverse Branch Block (DingXiaoH/DiverseBranchBlock diversebranchblock.py), train-time form: the sum of
#    a kxk conv+BN, a 1x1 conv+BN, a 1x1 conv -> BNAndPadLayer -> AvgPool -> BN branch, and a 1x1
#    IdentityBasedConv1x1 (kernel = weight + an identity tensor, at run time) -> BNAndPadLayer -> unpadded
#    kxk conv -> BN branch, summed in place, then the nonlinearity. BNAndPadLayer normalizes, zero-pads,
#    and overwrites the border with the BN's own image of zero, computed from its parameters at run time
#    (so the padded map is BN(pad(x))). A depthwise block (groups == channels) averages its input directly
#    (a padded AvgPool -> BN) and uses a plain 1x1 conv of twice the channels before its kxk conv.
# ---------------------------------------------------------------------------------------------------------


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
            dilation: int = 1, groups: int = 1) -> nn.Sequential:
    se = nn.Sequential()
    se.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                    bias=False))
    se.add_module("bn", nn.BatchNorm2d(num_features=out_channels, affine=True))
    return se


class IdentityBasedConv1x1(nn.Conv2d):
    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = np.zeros((channels, input_dim, 1, 1))
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = torch.from_numpy(id_value).type_as(self.weight)
        nn.init.normal_(self.weight, std=0.1)  # zeros upstream: trained weights are not

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


class BNAndPadLayer(nn.Module):
    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                    self.bn.running_var + self.bn.eps)
            else:
                pad_values = - self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


class DiverseBranchBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size, self.out_channels, self.groups = kernel_size, out_channels, groups
        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        internal_channels_1x1_3x3 = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal_channels_1x1_3x3 == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(channels=in_channels, groups=groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal_channels_1x1_3x3, 1, 1, 0,
                                                           groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=internal_channels_1x1_3x3))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal_channels_1x1_3x3, out_channels, kernel_size, stride,
                                                       0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class DBBNet(nn.Module):
    """DBB blocks in place of a small MobileNet's convs: dense stride 2, depthwise, dense."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = DiverseBranchBlock(3, 8, 3, stride=2, padding=1, nonlinear=nn.ReLU())
        self.dw = DiverseBranchBlock(8, 8, 3, stride=1, padding=1, groups=8, nonlinear=nn.ReLU())
        self.pw = DiverseBranchBlock(8, 12, 3, stride=1, padding=1, nonlinear=nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.pw(self.dw(self.stem(x))), 1).flatten(1))


def _dbb(prefix: str, depthwise: bool) -> list[str]:
    names = [f"{prefix}.dbb_origin.bn", f"{prefix}.dbb_1x1_kxk.bn2"]
    return names + ([] if depthwise else [f"{prefix}.dbb_1x1.bn"])


DBB_BN = frozenset([*_dbb("stem", False), *_dbb("dw", True), *_dbb("pw", False)])

# Every conv+BN pair folds, BNAndPadLayer's too: its conv's output is read by the BN alone, and the border
# values it writes after the pad are computed from the BN's parameters, which a fold leaves as they are
# (the depthwise block's plain 1x1 conv takes its bn1). IdentityBasedConv1x1 adds the identity to its
# weight at run time: its bn1 is kept (in ONNX the sum is a constant subgraph of initializers, and it
# folds). Each avgbn normalizes an average pool.
DBB_BN = frozenset([*_dbb("stem", False), *_dbb("dw", True), *_dbb("pw", False), "stem.dbb_avg.bn.bn",
                    "pw.dbb_avg.bn.bn", "dw.dbb_1x1_kxk.bn1.bn"])
_RUN_TIME_WEIGHT = "computes its weight at run time"
_NOT_A_LAYER = "not a conv or linear layer"
DBB_KEPT = {**{f"{block}.dbb_avg.avgbn": _NOT_A_LAYER for block in ("stem", "dw", "pw")},
            **{f"{block}.dbb_1x1_kxk.bn1.bn": _RUN_TIME_WEIGHT for block in ("stem", "pw")}}
DBB_ONNX_KEPT = {f"{block}.dbb_avg.avgbn": "nothing to fold into" for block in ("stem", "dw", "pw")}
# BNAndPadLayer reads its BN's statistics outside the BN op too (the border values), folded or not.
STATISTICS_READ_ELSEWHERE = {"dbb": frozenset(["stem.dbb_avg.bn.bn", "pw.dbb_avg.bn.bn", "dw.dbb_1x1_kxk.bn1.bn"])}

# ---------------------------------------------------------------------------------------------------------
# 3. Conformer (torchaudio.models.conformer): ConformerLayer on (T, B, D) = half-step feed-forward (LayerNorm,
#    Linear, SiLU, Linear; `x * 0.5 + residual`), nn.MultiheadAttention, the convolution module (LayerNorm,
#    transpose to (B, D, T), pointwise Conv1d -> GLU(dim=1) -> depthwise Conv1d -> BatchNorm1d -> SiLU ->
#    pointwise Conv1d, transpose back; torchaudio transposes (T, B, D) <-> (B, T, D) around it), a second
#    feed-forward and a final LayerNorm; the Conformer transposes its (B, T, D) input to (T, B, D) and back
# ---------------------------------------------------------------------------------------------------------


class _ConvolutionModule(nn.Module):
    def __init__(self, input_dim: int, num_channels: int, depthwise_kernel_size: int, dropout: float = 0.0,
                 bias: bool = False) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(input_dim)
        self.sequential = nn.Sequential(
            nn.Conv1d(input_dim, 2 * num_channels, 1, stride=1, padding=0, bias=bias),
            nn.GLU(dim=1),
            nn.Conv1d(num_channels, num_channels, depthwise_kernel_size, stride=1,
                      padding=(depthwise_kernel_size - 1) // 2, groups=num_channels, bias=bias),
            nn.BatchNorm1d(num_channels),
            nn.SiLU(),
            nn.Conv1d(num_channels, input_dim, kernel_size=1, stride=1, padding=0, bias=bias),
            nn.Dropout(dropout))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(input).transpose(1, 2)
        return self.sequential(x).transpose(1, 2)


class _FeedForwardModule(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.sequential = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, hidden_dim, bias=True),
                                        nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, input_dim, bias=True),
                                        nn.Dropout(dropout))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.sequential(input)


class ConformerLayer(nn.Module):
    def __init__(self, input_dim: int, ffn_dim: int, num_attention_heads: int, depthwise_conv_kernel_size: int,
                 dropout: float = 0.0, convolution_first: bool = False) -> None:
        super().__init__()
        self.ffn1 = _FeedForwardModule(input_dim, ffn_dim, dropout=dropout)
        self.self_attn_layer_norm = nn.LayerNorm(input_dim)
        self.self_attn = nn.MultiheadAttention(input_dim, num_attention_heads, dropout=dropout)
        self.self_attn_dropout = nn.Dropout(dropout)
        self.conv_module = _ConvolutionModule(input_dim, input_dim, depthwise_conv_kernel_size, dropout=dropout)
        self.ffn2 = _FeedForwardModule(input_dim, ffn_dim, dropout=dropout)
        self.final_layer_norm = nn.LayerNorm(input_dim)
        self.convolution_first = convolution_first

    def _apply_convolution(self, input: torch.Tensor) -> torch.Tensor:
        residual = input
        input = self.conv_module(input.transpose(0, 1)).transpose(0, 1)
        return residual + input

    def forward(self, input: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        residual = input
        x = self.ffn1(input)
        x = x * 0.5 + residual
        if self.convolution_first:
            x = self._apply_convolution(x)
        residual = x
        x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.self_attn_dropout(x) + residual
        if not self.convolution_first:
            x = self._apply_convolution(x)
        residual = x
        x = self.ffn2(x)
        x = x * 0.5 + residual
        return self.final_layer_norm(x)


class Conformer(nn.Module):
    def __init__(self, input_dim: int = 8, num_heads: int = 2, ffn_dim: int = 16, num_layers: int = 2,
                 depthwise_conv_kernel_size: int = 5) -> None:
        super().__init__()
        self.conformer_layers = nn.ModuleList(
            ConformerLayer(input_dim, ffn_dim, num_heads, depthwise_conv_kernel_size,
                           convolution_first=bool(i % 2)) for i in range(num_layers))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input.transpose(0, 1)
        for layer in self.conformer_layers:
            x = layer(x, None)
        return x.transpose(0, 1)


# Each BatchNorm1d normalizes the depthwise Conv1d's output (zero padding is the conv's, before it), read by
# the BN alone: it folds; the SiLU comes after.
CONFORMER_BN = frozenset(f"conformer_layers.{i}.conv_module.sequential.3" for i in (0, 1))

# ---------------------------------------------------------------------------------------------------------
# 4. ESPNet (sacmehta/ESPNet Model.py) with ENet's (davidtvs/PyTorch-ENet) initial block and asymmetric
#    bottleneck: CBR/BR/C/CDilated modules with PReLU; the ESP downsampler and residual block (a 1x1 or
#    strided reduce conv, five dilated convs, hierarchical sums `add2 = add1 + d4`, cat, `input + combine`,
#    BN over the cat); an input projection (average pools of the image) cat with features -> BR; ENet's
#    initial block (cat of a strided conv and a max-pool of the image -> BN -> PReLU) and its bottleneck
#    with a (k, 1) then (1, k) conv, each + BN + PReLU, `main + ext`
# ---------------------------------------------------------------------------------------------------------


class CBR(nn.Module):
    def __init__(self, nIn: int, nOut: int, kSize: int, stride: int = 1) -> None:
        super().__init__()
        padding = int((kSize - 1) / 2)
        self.conv = nn.Conv2d(nIn, nOut, (kSize, kSize), stride=stride, padding=(padding, padding), bias=False)
        self.bn = nn.BatchNorm2d(nOut, eps=1e-03)
        self.act = nn.PReLU(nOut)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(input)))


class BR(nn.Module):
    def __init__(self, nOut: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(nOut, eps=1e-03)
        self.act = nn.PReLU(nOut)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(input))


class C(nn.Module):
    def __init__(self, nIn: int, nOut: int, kSize: int, stride: int = 1) -> None:
        super().__init__()
        padding = int((kSize - 1) / 2)
        self.conv = nn.Conv2d(nIn, nOut, (kSize, kSize), stride=stride, padding=(padding, padding), bias=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.conv(input)


class CDilated(nn.Module):
    def __init__(self, nIn: int, nOut: int, kSize: int, stride: int = 1, d: int = 1) -> None:
        super().__init__()
        padding = int((kSize - 1) / 2) * d
        self.conv = nn.Conv2d(nIn, nOut, (kSize, kSize), stride=stride, padding=(padding, padding), bias=False,
                              dilation=d)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.conv(input)


class _EspBranches(nn.Module):
    """The five dilated convs both ESP modules build alike (upstream repeats these lines in each)."""

    def __init__(self, nIn: int, nOut: int, reduce_kernel: int, reduce_stride: int) -> None:
        super().__init__()
        n = int(nOut / 5)
        n1 = nOut - 4 * n
        self.c1 = C(nIn, n, reduce_kernel, reduce_stride)
        self.d1 = CDilated(n, n1, 3, 1, 1)
        self.d2 = CDilated(n, n, 3, 1, 2)
        self.d4 = CDilated(n, n, 3, 1, 4)
        self.d8 = CDilated(n, n, 3, 1, 8)
        self.d16 = CDilated(n, n, 3, 1, 16)

    def combine(self, input: torch.Tensor) -> torch.Tensor:
        output1 = self.c1(input)
        d1 = self.d1(output1)
        d2 = self.d2(output1)
        d4 = self.d4(output1)
        d8 = self.d8(output1)
        d16 = self.d16(output1)
        add1 = d2
        add2 = add1 + d4
        add3 = add2 + d8
        add4 = add3 + d16
        return torch.cat([d1, add1, add2, add3, add4], 1)


class DownSamplerB(_EspBranches):
    def __init__(self, nIn: int, nOut: int) -> None:
        super().__init__(nIn, nOut, 3, 2)
        self.bn = nn.BatchNorm2d(nOut, eps=1e-3)
        self.act = nn.PReLU(nOut)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.combine(input)))


class DilatedParllelResidualBlockB(_EspBranches):
    def __init__(self, nIn: int, nOut: int, add: bool = True) -> None:
        super().__init__(nIn, nOut, 1, 1)
        self.bn = BR(nOut)
        self.add = add

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        combine = self.combine(input)
        if self.add:
            combine = input + combine
        return self.bn(combine)


class InputProjectionA(nn.Module):
    def __init__(self, samplingTimes: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList(nn.AvgPool2d(3, stride=2, padding=1) for _ in range(samplingTimes))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        for pool in self.pool:
            input = pool(input)
        return input


class InitialBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bias: bool = False, relu: bool = True) -> None:
        super().__init__()
        activation = nn.ReLU if relu else nn.PReLU
        self.main_branch = nn.Conv2d(in_channels, out_channels - 3, kernel_size=3, stride=2, padding=1, bias=bias)
        self.ext_branch = nn.MaxPool2d(3, stride=2, padding=1)
        self.batch_norm = nn.BatchNorm2d(out_channels)
        self.out_activation = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.main_branch(x), self.ext_branch(x)), 1)
        return self.out_activation(self.batch_norm(out))


class RegularBottleneck(nn.Module):
    def __init__(self, channels: int, internal_ratio: int = 4, kernel_size: int = 3, padding: int = 0,
                 dilation: int = 1, asymmetric: bool = False, dropout_prob: float = 0, bias: bool = False,
                 relu: bool = True) -> None:
        super().__init__()
        internal_channels = channels // internal_ratio
        activation = nn.ReLU if relu else nn.PReLU
        self.ext_conv1 = nn.Sequential(
            nn.Conv2d(channels, internal_channels, kernel_size=1, stride=1, bias=bias),
            nn.BatchNorm2d(internal_channels), activation())
        if asymmetric:
            self.ext_conv2 = nn.Sequential(
                nn.Conv2d(internal_channels, internal_channels, kernel_size=(kernel_size, 1), stride=1,
                          padding=(padding, 0), dilation=dilation, bias=bias),
                nn.BatchNorm2d(internal_channels), activation(),
                nn.Conv2d(internal_channels, internal_channels, kernel_size=(1, kernel_size), stride=1,
                          padding=(0, padding), dilation=dilation, bias=bias),
                nn.BatchNorm2d(internal_channels), activation())
        else:
            self.ext_conv2 = nn.Sequential(
                nn.Conv2d(internal_channels, internal_channels, kernel_size=kernel_size, stride=1, padding=padding,
                          dilation=dilation, bias=bias),
                nn.BatchNorm2d(internal_channels), activation())
        self.ext_conv3 = nn.Sequential(
            nn.Conv2d(internal_channels, channels, kernel_size=1, stride=1, bias=bias),
            nn.BatchNorm2d(channels), activation())
        self.ext_regul = nn.Dropout2d(p=dropout_prob)
        self.out_activation = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = x
        ext = self.ext_regul(self.ext_conv3(self.ext_conv2(self.ext_conv1(x))))
        return self.out_activation(main + ext)


class ESPNet(nn.Module):
    """ESPNet-C's layout (level1, input projections, level2/level3, classifier) at toy widths, with ENet's
    initial block and an asymmetric bottleneck in level3."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.level1 = CBR(3, 8, 3, 2)
        self.sample1 = InputProjectionA(1)
        self.sample2 = InputProjectionA(2)
        self.b1 = BR(8 + 3)
        self.level2_0 = DownSamplerB(8 + 3, 20)
        self.level2 = nn.ModuleList([DilatedParllelResidualBlockB(20, 20)])
        self.b2 = BR(40 + 3)
        self.initial = InitialBlock(3, 8, relu=False)
        self.level3 = RegularBottleneck(43 + 8, internal_ratio=4, kernel_size=5, padding=2, asymmetric=True,
                                        relu=False)
        self.classifier = C(43 + 8, classes, 1, 1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output0 = self.level1(input)
        inp1 = self.sample1(input)
        inp2 = self.sample2(input)
        output0_cat = self.b1(torch.cat([output0, inp1], 1))
        output1_0 = self.level2_0(output0_cat)
        output1 = output1_0
        for layer in self.level2:
            output1 = layer(output1)
        output1_cat = self.b2(torch.cat([output1, output1_0, inp2], 1))
        enet = F.max_pool2d(self.initial(input), 2)
        return self.classifier(self.level3(torch.cat([output1_cat, enet], 1)))


# The CBR's BN and ENet's bottleneck BNs follow convs read by them alone. Every BN over a cat is kept: the
# ESP cats hold hierarchical sums that share a dilated conv's output across segments (d2 is both add1 and a
# term of add2, which the BN scales differently), the residual one adds the block's input; b1 and b2
# normalize cats of PReLU outputs and average pools; ENet's initial BN a cat of a conv and a max-pool. A
# PReLU follows each.
ESPNET_BN = frozenset(["level1.bn", "level3.ext_conv1.1", "level3.ext_conv2.1", "level3.ext_conv2.4",
                       "level3.ext_conv3.1"])
ESPNET_KEPT = {"b1.bn": _NOT_A_LAYER, "level2_0.bn": "level2_0.d2.conv's output also feeds",
               "level2.0.bn.bn": _NOT_A_LAYER, "b2.bn": _NOT_A_LAYER, "initial.batch_norm": _NOT_A_LAYER}

# ---------------------------------------------------------------------------------------------------------
# 5. ENet's encoder-decoder (davidtvs/PyTorch-ENet enet.py): DownsamplingBottleneck = MaxPool2d with
#    return_indices on the main branch, a 2x2 stride-2 conv+BN+PReLU ext branch, the main branch padded in
#    channels with torch.zeros built from ext.size(), `main + ext`; UpsamplingBottleneck = 1x1 conv+BN on the
#    main branch into MaxUnpool2d with those indices and output_size, ConvTranspose2d called with
#    output_size -> BN on the ext branch
# ---------------------------------------------------------------------------------------------------------


class DownsamplingBottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, internal_ratio: int = 4, return_indices: bool = False,
                 dropout_prob: float = 0, bias: bool = False, relu: bool = True) -> None:
        super().__init__()
        self.return_indices = return_indices
        internal_channels = in_channels // internal_ratio
        activation = nn.ReLU if relu else nn.PReLU
        self.main_max1 = nn.MaxPool2d(2, stride=2, return_indices=return_indices)
        self.ext_conv1 = nn.Sequential(
            nn.Conv2d(in_channels, internal_channels, kernel_size=2, stride=2, bias=bias),
            nn.BatchNorm2d(internal_channels), activation())
        self.ext_conv2 = nn.Sequential(
            nn.Conv2d(internal_channels, internal_channels, kernel_size=3, stride=1, padding=1, bias=bias),
            nn.BatchNorm2d(internal_channels), activation())
        self.ext_conv3 = nn.Sequential(
            nn.Conv2d(internal_channels, out_channels, kernel_size=1, stride=1, bias=bias),
            nn.BatchNorm2d(out_channels), activation())
        self.ext_regul = nn.Dropout2d(p=dropout_prob)
        self.out_activation = activation()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        max_indices = None
        if self.return_indices:
            main, max_indices = self.main_max1(x)
        else:
            main = self.main_max1(x)
        ext = self.ext_regul(self.ext_conv3(self.ext_conv2(self.ext_conv1(x))))
        n, ch_ext, h, w = ext.size()
        ch_main = main.size()[1]
        padding = torch.zeros(n, ch_ext - ch_main, h, w)
        if main.is_cuda:
            padding = padding.cuda()
        main = torch.cat((main, padding), 1)
        return self.out_activation(main + ext), max_indices


class UpsamplingBottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, internal_ratio: int = 4, dropout_prob: float = 0,
                 bias: bool = False, relu: bool = True) -> None:
        super().__init__()
        internal_channels = in_channels // internal_ratio
        activation = nn.ReLU if relu else nn.PReLU
        self.main_conv1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias),
                                        nn.BatchNorm2d(out_channels))
        self.main_unpool1 = nn.MaxUnpool2d(kernel_size=2)
        self.ext_conv1 = nn.Sequential(nn.Conv2d(in_channels, internal_channels, kernel_size=1, bias=bias),
                                       nn.BatchNorm2d(internal_channels), activation())
        self.ext_tconv1 = nn.ConvTranspose2d(internal_channels, internal_channels, kernel_size=2, stride=2, bias=bias)
        self.ext_tconv1_bnorm = nn.BatchNorm2d(internal_channels)
        self.ext_tconv1_activation = activation()
        self.ext_conv2 = nn.Sequential(nn.Conv2d(internal_channels, out_channels, kernel_size=1, bias=bias),
                                       nn.BatchNorm2d(out_channels))
        self.ext_regul = nn.Dropout2d(p=dropout_prob)
        self.out_activation = activation()

    def forward(self, x: torch.Tensor, max_indices: torch.Tensor, output_size: torch.Size) -> torch.Tensor:
        main = self.main_unpool1(self.main_conv1(x), max_indices, output_size=output_size)
        ext = self.ext_tconv1(self.ext_conv1(x), output_size=output_size)
        ext = self.ext_tconv1_activation(self.ext_tconv1_bnorm(ext))
        ext = self.ext_regul(self.ext_conv2(ext))
        return self.out_activation(main + ext)


class ENet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.initial_block = InitialBlock(3, 8, relu=True)
        self.downsample1_0 = DownsamplingBottleneck(8, 16, return_indices=True, relu=False)
        self.regular1_1 = RegularBottleneck(16, padding=1, relu=False)
        self.upsample4_0 = UpsamplingBottleneck(16, 8, relu=True)
        self.transposed_conv = nn.ConvTranspose2d(8, num_classes, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_size = x.size()
        x = self.initial_block(x)
        stage1_input_size = x.size()
        x, max_indices1_0 = self.downsample1_0(x)
        x = self.regular1_1(x)
        x = self.upsample4_0(x, max_indices1_0, output_size=stage1_input_size)
        return self.transposed_conv(x, output_size=input_size)


def _enet_convs(prefix: str, *parts: str) -> list[str]:
    return [f"{prefix}.{part}.1" for part in parts]


# Every bottleneck BN follows a conv only it reads (the unpooled main branch's 1x1 conv+BN before the unpool,
# the transposed conv's BN after a ConvTranspose2d sized by output_size); the initial block's BN normalizes a
# cat of a conv and a max-pool, a ReLU follows.
ENET_BN = frozenset([*_enet_convs("downsample1_0", "ext_conv1", "ext_conv2", "ext_conv3"),
                     *_enet_convs("regular1_1", "ext_conv1", "ext_conv2", "ext_conv3"),
                     *_enet_convs("upsample4_0", "main_conv1", "ext_conv1", "ext_conv2"),
                     "upsample4_0.ext_tconv1_bnorm"])
ENET_KEPT = {"initial_block.batch_norm": _NOT_A_LAYER}

# ---------------------------------------------------------------------------------------------------------
# 6. DGCNN (WangYueFt/dgcnn pytorch/model.py): knn by `topk` on negated pairwise distances, get_graph_feature
#    (idx + arange(batch) * num_points, view(-1), rows gathered from the (B*N, C) view, repeat, cat of
#    `feature - x` and x, permute), EdgeConv = Conv2d(k=1)+BN2d+LeakyReLU then max over the k neighbours,
#    cat of the four edge features -> Conv1d+BN1d, adaptive max and avg pools, Linear+BN1d heads. The BN
#    modules are attributes of the model (bn1..bn7) and the first five are also children of the Sequentials.
# ---------------------------------------------------------------------------------------------------------


def knn(x: torch.Tensor, k: int) -> torch.Tensor:
    inner = -2 * torch.matmul(x.transpose(2, 1), x)
    xx = torch.sum(x ** 2, dim=1, keepdim=True)
    pairwise_distance = -xx - inner - xx.transpose(2, 1)
    return pairwise_distance.topk(k=k, dim=-1)[1]


def get_graph_feature(x: torch.Tensor, k: int = 20, idx: torch.Tensor | None = None) -> torch.Tensor:
    batch_size = x.size(0)
    num_points = x.size(2)
    x = x.view(batch_size, -1, num_points)
    if idx is None:
        idx = knn(x, k=k)
    idx_base = torch.arange(0, batch_size, device=x.device).view(-1, 1, 1) * num_points
    idx = (idx + idx_base).view(-1)
    _, num_dims, _ = x.size()
    x = x.transpose(2, 1).contiguous()
    feature = x.view(batch_size * num_points, -1)[idx, :]
    feature = feature.view(batch_size, num_points, k, num_dims)
    x = x.view(batch_size, num_points, 1, num_dims).repeat(1, 1, k, 1)
    return torch.cat((feature - x, x), dim=3).permute(0, 3, 1, 2).contiguous()


class DGCNN(nn.Module):
    def __init__(self, k: int = 4, emb_dims: int = 16, output_channels: int = 5) -> None:
        super().__init__()
        self.k = k
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.bn3 = nn.BatchNorm2d(12)
        self.bn4 = nn.BatchNorm2d(16)
        self.bn5 = nn.BatchNorm1d(emb_dims)
        self.conv1 = nn.Sequential(nn.Conv2d(6, 8, kernel_size=1, bias=False), self.bn1, nn.LeakyReLU(0.2))
        self.conv2 = nn.Sequential(nn.Conv2d(8 * 2, 8, kernel_size=1, bias=False), self.bn2, nn.LeakyReLU(0.2))
        self.conv3 = nn.Sequential(nn.Conv2d(8 * 2, 12, kernel_size=1, bias=False), self.bn3, nn.LeakyReLU(0.2))
        self.conv4 = nn.Sequential(nn.Conv2d(12 * 2, 16, kernel_size=1, bias=False), self.bn4, nn.LeakyReLU(0.2))
        self.conv5 = nn.Sequential(nn.Conv1d(44, emb_dims, kernel_size=1, bias=False), self.bn5, nn.LeakyReLU(0.2))
        self.linear1 = nn.Linear(emb_dims * 2, 16, bias=False)
        self.bn6 = nn.BatchNorm1d(16)
        self.dp1 = nn.Dropout(p=0.5)
        self.linear2 = nn.Linear(16, 12)
        self.bn7 = nn.BatchNorm1d(12)
        self.dp2 = nn.Dropout(p=0.5)
        self.linear3 = nn.Linear(12, output_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = x.size(0)
        x1 = self.conv1(get_graph_feature(x, k=self.k)).max(dim=-1, keepdim=False)[0]
        x2 = self.conv2(get_graph_feature(x1, k=self.k)).max(dim=-1, keepdim=False)[0]
        x3 = self.conv3(get_graph_feature(x2, k=self.k)).max(dim=-1, keepdim=False)[0]
        x4 = self.conv4(get_graph_feature(x3, k=self.k)).max(dim=-1, keepdim=False)[0]
        x = self.conv5(torch.cat((x1, x2, x3, x4), dim=1))
        x1 = F.adaptive_max_pool1d(x, 1).view(batch_size, -1)
        x2 = F.adaptive_avg_pool1d(x, 1).view(batch_size, -1)
        x = torch.cat((x1, x2), 1)
        x = self.dp1(F.leaky_relu(self.bn6(self.linear1(x)), negative_slope=0.2))
        x = self.dp2(F.leaky_relu(self.bn7(self.linear2(x)), negative_slope=0.2))
        return self.linear3(x)


# Every BN follows a 1x1 conv or a Linear that only it reads; the max over neighbours, the pools and the
# LeakyReLUs come after. named_modules() names the shared modules by their first attribute, bn1..bn5.
DGCNN_BN = frozenset(f"bn{i}" for i in range(1, 8))

# ---------------------------------------------------------------------------------------------------------
# 7. U^2-Net (xuebinqin/U-2-Net model/u2net.py, U2NETP at toy widths): REBNCONV (dilated 3x3 conv with bias +
#    BN + ReLU), `_upsample_like` = bilinear F.interpolate to `tar.shape[2:]`, RSU blocks (an encoder of
#    REBNCONVs and ceil_mode max-pools, a dilated bottom, a decoder on cats of the upsampled map and the
#    skip, `hx1d + hxin`), RSU4F (dilations 1, 2, 4, 8, no pooling), side outputs upsampled to the input,
#    a 1x1 fuse of their cat; the fused map's sigmoid (upstream returns all seven sigmoids)
# ---------------------------------------------------------------------------------------------------------


class REBNCONV(nn.Module):
    def __init__(self, in_ch: int = 3, out_ch: int = 3, dirate: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=1 * dirate, dilation=1 * dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


def _upsample_like(src: torch.Tensor, tar: torch.Tensor) -> torch.Tensor:
    return F.interpolate(src, size=tar.shape[2:], mode="bilinear")


class RSU4(nn.Module):
    def __init__(self, in_ch: int = 3, mid_ch: int = 12, out_ch: int = 3) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        self.pool1 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dirate=1)
        self.pool2 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dirate=1)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dirate=1)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dirate=1)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(self.pool1(hx1))
        hx3 = self.rebnconv3(self.pool2(hx2))
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((_upsample_like(hx3d, hx2), hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((_upsample_like(hx2d, hx1), hx1), 1))
        return hx1d + hxin


class RSU4F(nn.Module):
    def __init__(self, in_ch: int = 3, mid_ch: int = 12, out_ch: int = 3) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dirate=4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dirate=8)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dirate=4)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dirate=2)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


class U2NETP(nn.Module):
    def __init__(self, in_ch: int = 3, out_ch: int = 1) -> None:
        super().__init__()
        self.stage1 = RSU4(in_ch, 4, 8)
        self.pool12 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.stage2 = RSU4F(8, 4, 8)
        self.stage1d = RSU4(16, 4, 8)
        self.side1 = nn.Conv2d(8, out_ch, 3, padding=1)
        self.side2 = nn.Conv2d(8, out_ch, 3, padding=1)
        self.outconv = nn.Conv2d(2 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hx1 = self.stage1(x)
        hx2 = self.stage2(self.pool12(hx1))
        hx1d = self.stage1d(torch.cat((_upsample_like(hx2, hx1), hx1), 1))
        d1 = self.side1(hx1d)
        d2 = _upsample_like(self.side2(hx2), d1)
        return torch.sigmoid(self.outconv(torch.cat((d1, d2), 1)))


_RSU_CONVS = ("rebnconvin", "rebnconv1", "rebnconv2", "rebnconv3", "rebnconv4", "rebnconv3d", "rebnconv2d",
              "rebnconv1d")
# Every REBNCONV's BN follows its conv (with a bias), read by the BN alone; the cats, upsamples, pools and the
# `hx1d + hxin` residual come after the ReLUs.
U2NET_BN = frozenset(f"{stage}.{conv}.bn_s1" for stage in ("stage1", "stage2", "stage1d") for conv in _RSU_CONVS)

# ---------------------------------------------------------------------------------------------------------
# 8. PyramidNet (dyhan0920/PyramidNet-PyTorch PyramidNet.py, CIFAR form): channels grow by `addrate` every
#    block; BasicBlock = BN -> conv3x3 -> BN -> ReLU -> conv3x3 -> BN (the first BN precedes a zero-padded
#    conv, no ReLU after the last); the shortcut (an AvgPool2d(2, ceil_mode) when strided) is padded in
#    channels by a torch.zeros tensor built from the batch size and cat, `out +=`; a stem conv+BN with no
#    ReLU, bn_final -> ReLU -> AvgPool2d(4) -> fc
# ---------------------------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PyramidBasicBlock(nn.Module):
    outchannel_ratio = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.relu(self.bn2(self.conv1(self.bn1(x))))))
        if self.downsample is not None:
            shortcut = self.downsample(x)
            featuremap_size = shortcut.size()[2:4]
        else:
            shortcut = x
            featuremap_size = out.size()[2:4]
        batch_size = out.size()[0]
        residual_channel = out.size()[1]
        shortcut_channel = shortcut.size()[1]
        if residual_channel != shortcut_channel:
            padding = torch.zeros(batch_size, residual_channel - shortcut_channel, featuremap_size[0],
                                  featuremap_size[1], device=out.device)
            out += torch.cat((shortcut, padding), 1)
        else:
            out += shortcut
        return out


class PyramidNet(nn.Module):
    def __init__(self, depth: int = 14, alpha: int = 12, num_classes: int = 5) -> None:
        super().__init__()
        self.inplanes = 8
        n = (depth - 2) // 6
        block = PyramidBasicBlock
        self.addrate = alpha / (3 * n * 1.0)
        self.input_featuremap_dim = self.inplanes
        self.conv1 = nn.Conv2d(3, self.input_featuremap_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.input_featuremap_dim)
        self.featuremap_dim = self.input_featuremap_dim
        self.layer1 = self.pyramidal_make_layer(block, n)
        self.layer2 = self.pyramidal_make_layer(block, n, stride=2)
        self.layer3 = self.pyramidal_make_layer(block, n, stride=2)
        self.final_featuremap_dim = self.input_featuremap_dim
        self.bn_final = nn.BatchNorm2d(self.final_featuremap_dim)
        self.relu_final = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(4)
        self.fc = nn.Linear(self.final_featuremap_dim, num_classes)

    def pyramidal_make_layer(self, block: type[PyramidBasicBlock], block_depth: int, stride: int = 1) -> nn.Sequential:
        downsample = nn.AvgPool2d((2, 2), stride=(2, 2), ceil_mode=True) if stride != 1 else None
        layers = []
        self.featuremap_dim = self.featuremap_dim + self.addrate
        layers.append(block(self.input_featuremap_dim, int(round(self.featuremap_dim)), stride, downsample))
        for _ in range(1, block_depth):
            temp_featuremap_dim = self.featuremap_dim + self.addrate
            layers.append(block(int(round(self.featuremap_dim)) * block.outchannel_ratio,
                                int(round(temp_featuremap_dim)), 1))
            self.featuremap_dim = temp_featuremap_dim
        self.input_featuremap_dim = int(round(self.featuremap_dim)) * block.outchannel_ratio
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))
        x = self.avgpool(self.relu_final(self.bn_final(x)))
        return self.fc(x.view(x.size(0), -1))


_PYRAMID_BLOCKS = [f"layer{i}.{j}" for i in (1, 2, 3) for j in (0, 1)]
# The stem BN and every block's bn2 and bn3 follow a conv only they read. Each block's bn1 normalizes the
# block's input (the stem BN's output or a sum), also read by the shortcut, into a zero-padded conv: kept.
# bn_final normalizes the last sum, whose shortcut term is the block's input: kept; a ReLU follows.
PYRAMIDNET_BN = frozenset(["bn1", *(f"{block}.bn{i}" for block in _PYRAMID_BLOCKS for i in (2, 3))])
PYRAMIDNET_KEPT = {**{f"{block}.bn1": "pads its input with zeros" for block in _PYRAMID_BLOCKS},
                   "bn_final": _NOT_A_LAYER}

# ---------------------------------------------------------------------------------------------------------
# 9. CondConv (timm's CondConv2d and CondConvResidual): each expert's kernel is a row of a (num_experts,
#    numel) Parameter; per sample, routing weights (sigmoid of a Linear on the pooled input) mix them by
#    matmul, the batch is folded into channels (`x.reshape(1, B * C, H, W)`) and convolved with
#    groups = groups * B, the output permuted and viewed back to (B, C, H, W); conv -> BatchNormAct2d in
#    an EfficientNet-style net
# ---------------------------------------------------------------------------------------------------------


class CondConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 0,
                 groups: int = 1, num_experts: int = 4) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, 1, groups
        self.num_experts = num_experts
        self.weight_shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        self.weight = nn.Parameter(torch.empty(self.num_experts, math.prod(self.weight_shape)))
        for i in range(self.num_experts):  # timm's get_condconv_initializer: each expert as a conv weight
            nn.init.kaiming_uniform_(self.weight[i].view(self.weight_shape), a=math.sqrt(5))

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        weight = torch.matmul(routing_weights, self.weight)
        new_weight_shape = (B * self.out_channels, self.in_channels // self.groups) + self.kernel_size
        weight = weight.view(new_weight_shape)
        x = x.reshape(1, B * C, H, W)
        out = F.conv2d(x, weight, None, stride=self.stride, padding=self.padding, dilation=self.dilation,
                       groups=self.groups * B)
        return out.permute([1, 0, 2, 3]).view(B, self.out_channels, out.shape[-2], out.shape[-1])


class CondConvResidual(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, exp_ratio: int = 2, stride: int = 1, num_experts: int = 3) -> None:
        super().__init__()
        mid_chs = in_chs * exp_ratio
        self.has_skip = in_chs == out_chs and stride == 1
        self.routing_fn = nn.Linear(in_chs, num_experts)
        self.conv_pw = CondConv2d(in_chs, mid_chs, 1, num_experts=num_experts)
        self.bn1 = BatchNormAct2d(mid_chs)
        self.conv_dw = CondConv2d(mid_chs, mid_chs, 3, stride, 1, groups=mid_chs, num_experts=num_experts)
        self.bn2 = BatchNormAct2d(mid_chs)
        self.conv_pwl = CondConv2d(mid_chs, out_chs, 1, num_experts=num_experts)
        self.bn3 = BatchNormAct2d(out_chs, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        pooled_inputs = F.adaptive_avg_pool2d(x, 1).flatten(1)
        routing_weights = torch.sigmoid(self.routing_fn(pooled_inputs))
        x = self.bn1(self.conv_pw(x, routing_weights))
        x = self.bn2(self.conv_dw(x, routing_weights))
        x = self.bn3(self.conv_pwl(x, routing_weights))
        if self.has_skip:
            x = x + shortcut
        return x


class CondConvNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.blocks = nn.Sequential(CondConvResidual(8, 8), CondConvResidual(8, 12, stride=2))
        self.conv_head = nn.Conv2d(12, 16, 1, bias=False)
        self.bn2 = BatchNormAct2d(16)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


# The stem's and the head's BN follow plain convs. Every CondConv's kernel is mixed per sample at run time:
# there is no stored weight to take a BN's scale per output channel (and its shift would need a bias per
# sample-channel), so the blocks' BNs are kept, except the last block's bn3 (no activation, no skip), which
# folds forward into the unpadded 1x1 conv_head.
CONDCONV_BN = frozenset(["bn1", "bn2", "blocks.1.bn3"])
CONDCONV_KEPT = {f"blocks.{b}.bn{i}": _RUN_TIME_WEIGHT for b, i in [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]}

# ---------------------------------------------------------------------------------------------------------
# The entries
# ---------------------------------------------------------------------------------------------------------


def ghostnet() -> nn.Module:
    return _build(GhostNet, 90)


def dbb() -> nn.Module:
    return _build(DBBNet, 91)


def conformer() -> nn.Module:
    return _build(Conformer, 92)


def espnet() -> nn.Module:
    return _build(ESPNet, 93)


def enet() -> nn.Module:
    return _build(ENet, 94)


def dgcnn() -> nn.Module:
    return _build(DGCNN, 95)


def u2net() -> nn.Module:
    return _build(U2NETP, 96)


def pyramidnet() -> nn.Module:
    return _build(PyramidNet, 97)


def condconv() -> nn.Module:
    return _build(CondConvNet, 98)


_UNPOOL = "max_unpool2d with output_size"
ROUND5 = [
    ZooModel("ghostnet", ghostnet, (1, 3, 32, 32),
             "GhostModule (primary conv+BN, cheap depthwise conv+BN, cat, channel slice), hard_sigmoid SE, "
             "depthwise stride-2 conv+BN, depthwise+pointwise conv+BN shortcut, x +=", GHOSTNET_BN),
    ZooModel("dbb", dbb, (1, 3, 16, 16),
             "Diverse Branch Block: kxk, 1x1, 1x1 -> BNAndPad -> AvgPool -> BN, identity-based 1x1 (run-time "
             "kernel) -> BNAndPad -> kxk branches summed in place; border values computed from BN parameters",
             DBB_BN, DBB_KEPT, DBB_ONNX_KEPT),
    ZooModel("conformer", conformer, (1, 12, 8),
             "Conformer conv module: transposes, pointwise Conv1d -> GLU -> depthwise Conv1d -> BN1d -> SiLU, "
             "beside LayerNorms, half-step feed-forwards and nn.MultiheadAttention", CONFORMER_BN),
    ZooModel("espnet", espnet, (1, 3, 32, 32),
             "ESP modules (dilated branches summed hierarchically, cat -> BN -> PReLU), input projections, "
             "ENet's initial block (cat of conv and max-pool -> BN) and asymmetric bottleneck",
             ESPNET_BN, ESPNET_KEPT),
    ZooModel("enet", enet, (1, 3, 16, 16),
             "ENet: max-pool indices, channels padded with torch.zeros from ext.size(), MaxUnpool2d and "
             "ConvTranspose2d with output_size", ENET_BN, ENET_KEPT,
             onnx_skip=f"the TorchScript-based ONNX exporter fails on {_UNPOOL} (a TypeError in torch._check)"),
    ZooModel("dgcnn", dgcnn, (1, 3, 16),
             "DGCNN: knn by topk, gather with index arithmetic, EdgeConv Conv2d(k=1)+BN2d+LeakyReLU, max over "
             "neighbours, Conv1d+BN1d, Linear+BN1d head; BN modules under two names", DGCNN_BN),
    ZooModel("u2net", u2net, (1, 3, 18, 18),
             "U^2-Net RSU blocks: dilated REBNCONV, ceil_mode pools, _upsample_like (bilinear to tar.shape[2:]), "
             "cat of skip and upsampled, hx1d + hxin", U2NET_BN),
    ZooModel("pyramidnet", pyramidnet, (1, 3, 16, 16),
             "PyramidNet: BN -> zero-padded conv (kept), shortcut padded with torch.zeros from the batch size "
             "and cat, out +=, stem BN without ReLU", PYRAMIDNET_BN, PYRAMIDNET_KEPT),
    ZooModel("condconv", condconv, (1, 3, 16, 16),
             "CondConv: per-sample expert kernels mixed by routing weights, batch folded into channels, "
             "grouped conv over the batch -> BatchNormAct2d (kept)", CONDCONV_BN, CONDCONV_KEPT,
             onnx_dynamic_batch=False),
]
BY_NAME = {entry.name: entry for entry in ROUND5}


def entries(names: list[str] | None = None, **marked: dict[str, str]) -> list:
    return acceptance.marked_params(BY_NAME, names, **marked)


ONNX_SKIP = {entry.name: entry.onnx_skip for entry in ROUND5 if entry.onnx_skip}


@pytest.fixture
def border_reads_allowed(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """BNAndPadLayer's border values read its BN's statistics in the folded model too: the BN op must be
    gone (bn_calls), those reads stay."""
    allowed = STATISTICS_READ_ELSEWHERE.get(request.node.callspec.params["entry"].name, frozenset())
    reads = acceptance.stat_reads
    monkeypatch.setattr(acceptance, "stat_reads", lambda module, x: Counter(
        {layer: count for layer, count in reads(module, x).items() if layer not in allowed}))


# ---------------------------------------------------------------------------------------------------------
# Fold
# ---------------------------------------------------------------------------------------------------------


def test_ground_truth_covers_every_bn() -> None:
    more.assert_ground_truth_covers_every_bn(ROUND5)


@pytest.mark.usefixtures("border_reads_allowed")
@pytest.mark.parametrize("entry", entries())
def test_fold_eager(entry: ZooModel) -> None:
    more.test_fold_eager(entry)


@pytest.mark.parametrize("entry", entries(skip=ONNX_SKIP))
def test_fold_onnx(entry: ZooModel, tmp_path: Path) -> None:
    acceptance.test_fold_onnx_export(acceptance.OnnxCase(entry, tmp_path))


@pytest.mark.usefixtures("border_reads_allowed")
@pytest.mark.parametrize("entry", entries())
def test_fold_pt2(entry: ZooModel, tmp_path: Path) -> None:
    acceptance.test_fold_pt2_dynamic_batch(entry, tmp_path)


TRACE_SKIP = {"enet": f"torch.jit.trace fails on {_UNPOOL} (a TypeError in torch._check)",
              "dbb": "the trace bakes the batch size into BNAndPadLayer's border writes: it runs at batch 2 only",
              "condconv": "the trace bakes groups = batch size into the grouped conv: it runs at batch 2 only"}
CONVERTER_GUARDS = {"pyramidnet": "torch.export cannot convert the trace: the zeros padding's size, from "
                                  "out.size(), becomes symbols it cannot solve (Eq(20*((x/4)//4) - 20, 0))"}


@pytest.mark.parametrize("entry", entries(skip=TRACE_SKIP, xfail=CONVERTER_GUARDS))
def test_fold_torchscript(entry: ZooModel) -> None:
    round4.test_fold_torchscript(entry)


# ---------------------------------------------------------------------------------------------------------
# Recalibrate and inspect
# ---------------------------------------------------------------------------------------------------------

METHODS = ["exact", "fast"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", entries())
def test_recalibrate_eager(entry: ZooModel, method: str) -> None:
    round4.test_recalibrate_eager(entry, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", entries(skip=ONNX_SKIP))
def test_recalibrate_onnx(entry: ZooModel, method: str, tmp_path: Path) -> None:
    round4.test_recalibrate_onnx(entry, method, tmp_path)


@pytest.mark.parametrize("entry", entries())
def test_inspect_lists_every_bn_with_its_channels(entry: ZooModel) -> None:
    more.test_inspect_lists_every_bn_with_its_channels(entry)
