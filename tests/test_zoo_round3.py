"""A third round of upstream-style architectures, folded, recalibrated and inspected per format.

Each model re-creates, at toy size, the way its upstream project writes it (ultralytics' YOLOv8, DARTS,
timm's ResNeSt, HRNet, facebookresearch's SlowFast, TResNet with an inplace-abn look-alike,
Yet-Another-EfficientDet's BiFPN and heads, a SiamFC tracker), with the hand-derived set of BN layers
that fold exactly and the reason each other one is kept. They are checked as test_zoo_more.py checks its
models (fold eager/ONNX/.pt2/TorchScript at another batch size, recalibrate exact and fast against the
oracle, inspect), and so are ResNeSt converted to channels_last and TResNet converted to float64 (in
eager, .pt2 and TorchScript form: the ONNX helpers export and calibrate in float32).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.pytorch import engine
import tests.test_zoo_acceptance as acceptance
import tests.test_zoo_more as more
import tests.test_zoo_patterns as patterns
from tests.test_zoo_acceptance import REL_TOLERANCE, forward, rel_error
from tests.test_zoo_recalibration import (
    BATCH,
    OUTPUT_TOLERANCE,
    assert_recalibrated,
    assert_skipped,
    calibration_data,
    module_statistics,
    outputs,
    probe_input,
)
from tests.zoo import ZooModel, _build

# ---------------------------------------------------------------------------------------------------------
# 1. YOLOv8 (ultralytics): Conv with a class-level SiLU, C2f (chunk, bottlenecks on the last chunk, cat),
#    SPPF (three chained max-pools, cat), Detect with separate box/class towers and a DFL head (softmax over
#    16 bins, a fixed 1x1 conv without BN)
# ---------------------------------------------------------------------------------------------------------


class Conv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2fSplit(C2f):
    """C2f.forward_split, what ultralytics exports with: `split((c, c), 1)` in place of `chunk(2, 1)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: the expected bin of a softmax over `c1` bins, as a fixed 1x1 conv."""

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detect(nn.Module):
    def __init__(self, nc: int, ch: tuple[int, ...], reg_max: int = 16) -> None:
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), reg_max
        self.no = nc + reg_max * 4
        c2, c3 = 16, max(ch[0], nc)
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(reg_max)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        return torch.cat((self.dfl(box), cls.sigmoid()), 1)


class YoloV8(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            Conv(3, 8, 3, 2), Conv(8, 16, 3, 2), C2f(16, 16, 1, True), Conv(16, 32, 3, 2), C2fSplit(32, 32, 1, True),
            SPPF(32, 32, 5), nn.Upsample(None, 2, "nearest"), C2f(48, 16, 1), Detect(4, (16, 32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        p2 = m[2](m[1](m[0](x)))
        p3 = m[5](m[4](m[3](p2)))
        head = m[7](torch.cat([m[6](p3), p2], 1))
        return m[8]([head, p3])


def _conv_bn(*prefixes: str) -> list[str]:
    return [f"{prefix}.bn" for prefix in prefixes]


YOLOV8_BN = frozenset(_conv_bn(
    "model.0", "model.1", "model.2.cv1", "model.2.cv2", "model.2.m.0.cv1", "model.2.m.0.cv2", "model.3",
    "model.4.cv1", "model.4.cv2", "model.4.m.0.cv1", "model.4.m.0.cv2", "model.5.cv1", "model.5.cv2",
    "model.7.cv1", "model.7.cv2", "model.7.m.0.cv1", "model.7.m.0.cv2",
    *(f"model.8.{tower}.{level}.{i}" for tower in ("cv2", "cv3") for level in (0, 1) for i in (0, 1))))

# ---------------------------------------------------------------------------------------------------------
# 2. DARTS (quark0/darts NetworkCIFAR with a learned genotype): ReLU-Conv-BN preprocessing, SepConv and
#    DilConv ending in BN, cells summing op pairs and concatenating states, FactorizedReduce (two stride-2
#    1x1 convs on x and x[:, :, 1:, 1:], concatenated, then one BN over the concatenation) as a reduction
#    cell's skip_connect and as preprocess0 after a reduction
# ---------------------------------------------------------------------------------------------------------


class ReLUConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False),
                                nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
                                nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, dilation: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, stride, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, kernel_size=1, padding=0, bias=False), nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, 1, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class FactorizedReduce(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        return self.bn(out)


OPS = {
    "max_pool_3x3": lambda c, stride: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda c, stride: nn.Identity() if stride == 1 else FactorizedReduce(c, c),
    "sep_conv_3x3": lambda c, stride: SepConv(c, c, 3, stride, 1),
    "dil_conv_3x3": lambda c, stride: DilConv(c, c, 3, stride, 2, 2),
}
NORMAL = [("sep_conv_3x3", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 2)]
REDUCE = [("max_pool_3x3", 0), ("skip_connect", 1), ("skip_connect", 2), ("sep_conv_3x3", 0)]


class Cell(nn.Module):
    def __init__(self, c_prev_prev: int, c_prev: int, c: int, reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, c)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, c, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0)
        genotype = REDUCE if reduction else NORMAL
        self._ops = nn.ModuleList(OPS[name](c, 2 if reduction and index < 2 else 1) for name, index in genotype)
        self._indices = [index for _, index in genotype]
        self._steps = len(genotype) // 2
        self._concat = [2, 3]
        self.multiplier = len(self._concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            h1 = self._ops[2 * i](states[self._indices[2 * i]])
            h2 = self._ops[2 * i + 1](states[self._indices[2 * i + 1]])
            states += [h1 + h2]
        return torch.cat([states[i] for i in self._concat], dim=1)


class NetworkCIFAR(nn.Module):
    def __init__(self, c: int = 4, num_classes: int = 5, layers: int = 3) -> None:
        super().__init__()
        c_curr = 3 * c
        self.stem = nn.Sequential(nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, c
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            c_curr = c_curr * 2 if reduction else c_curr
            cell = Cell(c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.global_pooling(s1).view(s1.size(0), -1))


def _sep_conv(prefix: str) -> list[str]:
    return [f"{prefix}.op.3", f"{prefix}.op.7"]


# Every BN folds: each follows a conv read by it alone; FactorizedReduce's BN folds channel slice by slice
# into the conv that produced the slice (conv_1 the first half, conv_2 the second).
DARTS_BN = frozenset([
    "stem.1", "cells.0.preprocess0.op.2", "cells.0.preprocess1.op.2", *_sep_conv("cells.0._ops.0"),
    "cells.0._ops.1.op.3", *_sep_conv("cells.0._ops.3"),
    "cells.1.preprocess0.op.2", "cells.1.preprocess1.op.2", "cells.1._ops.1.bn", *_sep_conv("cells.1._ops.3"),
    "cells.2.preprocess0.bn", "cells.2.preprocess1.op.2", "cells.2._ops.1.bn", *_sep_conv("cells.2._ops.3")])

# ---------------------------------------------------------------------------------------------------------
# 3. ResNeSt (timm): deep stem, bottleneck whose 3x3 is SplitAttn (grouped conv over radix x cardinality,
#    bn0, reshape to (B, radix, C, H, W), sum over radix, GAP, fc1 with bias + bn1 on 1x1 maps, fc2,
#    RadixSoftmax), avd pooling before it, avg_down shortcut (AvgPool2d(ceil_mode) -> 1x1 conv -> BN)
# ---------------------------------------------------------------------------------------------------------


class RadixSoftmax(nn.Module):
    def __init__(self, radix: int, cardinality: int) -> None:
        super().__init__()
        self.radix = radix
        self.cardinality = cardinality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        x = x.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
        return F.softmax(x, dim=1).reshape(batch, -1)


class SplitAttn(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 2, radix: int = 2,
                 attn_chs: int = 8) -> None:
        super().__init__()
        self.radix = radix
        mid_chs = out_channels * radix
        self.conv = nn.Conv2d(in_channels, mid_chs, 3, stride, 1, groups=groups * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(mid_chs)
        self.act0 = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(out_channels, attn_chs, 1, groups=groups)
        self.bn1 = nn.BatchNorm2d(attn_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(attn_chs, mid_chs, 1, groups=groups)
        self.rsoftmax = RadixSoftmax(radix, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.conv(x)))
        B, RC, H, W = x.shape
        x = x.reshape((B, self.radix, RC // self.radix, H, W))
        x_gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        x_gap = self.act1(self.bn1(self.fc1(x_gap)))
        x_attn = self.rsoftmax(self.fc2(x_gap)).view(B, -1, 1, 1)
        out = (x * x_attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)
        return out.contiguous()


class ResNestBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        group_width = planes
        self.conv1 = nn.Conv2d(inplanes, group_width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.act1 = nn.ReLU(inplace=True)
        self.avd_first = nn.AvgPool2d(3, stride, padding=1) if stride > 1 else None
        self.conv2 = SplitAttn(group_width, group_width)
        self.bn2 = nn.Identity()
        self.act2 = nn.Identity()
        self.conv3 = nn.Conv2d(group_width, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        out = self.act1(self.bn1(self.conv1(x)))
        if self.avd_first is not None:
            out = self.avd_first(out)
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        return self.act3(out + shortcut)


def _avg_down(inplanes: int, outplanes: int, stride: int) -> nn.Sequential:
    pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, nn.Conv2d(inplanes, outplanes, 1, stride=1, bias=False), nn.BatchNorm2d(outplanes))


class ResNeSt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
            nn.Conv2d(4, 4, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
            nn.Conv2d(4, 8, 3, stride=1, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(ResNestBottleneck(8, 4, 1, _avg_down(8, 16, 1)), ResNestBottleneck(16, 4))
        self.layer2 = nn.Sequential(ResNestBottleneck(16, 8, 2, _avg_down(16, 32, 2)))
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def _resnest_block(prefix: str, downsample: bool) -> list[str]:
    names = [f"{prefix}.bn1", f"{prefix}.conv2.bn0", f"{prefix}.conv2.bn1", f"{prefix}.bn3"]
    return names + ([f"{prefix}.downsample.2"] if downsample else [])


# Every BN follows a conv read by it alone: bn0 the grouped radix conv, bn1 fc1 (its bias absorbs the shift),
# bn3 conv3 (the shortcut is added after the BN), downsample.2 the 1x1 conv after the average pool.
RESNEST_BN = frozenset(["conv1.1", "conv1.4", "bn1", *_resnest_block("layer1.0", True),
                        *_resnest_block("layer1.1", False), *_resnest_block("layer2.0", True)])

# ---------------------------------------------------------------------------------------------------------
# 4. HRNet (HRNet-Image-Classification / HRNet-Semantic-Segmentation): stem, transitions that add a branch
#    with a strided conv, HighResolutionModule with parallel basic-block branches and fuse layers (1x1 conv
#    + BN + nearest Upsample(scale_factor) from lower resolutions; chains of strided 3x3 conv + BN, ReLU
#    between, from higher ones), sums of every branch then ReLU; a segmentation head that upsamples every
#    branch bilinearly, concatenates, and applies conv + BN + ReLU + conv
# ---------------------------------------------------------------------------------------------------------

BN_MOMENTUM = 0.01


class HRBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class HighResolutionModule(nn.Module):
    def __init__(self, num_channels: list[int]) -> None:
        super().__init__()
        self.num_branches = len(num_channels)
        self.branches = nn.ModuleList(nn.Sequential(HRBasicBlock(c, c)) for c in num_channels)
        self.fuse_layers = self._make_fuse_layers(num_channels)
        self.relu = nn.ReLU(False)

    def _make_fuse_layers(self, nc: list[int]) -> nn.ModuleList:
        fuse_layers = []
        for i in range(self.num_branches):
            fuse_layer = []
            for j in range(self.num_branches):
                if j > i:
                    fuse_layer.append(nn.Sequential(
                        nn.Conv2d(nc[j], nc[i], 1, 1, 0, bias=False), nn.BatchNorm2d(nc[i], momentum=BN_MOMENTUM),
                        nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                elif j == i:
                    fuse_layer.append(None)
                else:
                    conv3x3s = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            conv3x3s.append(nn.Sequential(
                                nn.Conv2d(nc[j], nc[i], 3, 2, 1, bias=False),
                                nn.BatchNorm2d(nc[i], momentum=BN_MOMENTUM)))
                        else:
                            conv3x3s.append(nn.Sequential(
                                nn.Conv2d(nc[j], nc[j], 3, 2, 1, bias=False),
                                nn.BatchNorm2d(nc[j], momentum=BN_MOMENTUM), nn.ReLU(False)))
                    fuse_layer.append(nn.Sequential(*conv3x3s))
            fuse_layers.append(nn.ModuleList(fuse_layer))
        return nn.ModuleList(fuse_layers)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                y = y + x[j] if i == j else y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


def _transition(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
                         nn.ReLU(inplace=True))


class HRNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(8, 8, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(HRBasicBlock(8, 8))
        self.transition1 = nn.ModuleList([None, _transition(8, 16, 2)])
        self.stage2 = HighResolutionModule([8, 16])
        self.transition2 = nn.ModuleList([None, None, _transition(16, 24, 2)])
        self.stage3 = HighResolutionModule([8, 16, 24])
        self.last_layer = nn.Sequential(
            nn.Conv2d(48, 16, 1, 1, 0), nn.BatchNorm2d(16, momentum=BN_MOMENTUM), nn.ReLU(inplace=False),
            nn.Conv2d(16, 3, 1, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(self.relu(self.bn2(self.conv2(x))))
        y_list = self.stage2([t(x) if t is not None else x for t in self.transition1])
        y_list = self.stage3([t(y_list[-1]) if t is not None else y_list[i] for i, t in enumerate(self.transition2)])
        h, w = y_list[0].size(2), y_list[0].size(3)
        ups = [F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False) for y in y_list[1:]]
        return self.last_layer(torch.cat([y_list[0], *ups], 1))


def _hr_module(prefix: str, branches: int) -> list[str]:
    names = [f"{prefix}.branches.{b}.0.bn{k}" for b in range(branches) for k in (1, 2)]
    for i in range(branches):
        for j in range(branches):
            if j > i:
                names.append(f"{prefix}.fuse_layers.{i}.{j}.1")
            elif j < i:
                names += [f"{prefix}.fuse_layers.{i}.{j}.{k}.1" for k in range(i - j)]
    return names


# Every BN follows a conv read by it alone (the fuse sums and the residual adds come after the BN or after
# the upsample); the head's BN folds into its 1x1 conv with bias over the concatenation.
HRNET_BN = frozenset(["bn1", "bn2", "layer1.0.bn1", "layer1.0.bn2", "transition1.1.1", "transition2.2.1",
                      *_hr_module("stage2", 2), *_hr_module("stage3", 3), "last_layer.1"])

# ---------------------------------------------------------------------------------------------------------
# 5. SlowFast (facebookresearch/SlowFast): the clip packed into a slow pathway (every alpha-th frame) and a
#    fast one, per-pathway Conv3d stems, FuseFastToSlow (a time-strided (5,1,1) Conv3d + BN + ReLU on the
#    fast pathway, concatenated to the slow one), bottleneck ResBlocks with temporal kernels, a head that
#    pools each pathway and concatenates
# ---------------------------------------------------------------------------------------------------------


class ResNetBasicStem(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, kernel: list[int], padding: list[int]) -> None:
        super().__init__()
        self.conv = nn.Conv3d(dim_in, dim_out, kernel, stride=[1, 2, 2], padding=padding, bias=False)
        self.bn = nn.BatchNorm3d(dim_out, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU(True)
        self.pool_layer = nn.MaxPool3d(kernel_size=[1, 3, 3], stride=[1, 2, 2], padding=[0, 1, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_layer(self.relu(self.bn(self.conv(x))))


class VideoModelStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pathway0_stem = ResNetBasicStem(3, 8, [1, 7, 7], [0, 3, 3])
        self.pathway1_stem = ResNetBasicStem(3, 2, [5, 7, 7], [2, 3, 3])

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.pathway0_stem(x[0]), self.pathway1_stem(x[1])]


class FuseFastToSlow(nn.Module):
    def __init__(self, dim_in: int, fusion_conv_channel_ratio: int, fusion_kernel: int, alpha: int) -> None:
        super().__init__()
        self.conv_f2s = nn.Conv3d(dim_in, dim_in * fusion_conv_channel_ratio, kernel_size=[fusion_kernel, 1, 1],
                                  stride=[alpha, 1, 1], padding=[fusion_kernel // 2, 0, 0], bias=False)
        self.bn = nn.BatchNorm3d(dim_in * fusion_conv_channel_ratio, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU(True)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        x_s, x_f = x
        fuse = self.relu(self.bn(self.conv_f2s(x_f)))
        return [torch.cat([x_s, fuse], 1), x_f]


class BottleneckTransform(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, temp_kernel_size: int, stride: int, dim_inner: int) -> None:
        super().__init__()
        self.a = nn.Conv3d(dim_in, dim_inner, [temp_kernel_size, 1, 1], stride=[1, 1, 1],
                           padding=[temp_kernel_size // 2, 0, 0], bias=False)
        self.a_bn = nn.BatchNorm3d(dim_inner)
        self.a_relu = nn.ReLU(True)
        self.b = nn.Conv3d(dim_inner, dim_inner, [1, 3, 3], stride=[1, stride, stride], padding=[0, 1, 1],
                           bias=False)
        self.b_bn = nn.BatchNorm3d(dim_inner)
        self.b_relu = nn.ReLU(True)
        self.c = nn.Conv3d(dim_inner, dim_out, [1, 1, 1], bias=False)
        self.c_bn = nn.BatchNorm3d(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b_relu(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, temp_kernel_size: int, stride: int, dim_inner: int) -> None:
        super().__init__()
        self.branch1 = nn.Conv3d(dim_in, dim_out, 1, stride=[1, stride, stride], bias=False)
        self.branch1_bn = nn.BatchNorm3d(dim_out)
        self.branch2 = BottleneckTransform(dim_in, dim_out, temp_kernel_size, stride, dim_inner)
        self.relu = nn.ReLU(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch1_bn(self.branch1(x)) + self.branch2(x))


class ResStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pathway0_res0 = ResBlock(8 + 4, 16, 1, 2, 4)
        self.pathway1_res0 = ResBlock(2, 4, 3, 2, 2)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.pathway0_res0(x[0]), self.pathway1_res0(x[1])]


class SlowFast(nn.Module):
    alpha = 4

    def __init__(self) -> None:
        super().__init__()
        self.s1 = VideoModelStem()
        self.s1_fuse = FuseFastToSlow(2, 2, 5, self.alpha)
        self.s2 = ResStage()
        self.head_dropout = nn.Dropout(0.5)
        self.head_projection = nn.Linear(16 + 4, 5, bias=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = [frames[:, :, ::self.alpha], frames]  # PackPathway
        x = self.s2(self.s1_fuse(self.s1(x)))
        pooled = torch.cat([F.adaptive_avg_pool3d(pathway, 1) for pathway in x], 1)
        x = self.head_dropout(pooled.permute((0, 2, 3, 4, 1)))
        return self.head_projection(x).mean([1, 2, 3])


def _res_block(prefix: str) -> list[str]:
    return [f"{prefix}.branch1_bn", *(f"{prefix}.branch2.{n}_bn" for n in "abc")]


# Every BN follows a Conv3d read by it alone: the fuse BN before its ReLU and the concat, branch1_bn and
# c_bn before the residual sum.
SLOWFAST_BN = frozenset(["s1.pathway0_stem.bn", "s1.pathway1_stem.bn", "s1_fuse.bn", *_res_block("s2.pathway0_res0"),
                         *_res_block("s2.pathway1_res0")])

# ---------------------------------------------------------------------------------------------------------
# 6. TResNet (Alibaba-MIIL): SpaceToDepth stem (view/permute/view), InPlaceABN from inplace_abn (its own
#    class with weight/bias/running statistics, F.batch_norm then leaky_relu or identity in one module),
#    anti-aliased downsampling (a fixed binomial filter held in a buffer, reflect pad, F.conv2d with
#    groups=C), SE with a view-based global pool, avg-pool downsample shortcut
# ---------------------------------------------------------------------------------------------------------


class InPlaceABN(nn.Module):
    """inplace_abn's InPlaceABN as its ABN fallback computes it: batch norm, then the activation."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, activation: str = "leaky_relu",
                 activation_param: float = 0.01) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.activation = activation
        self.activation_param = activation_param
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, negative_slope=self.activation_param, inplace=True)
        return x


def conv2d_ABN(ni: int, nf: int, stride: int, activation: str = "leaky_relu", kernel_size: int = 3,
               activation_param: float = 1e-2) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(ni, nf, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        InPlaceABN(nf, activation=activation, activation_param=activation_param))


class SpaceToDepth(nn.Module):
    def __init__(self, block_size: int = 4) -> None:
        super().__init__()
        self.bs = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.size()
        x = x.view(N, C, H // self.bs, self.bs, W // self.bs, self.bs)
        x = x.permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(N, C * (self.bs ** 2), H // self.bs, W // self.bs)


class AntiAliasDownsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        a = torch.tensor([1., 2., 1.])
        filt = a[:, None] * a[None, :]
        filt = filt / torch.sum(filt)
        self.register_buffer("filt", filt[None, None, :, :].repeat((channels, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), "reflect"), self.filt, stride=2, padding=0, groups=x.shape[1])


class FastAvgPool2d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), -1).mean(-1).view(x.size(0), x.size(1), 1, 1)


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction_channels: int) -> None:
        super().__init__()
        self.avg_pool = FastAvgPool2d()
        self.fc1 = nn.Conv2d(channels, reduction_channels, kernel_size=1, padding=0, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduction_channels, channels, kernel_size=1, padding=0, bias=True)
        self.activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.fc2(self.relu(self.fc1(self.avg_pool(x))))
        return x * self.activation(x_se)


class TResBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        if stride == 1:
            self.conv1 = conv2d_ABN(inplanes, planes, stride=1, activation_param=1e-3)
        else:
            self.conv1 = nn.Sequential(conv2d_ABN(inplanes, planes, stride=1, activation_param=1e-3),
                                       AntiAliasDownsample(planes))
        self.conv2 = conv2d_ABN(planes, planes, stride=1, activation="identity")
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.se = SEModule(planes, max(planes // 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.downsample(x) if self.downsample is not None else x
        out = self.se(self.conv2(self.conv1(x)))
        out += residual
        return self.relu(out)


class TResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("SpaceToDepth", SpaceToDepth())
        self.body.add_module("conv1", conv2d_ABN(3 * 16, 8, stride=1, kernel_size=3))
        self.body.add_module("layer1", nn.Sequential(TResBasicBlock(8, 8)))
        self.body.add_module("layer2", nn.Sequential(TResBasicBlock(8, 16, 2, nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False),
            conv2d_ABN(8, 16, stride=1, kernel_size=1, activation="identity")))))
        self.global_pool = FastAvgPool2d()
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.global_pool(self.body(x)).flatten(1))


# Every InPlaceABN follows a conv read by it alone; the leaky_relu it applies stays behind its folded conv.
TRESNET_BN = frozenset(["body.conv1.1", "body.layer1.0.conv1.1", "body.layer1.0.conv2.1",
                        "body.layer2.0.conv1.0.1", "body.layer2.0.conv2.1", "body.layer2.0.downsample.1.1"])

# ---------------------------------------------------------------------------------------------------------
# 7. EfficientDet (Yet-Another-EfficientDet-Pytorch): Conv2dStaticSamePadding (F.pad from sizes),
#    SeparableConvBlock (depthwise without bias, pointwise with bias, BN momentum 0.01 eps 1e-3), a BiFPN
#    layer with fast normalized fusion (ReLU'd weights / their sum) and swish, a Regressor whose separable
#    convs are shared across pyramid levels with a separate BN per level and layer
# ---------------------------------------------------------------------------------------------------------


class Conv2dStaticSamePadding(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, bias=bias, groups=groups)
        self.stride = self.conv.stride
        self.kernel_size = self.conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        extra_h = (math.ceil(w / self.stride[1]) - 1) * self.stride[1] - w + self.kernel_size[1]
        extra_v = (math.ceil(h / self.stride[0]) - 1) * self.stride[0] - h + self.kernel_size[0]
        left = extra_h // 2
        top = extra_v // 2
        x = F.pad(x, [left, extra_h - left, top, extra_v - top])
        return self.conv(x)


class SeparableConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, norm: bool = True,
                 activation: bool = False) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.depthwise_conv = Conv2dStaticSamePadding(in_channels, in_channels, 3, 1, groups=in_channels, bias=False)
        self.pointwise_conv = Conv2dStaticSamePadding(in_channels, out_channels, 1, 1)
        self.norm = norm
        if self.norm:
            self.bn = nn.BatchNorm2d(num_features=out_channels, momentum=0.01, eps=1e-3)
        self.activation = activation
        self.swish = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise_conv(self.depthwise_conv(x))
        if self.norm:
            x = self.bn(x)
        return self.swish(x) if self.activation else x


class BiFPN(nn.Module):
    """One top-down and bottom-up pass over three levels with fast normalized fusion."""

    def __init__(self, num_channels: int, conv_channels: list[int], epsilon: float = 1e-4) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.conv4_up = SeparableConvBlock(num_channels)
        self.conv3_up = SeparableConvBlock(num_channels)
        self.conv4_down = SeparableConvBlock(num_channels)
        self.conv5_down = SeparableConvBlock(num_channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.downsample = nn.MaxPool2d(2, 2)
        self.swish = nn.SiLU()
        self.p3_down_channel = nn.Sequential(Conv2dStaticSamePadding(conv_channels[0], num_channels, 1),
                                             nn.BatchNorm2d(num_channels, momentum=0.01, eps=1e-3))
        self.p4_down_channel = nn.Sequential(Conv2dStaticSamePadding(conv_channels[1], num_channels, 1),
                                             nn.BatchNorm2d(num_channels, momentum=0.01, eps=1e-3))
        self.p5_down_channel = nn.Sequential(Conv2dStaticSamePadding(conv_channels[2], num_channels, 1),
                                             nn.BatchNorm2d(num_channels, momentum=0.01, eps=1e-3))
        self.p4_w1 = nn.Parameter(torch.ones(2))
        self.p3_w1 = nn.Parameter(torch.ones(2))
        self.p4_w2 = nn.Parameter(torch.ones(3))
        self.p5_w2 = nn.Parameter(torch.ones(2))

    def _fuse(self, weight: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        weight = F.relu(weight)
        weight = weight / (torch.sum(weight, dim=0) + self.epsilon)
        return self.swish(sum(w * x for w, x in zip(weight, inputs)))

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = inputs
        p3_in, p4_in, p5_in = self.p3_down_channel(p3), self.p4_down_channel(p4), self.p5_down_channel(p5)
        p4_up = self.conv4_up(self._fuse(self.p4_w1, [p4_in, self.upsample(p5_in)]))
        p3_out = self.conv3_up(self._fuse(self.p3_w1, [p3_in, self.upsample(p4_up)]))
        p4_out = self.conv4_down(self._fuse(self.p4_w2, [p4_in, p4_up, self.downsample(p3_out)]))
        p5_out = self.conv5_down(self._fuse(self.p5_w2, [p5_in, self.downsample(p4_out)]))
        return [p3_out, p4_out, p5_out]


class Regressor(nn.Module):
    def __init__(self, in_channels: int, num_anchors: int, num_layers: int, pyramid_levels: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.conv_list = nn.ModuleList(SeparableConvBlock(in_channels, norm=False) for _ in range(num_layers))
        self.bn_list = nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(in_channels, momentum=0.01, eps=1e-3) for _ in range(num_layers))
            for _ in range(pyramid_levels))
        self.header = SeparableConvBlock(in_channels, num_anchors * 4, norm=False)
        self.swish = nn.SiLU()

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        feats = []
        for feat, bn_list in zip(inputs, self.bn_list):
            for bn, conv in zip(bn_list, self.conv_list):
                feat = self.swish(bn(conv(feat)))
            feat = self.header(feat).permute(0, 2, 3, 1)
            feats.append(feat.contiguous().view(feat.shape[0], -1, 4))
        return torch.cat(feats, dim=1)


class EfficientDet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8, eps=1e-3), nn.SiLU()),
            nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1, bias=False), nn.BatchNorm2d(12, eps=1e-3), nn.SiLU()),
            nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16, eps=1e-3), nn.SiLU())])
        self.bifpn = BiFPN(8, [8, 12, 16])
        self.regressor = Regressor(8, 2, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for stage in self.backbone:
            x = stage(x)
            features.append(x)
        return self.regressor(self.bifpn(features))


_PER_LEVEL = "is called at 3 places, and not every call is followed by"
EFFICIENTDET_BN = frozenset([
    "backbone.0.1", "backbone.1.1", "backbone.2.1", "bifpn.p3_down_channel.1", "bifpn.p4_down_channel.1",
    "bifpn.p5_down_channel.1", *(f"bifpn.{conv}.bn" for conv in ("conv4_up", "conv3_up", "conv4_down", "conv5_down"))])
# The shared pointwise conv of layer i cannot absorb three different BNs; in ONNX each call is its own Conv
# node, so each gets its own copy of the weight and every per-level BN folds.
EFFICIENTDET_KEPT = {f"regressor.bn_list.{level}.{i}": _PER_LEVEL for level in range(3) for i in range(2)}

# ---------------------------------------------------------------------------------------------------------
# 8. SiamFC (rafellerc/Pytorch-SiamFC): one AlexNet-like embedding called on the exemplar and on the search
#    image (each conv module and each BN module called twice), cross-correlation as F.conv2d of the search
#    embedding with the exemplar embedding as weight (groups=batch), then match_batchnorm: BatchNorm2d(1)
#    after a conv whose weight is an activation, so it is kept. The exemplar is the centre crop of the
#    search image, so the model takes one input.
# ---------------------------------------------------------------------------------------------------------


class SiamFC(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding_net = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=5, stride=2, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(8, 12, kernel_size=3, stride=1, groups=2, bias=True), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 8, kernel_size=3, stride=1, bias=True))
        self.match_batchnorm = nn.BatchNorm2d(1)

    def match_corr(self, embed_ref: torch.Tensor, embed_srch: torch.Tensor) -> torch.Tensor:
        b, c, h, w = embed_srch.shape
        match_map = F.conv2d(embed_srch.view(1, b * c, h, w), embed_ref, groups=b)
        return self.match_batchnorm(match_map.permute(1, 0, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exemplar = x[:, :, 8:40, 8:40]
        return self.match_corr(self.embedding_net(exemplar), self.embedding_net(x))


# The reason names the op and where its weight comes from (it named the graph node, `conv2d_6`, before).
SIAMFC_KEPT = {"match_batchnorm": "computes its weight at run time (from embedding_net.7)"}

# ---------------------------------------------------------------------------------------------------------
# The entries
# ---------------------------------------------------------------------------------------------------------


def yolov8() -> nn.Module:
    return _build(YoloV8, 70)


def darts() -> nn.Module:
    return _build(NetworkCIFAR, 71)


def resnest() -> nn.Module:
    return _build(ResNeSt, 72)


def hrnet() -> nn.Module:
    return _build(HRNet, 73)


def slowfast() -> nn.Module:
    return _build(SlowFast, 74)


def tresnet() -> nn.Module:
    return _build(TResNet, 75)


def efficientdet() -> nn.Module:
    return _build(EfficientDet, 76)


def siamfc() -> nn.Module:
    return _build(SiamFC, 77)


ROUND3 = [
    ZooModel("yolov8", yolov8, (1, 3, 16, 16),
             "Conv(BN, shared SiLU), C2f with chunk and split, SPPF, Detect towers, DFL softmax + fixed conv",
             YOLOV8_BN),
    ZooModel("darts", darts, (1, 3, 16, 16),
             "ReLU-Conv-BN, SepConv, DilConv, cell sums and cat, FactorizedReduce (BN over the cat of two convs)",
             DARTS_BN),
    ZooModel("resnest", resnest, (1, 3, 32, 32),
             "deep stem, SplitAttn (radix reshape, sum, GAP, fc1+BN on 1x1 maps, rSoftMax), avd, avg_down",
             RESNEST_BN),
    ZooModel("hrnet", hrnet, (1, 3, 32, 32),
             "parallel resolutions, fuse layers (1x1 conv+BN+nearest Upsample, strided conv+BN chains), "
             "branch sums, bilinear upsample + cat head", HRNET_BN),
    ZooModel("slowfast", slowfast, (1, 3, 8, 16, 16),
             "strided frame slicing into two Conv3d pathways, time-strided lateral Conv3d+BN, cat, bottlenecks",
             SLOWFAST_BN),
    ZooModel("tresnet", tresnet, (1, 3, 32, 32),
             "SpaceToDepth, InPlaceABN look-alike (F.batch_norm + leaky_relu), anti-alias buffer filter, SE",
             TRESNET_BN),
    ZooModel("efficientdet", efficientdet, (1, 3, 32, 32),
             "Conv2dStaticSamePadding, BiFPN fast normalized fusion, separable convs shared across levels "
             "with per-level BN", EFFICIENTDET_BN, EFFICIENTDET_KEPT, onnx_kept={}),
    ZooModel("siamfc", siamfc, (1, 3, 48, 48),
             "embedding called on exemplar and search (each BN called twice), cross-correlation with the "
             "exemplar as weight, BN after it", frozenset(["embedding_net.1", "embedding_net.5"]), SIAMFC_KEPT,
             onnx_dynamic_batch=False),
]
BY_NAME_ROUND3 = {entry.name: entry for entry in ROUND3}


# ---------------------------------------------------------------------------------------------------------
# Converted models: ResNeSt (whose radix reshape and sum run on channels_last strides) after
# `.to(memory_format=torch.channels_last)`, and TResNet (with its F.batch_norm look-alike) in `.double()`
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Float64ZooModel(ZooModel):
    """An entry whose model runs in float64: its examples are float64 too."""

    def example(self, batch: int | None = None, seed: int = 0) -> torch.Tensor:
        return super().example(batch, seed).double()


def resnest_channels_last() -> nn.Module:
    return resnest().to(memory_format=torch.channels_last)


def tresnet_float64() -> nn.Module:
    return tresnet().double()


CHANNELS_LAST = dataclasses.replace(BY_NAME_ROUND3["resnest"], name="resnest_channels_last",
                                    factory=resnest_channels_last)
FLOAT64 = Float64ZooModel(**{**vars(BY_NAME_ROUND3["tresnet"]), "name": "tresnet_float64",
                             "factory": tresnet_float64})
BY_NAME = {entry.name: entry for entry in [*ROUND3, CHANNELS_LAST, FLOAT64]}

# The trace records SiamFC's groups=batch as a constant, so the traced original runs at its trace's batch alone;
# so does the ONNX export, whose Conv group is an attribute (recalibration runs batches of 16).
BATCH_COUPLED = "the cross-correlation's groups=batch is a constant once traced or exported"


FLOAT32 = [entry.name for entry in [*ROUND3, CHANNELS_LAST]]  # export_onnx and calibration data are float32


def entries(names: list[str] | None = None, **marked: dict[str, str]) -> list:
    return acceptance.marked_params(BY_NAME, names, **marked)


# ---------------------------------------------------------------------------------------------------------
# Fold
# ---------------------------------------------------------------------------------------------------------


def test_ground_truth_covers_every_bn() -> None:
    more.assert_ground_truth_covers_every_bn(ROUND3)


@pytest.mark.parametrize("entry", entries())
def test_fold_eager(entry: ZooModel) -> None:
    more.test_fold_eager(entry)


@pytest.mark.parametrize("entry", entries(FLOAT32))
def test_fold_onnx(entry: ZooModel, tmp_path: Path) -> None:
    acceptance.test_fold_onnx_export(acceptance.OnnxCase(entry, tmp_path))


@pytest.mark.parametrize("entry", entries())
def test_fold_pt2(entry: ZooModel, tmp_path: Path) -> None:
    acceptance.test_fold_pt2_dynamic_batch(entry, tmp_path)


@pytest.mark.parametrize("entry", entries())
def test_fold_torchscript(entry: ZooModel) -> None:
    """The model traced at batch 2 folds as the eager one does and runs at batches 2 and 3 (where the traced
    original does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(entry.factory(), entry.example(batch=2))
    report = bnfold.fold(traced, input_shape=entry.shape_text(batch=2))
    acceptance.assert_decisions(report, entry)
    acceptance.assert_verified(report)
    more.assert_kept_reasons(report, entry)
    for batch in (2,) if entry.name == "siamfc" else (2, 3):
        x = entry.example(batch=batch, seed=7)
        assert rel_error(forward(entry.factory(), x), forward(report.folded_model.module, x)) <= REL_TOLERANCE


class StaticSamePaddingHead(nn.Module):
    """conv + BN, then a Conv2dStaticSamePadding: a small traced model whose size arithmetic has a `k - w`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = Conv2dStaticSamePadding(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv(x))))


def fold_traced_static_same_padding():
    """The fold of a traced StaticSamePaddingHead at 2x3x16x16, checked to fold `bn` and compute alike."""
    model = _build(StaticSamePaddingHead, 78)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    report = bnfold.fold(traced, input_shape="2,3,16,16")
    assert [d.layer for d in report.folded] == ["bn"]
    assert rel_error(forward(model, x), forward(report.folded_model.module, x)) <= REL_TOLERANCE
    return report


def test_traced_static_same_padding_folds() -> None:
    """A traced `k - w` on a size (aten.rsub) had no Python arithmetic and went back as torch.rsub, which
    takes no int: fold crashed with 'aten::rsub() Expected a value of type Tensor'."""
    assert fold_traced_static_same_padding().notes == []


# ---------------------------------------------------------------------------------------------------------
# Recalibrate and inspect
# ---------------------------------------------------------------------------------------------------------

METHODS = ["exact", "fast"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", entries(FLOAT32))
def test_recalibrate_eager(entry: ZooModel, method: str) -> None:
    patterns.test_recalibrate_eager(entry, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", entries(FLOAT32, skip={"siamfc": BATCH_COUPLED}))
def test_recalibrate_onnx(entry: ZooModel, method: str, tmp_path: Path) -> None:
    patterns.test_recalibrate_onnx(entry, method, tmp_path)


@pytest.mark.parametrize("entry", entries())
def test_inspect_lists_every_bn_with_its_channels(entry: ZooModel) -> None:
    more.test_inspect_lists_every_bn_with_its_channels(entry)


@pytest.mark.parametrize("method", METHODS)
def test_recalibrate_float64_model(method: str) -> None:
    """A float64 model recalibrated from float32 data holds the oracle's statistics and computes its outputs."""
    entry = FLOAT64
    found = patterns._oracle(entry, method, ddof=1)
    report = bnfold.recalibrate(entry.factory(), calibration_data(entry), method=method, batch_size=BATCH)
    assert_skipped(report, {})
    result = report.result.module
    assert all(tensor.dtype == torch.float64 for tensor in result.state_dict().values() if tensor.is_floating_point())
    assert_recalibrated(report, module_statistics(result, found), found)
    x = probe_input(entry).double()
    assert rel_error(outputs(found.reference_model(), x), outputs(result, x)) <= OUTPUT_TOLERANCE


def test_a_size_op_with_no_python_arithmetic_fixes_the_size_with_a_note(monkeypatch) -> None:
    """Without a Python form of a traced size op (aten.rsub had none), the binding check ran the op on the
    Python numbers the bindings before it gave, and fold crashed; it now traces the converter's ops as they
    are, which fix the sizes, and the report says at which size the folded model runs."""
    monkeypatch.delitem(engine.SIZE_ARITHMETIC, torch.ops.aten.rsub.Scalar)
    monkeypatch.delitem(engine.SIZE_ARITHMETIC, torch.ops.aten.rsub.Tensor)
    report = fold_traced_static_same_padding()
    assert report.notes == ["the folded TorchScript model runs at the --input-shape size of axis 2 (16) and size of "
                            "axis 3 (16) alone (at 32: other outputs than the folded graph): torch.jit.trace wrote "
                            "the example's sizes into shape arithmetic bnfold cannot trace"]
