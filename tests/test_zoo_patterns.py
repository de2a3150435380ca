"""Architecture patterns of popular model libraries that `tests/zoo.py` does not cover, folded and recalibrated.

Each model re-creates, at toy size, a block the way its upstream project writes it (torchvision's
Inception-v3 and ShuffleNetV2, ultralytics' YOLOv5, DingXiaoH's RepVGG, PointNet, Res2Net, DeepLab's
Xception, HRNet, GhostNet), with the hand-derived set of BN layers that fold exactly. They are kept out of
the zoo's `ZOO` list (which parametrizes hundreds of tests) and checked here per format:

- fold: the eager module, its ONNX export, a `.pt2` program and TorchScript fold exactly the foldable set,
  keep the rest with a reason, and compute what the original computes;
- recalibrate: exact and fast, eager and ONNX, hold against the float64 oracle;
- inspect: every BN layer with its channel count and eps.
"""

from __future__ import annotations

import functools
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
from bnfold.layers import FoldStatus
from tests.recalibration_oracle import BatchNormOracle
from tests.test_zoo_acceptance import REL_TOLERANCE, check_torch_fold, forward, rel_error
from tests.test_zoo_recalibration import (
    BATCH,
    OUTPUT_TOLERANCE,
    assert_recalibrated,
    assert_skipped,
    calibration_data,
    module_statistics,
    onnx_statistics,
    outputs,
    probe_input,
)
from tests.zoo import ZooModel, _build, export_onnx

# ---------------------------------------------------------------------------------------------------------
# 1. Inception-v3 (torchvision): BasicConv2d with eps 0.001, asymmetric 1x7/7x1 convs, an avg-pool branch
# ---------------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 4, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, channels_7x7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(channels_7x7, channels_7x7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(channels_7x7, 4, kernel_size=(7, 1), padding=(3, 0))
        self.branch_pool = BasicConv2d(in_channels, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch7x7, branch_pool], 1)


class InceptionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 8, kernel_size=3, stride=2)
        self.Mixed_6a = InceptionC(8, 6)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Mixed_6a(self.Conv2d_1a_3x3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


# ---------------------------------------------------------------------------------------------------------
# 2. ShuffleNetV2 (torchvision): chunk, channel shuffle by view/transpose, depthwise conv+BN without activation
# ---------------------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, bias=False, groups=inp), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, 1, 0, bias=False), nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features), nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 3, stride, 1, bias=False, groups=branch_features),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, 1, 0, bias=False), nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))
        self.conv5 = nn.Sequential(nn.Conv2d(16, 24, 1, 1, 0, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage2(self.conv1(x)))
        return self.fc(x.mean([2, 3]))


def _shuffle_unit(prefix: str, stride: int) -> list[str]:
    names = [f"{prefix}.branch2.1", f"{prefix}.branch2.4", f"{prefix}.branch2.6"]
    return names + ([f"{prefix}.branch1.1", f"{prefix}.branch1.3"] if stride > 1 else [])


# ---------------------------------------------------------------------------------------------------------
# 3. YOLOv5 (ultralytics): Conv with a class-level SiLU shared by every instance, C3, SPPF, a neck that
#    upsamples and concatenates, built from a layer list with `f` (from) indices as yolo.py's Model does
# ---------------------------------------------------------------------------------------------------------


def autopad(k: int, p: int | None = None) -> int:
    return k // 2 if p is None else p


class Conv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class YoloBottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(YoloBottleneck(c_, c_, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Detect(nn.Module):
    def __init__(self, nc: int, na: int, ch: tuple[int, ...]) -> None:
        super().__init__()
        self.no, self.na = nc + 5, na
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        for i in range(len(self.m)):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
        return torch.cat([xi.flatten(1, 3) for xi in x], 1)


def initialize_weights(model: nn.Module) -> None:
    """yolov5's utils.torch_utils.initialize_weights: BN eps 1e-3 and momentum 0.03 everywhere."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif type(m) in (nn.SiLU, nn.ReLU):
            m.inplace = True


class YoloV5(nn.Module):
    """yolo.py's Model: layers in one Sequential, each with `f` (the outputs it reads, -1 the previous) and
    `i` (its index); `save` lists the outputs that later layers read."""

    def __init__(self) -> None:
        super().__init__()
        spec = [  # (from, module)
            (-1, Conv(3, 8, 3, 2)), (-1, Conv(8, 16, 3, 2)), (-1, C3(16, 16, 1)), (-1, Conv(16, 16, 3, 2)),
            (-1, SPPF(16, 16)), (-1, Conv(16, 8, 1, 1)), (-1, nn.Upsample(None, 2, "nearest")),
            ([-1, 2], Concat(1)), (-1, C3(24, 16, 1, False)), ([8, 4], Detect(2, 2, (16, 16))),
        ]
        for index, (source, module) in enumerate(spec):
            module.f, module.i = source, index
        self.model = nn.Sequential(*(module for _, module in spec))
        self.save = sorted({x % i for i, (f, _) in enumerate(spec) for x in ([f] if isinstance(f, int) else f)
                            if x != -1})
        initialize_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def _yolo_conv(*prefixes: str) -> list[str]:
    return [f"model.{prefix}.bn" for prefix in prefixes]


# ---------------------------------------------------------------------------------------------------------
# 4. RepVGG (training form): 3x3 conv+BN, 1x1 conv+BN and a BN on the block's input alone, summed, ReLU
# ---------------------------------------------------------------------------------------------------------


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> nn.Sequential:
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False))
    result.add_module("bn", nn.BatchNorm2d(num_features=out_channels))
    return result


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        same = out_channels == in_channels and stride == 1
        self.rbr_identity = nn.BatchNorm2d(num_features=in_channels) if same else None
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, 1)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class RepVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage0 = RepVGGBlock(3, 8, stride=2)
        self.stage1 = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8))
        self.linear = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage1(self.stage0(x))
        return self.linear(F.adaptive_avg_pool2d(out, 1).view(out.size(0), -1))



# ---------------------------------------------------------------------------------------------------------
# 5. PointNet: Conv1d(k=1)+BN1d on (N, C, L) points, a T-Net whose matrix is applied by bmm, max over
#    points, Linear+BN1d heads (one with Dropout between the Linear and its BN), two outputs
# ---------------------------------------------------------------------------------------------------------


class STN3d(nn.Module):
    def __init__(self, channel: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv1d(channel, 8, 1)
        self.conv2 = torch.nn.Conv1d(8, 16, 1)
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 9)
        self.bn1 = nn.BatchNorm1d(8)
        self.bn2 = nn.BatchNorm1d(16)
        self.bn3 = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batchsize = x.size()[0]
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.max(x, 2, keepdim=True)[0]
        x = x.view(-1, 16)
        x = F.relu(self.bn3(self.fc1(x)))
        x = self.fc2(x)
        iden = torch.from_numpy(np.array([1, 0, 0, 0, 1, 0, 0, 0, 1]).astype(np.float32)).view(1, 9)
        x = x + iden.repeat(batchsize, 1)
        return x.view(-1, 3, 3)


class PointNetEncoder(nn.Module):
    def __init__(self, channel: int = 3) -> None:
        super().__init__()
        self.stn = STN3d(channel)
        self.conv1 = torch.nn.Conv1d(channel, 8, 1)
        self.conv2 = torch.nn.Conv1d(8, 16, 1)
        self.bn1 = nn.BatchNorm1d(8)
        self.bn2 = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trans = self.stn(x)
        x = x.transpose(2, 1)
        x = torch.bmm(x, trans)
        x = x.transpose(2, 1)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x = torch.max(x, 2, keepdim=True)[0]
        return x.view(-1, 16), trans


class PointNetCls(nn.Module):
    def __init__(self, k: int = 4) -> None:
        super().__init__()
        self.feat = PointNetEncoder()
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, k)
        self.dropout = nn.Dropout(p=0.4)
        self.bn1 = nn.BatchNorm1d(8)
        self.bn2 = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, trans = self.feat(x)
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.dropout(self.fc2(x))))
        x = self.fc3(x)
        return F.log_softmax(x, dim=1), trans


class PointNetScores(PointNetCls):
    """The classifier's first output alone, for helpers that compare one output tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


# ---------------------------------------------------------------------------------------------------------
# 6. Res2Net Bottle2neck: torch.split into width chunks, a loop where each chunk adds the previous output
# ---------------------------------------------------------------------------------------------------------


class Bottle2neck(nn.Module):
    expansion = 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 32, scale: int = 4, stype: str = "normal") -> None:
        super().__init__()
        width = int(math.floor(planes * (base_width / 64.0)))
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.nums = 1 if scale == 1 else scale - 1
        if stype == "stage":
            self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, stride, 1, bias=False) for _ in range(self.nums))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(self.nums))
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stype, self.scale, self.width = stype, scale, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        for i in range(self.nums):
            sp = spx[i] if i == 0 or self.stype == "stage" else sp + spx[i]
            sp = self.relu(self.bns[i](self.convs[i](sp)))
            out = sp if i == 0 else torch.cat((out, sp), 1)
        if self.stype == "normal":
            out = torch.cat((out, spx[self.nums]), 1)
        else:
            out = torch.cat((out, self.pool(spx[self.nums])), 1)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class Res2Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        downsample = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                   nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(Bottle2neck(8, 8, 2, downsample, stype="stage"), Bottle2neck(16, 8))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _bottle2neck(prefix: str) -> list[str]:
    return [f"{prefix}.bn1", f"{prefix}.bn3", *(f"{prefix}.bns.{i}" for i in range(3))]


# ---------------------------------------------------------------------------------------------------------
# 7. Xception (DeepLabv3+): fixed_padding by F.pad, dilated depthwise conv -> BN -> pointwise conv with no
#    activation between; HRNet fuse layers: conv+BN then nn.Upsample or F.interpolate; GhostNet: primary
#    and cheap depthwise conv+BN, concatenated then sliced to the output width; BN with momentum=None
# ---------------------------------------------------------------------------------------------------------


def fixed_padding(inputs: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    kernel_size_effective = kernel_size + (kernel_size - 1) * (dilation - 1)
    pad_total = kernel_size_effective - 1
    pad_beg = pad_total // 2
    pad_end = pad_total - pad_beg
    return F.pad(inputs, (pad_beg, pad_end, pad_beg, pad_end))


class SeparableConv2d(nn.Module):
    def __init__(self, inplanes: int, planes: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, inplanes, kernel_size, stride, 0, dilation, groups=inplanes, bias=False)
        self.bn = nn.BatchNorm2d(inplanes)
        self.pointwise = nn.Conv2d(inplanes, planes, 1, 1, 0, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fixed_padding(x, self.conv1.kernel_size[0], dilation=self.conv1.dilation[0])
        x = self.conv1(x)
        x = self.bn(x)
        return self.pointwise(x)


class GhostModule(nn.Module):
    def __init__(self, inp: int, oup: int, ratio: int = 2, dw_size: int = 3) -> None:
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = nn.Sequential(nn.Conv2d(inp, init_channels, 1, 1, 0, bias=False),
                                          nn.BatchNorm2d(init_channels), nn.ReLU(inplace=True))
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.oup, :, :]


class MixedNeck(nn.Module):
    """An Xception entry, two HRNet resolutions fused both ways, a Ghost module, a momentum=None BN."""

    def __init__(self) -> None:
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8, momentum=None),
                                   nn.ReLU(inplace=True))
        self.sep = SeparableConv2d(8, 8, 3, dilation=2)
        self.sep_bn = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(inplace=True))
        self.fuse_up = nn.Sequential(nn.Conv2d(12, 8, 1, 1, 0, bias=False), nn.BatchNorm2d(8),
                                     nn.Upsample(scale_factor=2, mode="nearest"))
        self.fuse_down = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1, bias=False), nn.BatchNorm2d(12))
        self.fuse_bilinear = nn.Sequential(nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.ghost = GhostModule(8, 7)
        self.fc = nn.Linear(7 + 12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.sep_bn(self.sep(self.entry(x))))
        low = self.down(x)
        high = F.relu(x + self.fuse_up(low))
        low = F.relu(low + self.fuse_down(x))
        height, width = high.shape[2], high.shape[3]
        high = high + F.interpolate(self.fuse_bilinear(low), size=[height, width], mode="bilinear",
                                    align_corners=False)
        return self.fc(torch.cat([self.ghost(high).mean((2, 3)), low.mean((2, 3))], 1))


# ---------------------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------------------


def inception() -> nn.Module:
    return _build(InceptionNet, 41)


def shufflenet() -> nn.Module:
    return _build(ShuffleNetV2, 42)


def yolov5() -> nn.Module:
    return _build(YoloV5, 43)


def repvgg() -> nn.Module:
    return _build(RepVGG, 44)


def pointnet() -> nn.Module:
    return _build(PointNetScores, 45)


def res2net() -> nn.Module:
    return _build(Res2Net, 46)


def mixed_neck() -> nn.Module:
    return _build(MixedNeck, 47)


PATTERNS = [
    ZooModel(
        "inception", inception, (1, 3, 16, 16), "BasicConv2d eps 1e-3, 1x7/7x1 convs, avg-pool branch, cat",
        frozenset(f"{prefix}.bn" for prefix in (
            "Conv2d_1a_3x3", "Mixed_6a.branch1x1", "Mixed_6a.branch7x7_1", "Mixed_6a.branch7x7_2",
            "Mixed_6a.branch7x7_3", "Mixed_6a.branch_pool"))),
    ZooModel(
        "shufflenet", shufflenet, (1, 3, 16, 16), "chunk, channel shuffle, depthwise conv+BN without activation",
        frozenset(["conv1.1", "conv5.1", *_shuffle_unit("stage2.0", 2), *_shuffle_unit("stage2.1", 1)])),
    ZooModel(
        "yolov5", yolov5, (1, 3, 16, 16), "Conv(conv, bn, shared SiLU), C3, SPPF, upsample+concat neck, Detect",
        frozenset(_yolo_conv("0", "1", "2.cv1", "2.cv2", "2.cv3", "2.m.0.cv1", "2.m.0.cv2", "3", "4.cv1",
                             "4.cv2", "5", "8.cv1", "8.cv2", "8.cv3", "8.m.0.cv1", "8.m.0.cv2"))),
    ZooModel(
        "repvgg", repvgg, (1, 3, 16, 16), "3x3 conv+BN + 1x1 conv+BN + identity BN, summed",
        # the identity BN (of the block's input, a ReLU output) folds into the centre tap of the 3x3 conv
        # beside it, as RepVGG's own reparameterization does, once that conv's BN has folded
        frozenset([*(f"{prefix}.{branch}.bn" for prefix in ("stage0", "stage1.0", "stage1.1")
                     for branch in ("rbr_dense", "rbr_1x1")), "stage1.0.rbr_identity", "stage1.1.rbr_identity"])),
    ZooModel(
        "pointnet", pointnet, (1, 3, 32), "Conv1d+BN1d on points, T-Net bmm, max over points, Linear+BN1d",
        frozenset(["feat.stn.bn1", "feat.stn.bn2", "feat.stn.bn3", "feat.bn1", "feat.bn2", "bn1", "bn2"])),
    ZooModel(
        "res2net", res2net, (1, 3, 16, 16), "split into width chunks, hierarchical adds in a loop, cat",
        frozenset(["bn1", "layer1.0.downsample.2", *_bottle2neck("layer1.0"), *_bottle2neck("layer1.1")])),
    ZooModel(
        "mixed_neck", mixed_neck, (1, 3, 16, 16),
        "Xception separable conv (F.pad, dilated depthwise, BN, pointwise), HRNet fuse with Upsample and "
        "F.interpolate, Ghost module sliced after cat, momentum=None",
        frozenset(["entry.1", "sep.bn", "sep_bn", "down.1", "fuse_up.1", "fuse_down.1", "fuse_bilinear.1",
                   "ghost.primary_conv.1", "ghost.cheap_operation.1"])),
]
BY_NAME = {entry.name: entry for entry in PATTERNS}


def patterns() -> list:
    return [pytest.param(entry, id=entry.name) for entry in PATTERNS]


# ---------------------------------------------------------------------------------------------------------
# Fold
# ---------------------------------------------------------------------------------------------------------


def test_ground_truth_covers_every_bn() -> None:
    for entry in PATTERNS:
        model = entry.factory()
        names = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        assert names == set(entry.bn_layers), entry.name


@pytest.mark.parametrize("entry", patterns())
def test_fold_eager(entry: ZooModel) -> None:
    model = entry.factory()
    check_torch_fold(bnfold.fold(model, input_shape=entry.shape_text(batch=2)), entry, model)


@pytest.mark.parametrize("entry", patterns())
def test_fold_onnx(entry: ZooModel, tmp_path: Path) -> None:
    acceptance.test_fold_onnx_export(acceptance.OnnxCase(entry, tmp_path))


@pytest.mark.parametrize("entry", patterns())
def test_fold_pt2(entry: ZooModel, tmp_path: Path) -> None:
    acceptance.test_fold_pt2_dynamic_batch(entry, tmp_path)


SCRIPTABLE = ["inception", "repvgg", "shufflenet"]  # the others' Python does not script: traced


@functools.cache
def torchscript_fold(name: str):
    """The fold of the model scripted (or traced where its Python does not script), at batch 2."""
    entry = BY_NAME[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in SCRIPTABLE:
            compiled = torch.jit.script(entry.factory())
        else:
            compiled = torch.jit.trace(entry.factory(), entry.example(batch=2))
    return bnfold.fold(compiled, input_shape=entry.shape_text(batch=2))


@pytest.mark.parametrize("entry", patterns())
def test_fold_torchscript(entry: ZooModel) -> None:
    report = torchscript_fold(entry.name)
    acceptance.assert_decisions(report, entry)
    acceptance.assert_verified(report)
    x = entry.example(batch=2, seed=7)
    assert rel_error(forward(entry.factory(), x), forward(report.folded_model.module, x)) <= REL_TOLERANCE


@pytest.mark.parametrize("entry", patterns())
def test_folded_torchscript_runs_at_another_batch_size(entry: ZooModel) -> None:
    report = torchscript_fold(entry.name)
    x = entry.example(batch=3, seed=7)
    assert rel_error(forward(entry.factory(), x), forward(report.folded_model.module, x)) <= REL_TOLERANCE


def test_fold_keeps_two_outputs(tmp_path: Path) -> None:
    """PointNet's classifier returns its scores and the T-Net's matrix: both verified, eager and ONNX."""
    model, entry = _build(PointNetCls, 45), BY_NAME["pointnet"]
    x = entry.example(batch=3, seed=7)
    for source in (model, export_onnx(model, entry.input_shape, tmp_path / "pointnet.onnx")):
        report = bnfold.fold(source, input_shape=entry.shape_text(batch=2))
        assert report and report.verified and report.difference.compared > 0
        assert len(report.folded) == len(entry.foldable) and not report.kept
    folded = bnfold.fold(model, input_shape=entry.shape_text(batch=2)).folded_model.module
    with torch.no_grad():
        for expected, actual in zip(model(x), folded(x), strict=True):
            assert rel_error(expected.numpy(), actual.numpy()) <= REL_TOLERANCE


def test_fold_keeps_channels_last_weights() -> None:
    """`model.to(memory_format=torch.channels_last)`: the folded conv weights stay channels_last (they were
    written contiguous, leaving a model prepared for NHWC kernels with mixed layouts)."""
    entry = BY_NAME["inception"]
    model = entry.factory().to(memory_format=torch.channels_last)
    report = bnfold.fold(model, input_shape=entry.shape_text(batch=2))
    check_torch_fold(report, entry, model)
    weights = {name: weight for name, weight in report.folded_model.module.named_parameters() if weight.dim() == 4}
    assert len(weights) == len(entry.foldable)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights.values())


# ---------------------------------------------------------------------------------------------------------
# Recalibrate
# ---------------------------------------------------------------------------------------------------------

METHODS = ["exact", "fast"]


def _oracle(entry: ZooModel, method: str, **options) -> BatchNormOracle:
    found = BatchNormOracle(entry.factory(), calibration_data(entry), batch=BATCH, **options)
    return found.exact() if method == "exact" else found.fast()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", patterns())
def test_recalibrate_eager(entry: ZooModel, method: str) -> None:
    found = _oracle(entry, method, ddof=1)
    assert set(found.statistics) == set(entry.bn_layers)
    report = bnfold.recalibrate(entry.factory(), calibration_data(entry), method=method, batch_size=BATCH)
    assert_skipped(report, {})
    result = report.result.module
    assert_recalibrated(report, module_statistics(result, found), found)
    x = probe_input(entry)
    assert rel_error(outputs(found.reference_model(), x.double()), outputs(result, x)) <= OUTPUT_TOLERANCE


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", patterns())
def test_recalibrate_onnx(entry: ZooModel, method: str, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(export_onnx(entry.factory(), entry.input_shape, tmp_path / f"{entry.name}.onnx")))
    found = _oracle(entry, method, ddof=0, per_call=True)
    report = bnfold.recalibrate(proto, calibration_data(entry), method=method, batch_size=BATCH)
    assert_skipped(report, {})
    assert_recalibrated(report, onnx_statistics(report.result.proto, entry, set()), found)
    x = probe_input(entry)
    (actual,) = acceptance.ort_session(report.result.proto.SerializeToString()).run(None, {"input": x.numpy()})
    assert rel_error(found.outputs(x), actual) <= OUTPUT_TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# Inspect
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", patterns())
def test_inspect_lists_every_bn_with_its_channels(entry: ZooModel) -> None:
    model = entry.factory()
    expected = {name: (m.num_features, m.eps) for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    report = bnfold.inspect(model, input_shape=entry.shape_text(batch=2))
    assert {layer.name: (layer.channels, layer.eps) for layer in report.layers} == expected
    assert report.folds is not None
    assert {name for name, d in report.folds.items() if d.status is not FoldStatus.KEPT} == entry.foldable
