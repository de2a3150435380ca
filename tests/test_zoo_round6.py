"""A sixth round of upstream-style architectures, folded, recalibrated and inspected per format.

Each model re-creates, at toy size, the way its upstream project writes it (torchvision's ShuffleNetV2 and
Inception-v3 blocks, Res2Net's Bottle2neck net, pppLang's SKNet, locuslab's ConvMixer, fxia22's PointNet, MoCo v3
and BYOL projection and prediction heads, apple's MobileViT block), with the hand-derived set of BN layers that
fold exactly and the reason each other one is kept. ShuffleNetV2, Res2Net, Inception-v3 and PointNet grow
test_zoo_patterns.py's smaller versions (whose blocks they reuse) into the whole nets, InceptionA/B/E and the
feature transform. They are checked as test_zoo_round5.py checks its models (fold eager/ONNX/.pt2/TorchScript
at another batch size, recalibrate exact and fast against the oracle, inspect), from two tables of checks.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tests.test_zoo_acceptance as acceptance
import tests.test_zoo_more as more
import tests.test_zoo_round4 as round4
from tests.test_zoo_round5 import _NOT_A_LAYER
from tests.test_zoo_patterns import BasicConv2d, Bottle2neck, ShuffleUnit, _bottle2neck, _shuffle_unit
from tests.zoo import ZooModel, _build

# ---------------------------------------------------------------------------------------------------------
# 1. ShuffleNetV2 (torchvision shufflenetv2.py): the whole net around test_zoo_patterns' unit (chunk when
#    stride is 1, branch1/branch2 with depthwise conv+BN, cat, channel_shuffle by view/transpose/view): conv1,
#    max-pool, the stage loop that setattr's stage2..stage4 with a strided unit first, conv5, x.mean([2, 3]), fc
# ---------------------------------------------------------------------------------------------------------


class ShuffleNetV2(nn.Module):
    def __init__(self, stages_repeats: tuple[int, ...] = (2, 2, 1),
                 stages_out_channels: tuple[int, ...] = (8, 16, 24, 32, 40), num_classes: int = 5) -> None:
        super().__init__()
        input_channels = 3
        output_channels = stages_out_channels[0]
        self.conv1 = nn.Sequential(nn.Conv2d(input_channels, output_channels, 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(output_channels), nn.ReLU(inplace=True))
        input_channels = output_channels
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for name, repeats, output_channels in zip(["stage2", "stage3", "stage4"], stages_repeats,
                                                  stages_out_channels[1:]):
            seq = [ShuffleUnit(input_channels, output_channels, 2)]
            for _ in range(repeats - 1):
                seq.append(ShuffleUnit(output_channels, output_channels, 1))
            setattr(self, name, nn.Sequential(*seq))
            input_channels = output_channels
        output_channels = stages_out_channels[-1]
        self.conv5 = nn.Sequential(nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(output_channels), nn.ReLU(inplace=True))
        self.fc = nn.Linear(output_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


# Every BN follows a conv that only it reads (the depthwise BNs' outputs go on to a 1x1 conv, after the BN);
# the chunk, the cat of the passed-through half and the shuffle's view/transpose come after the ReLUs.
SHUFFLENET_BN = frozenset(["conv1.1", "conv5.1", *_shuffle_unit("stage2.0", 2), *_shuffle_unit("stage2.1", 1),
                           *_shuffle_unit("stage3.0", 2), *_shuffle_unit("stage3.1", 1),
                           *_shuffle_unit("stage4.0", 2)])

# ---------------------------------------------------------------------------------------------------------
# 2. Res2Net (Res2Net-PretrainedModels res2net.py, v1): the net around test_zoo_patterns' Bottle2neck (split
#    by width, hierarchical `sp + spx[i]`, convs/bns ModuleLists, cat, AvgPool on the last split in a 'stage'
#    block): 7x7 stem, max-pool, `_make_layer` with a strided 1x1 conv+BN downsample (no AvgPool, unlike v1b)
#    and its first block 'stage' even at stride 1 (the AvgPool keeps the size), `out += residual`
# ---------------------------------------------------------------------------------------------------------


class Res2Net(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (1, 2), baseWidth: int = 32, scale: int = 4,
                 num_classes: int = 5) -> None:
        super().__init__()
        self.inplanes = 8
        self.baseWidth = baseWidth
        self.scale = scale
        self.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(Bottle2neck, 8, layers[0])
        self.layer2 = self._make_layer(Bottle2neck, 16, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16 * Bottle2neck.expansion, num_classes)

    def _make_layer(self, block: type[Bottle2neck], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample=downsample, stype="stage",
                        base_width=self.baseWidth, scale=self.scale)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, base_width=self.baseWidth, scale=self.scale))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layer2(self.layer1(x)))
        return self.fc(x.view(x.size(0), -1))


# Every BN follows a conv that only it reads: bn1's output is split (and, post-ReLU, summed into the next
# split's input) after the BN; each bns[i] follows its own conv; bn3 and the downsample BN are summed after
# their convs, each conv's output read by its BN alone.
RES2NET_BN = frozenset(["bn1", *_bottle2neck("layer1.0"), "layer1.0.downsample.1", *_bottle2neck("layer2.0"),
                        "layer2.0.downsample.1", *_bottle2neck("layer2.1")])

# ---------------------------------------------------------------------------------------------------------
# 3. SKNet (pppLang/SKNet sknet.py): SKConv = M grouped, dilated 3x3 conv+BN+ReLU branches, cat and view to
#    (B, M, C, H, W), `torch.sum(feats, dim=1)`, global pool, fc = 1x1 Conv+BN+ReLU on (B, d, 1, 1), one 1x1
#    conv per branch, cat, view, softmax over the branches, `torch.sum(feats * attention, dim=1)`; SKUnit =
#    1x1 conv+BN+ReLU, SKConv, 1x1 conv+BN, `relu(out + shortcut(residual))` with a conv+BN shortcut
# ---------------------------------------------------------------------------------------------------------


class SKConv(nn.Module):
    def __init__(self, features: int, M: int = 2, G: int = 32, r: int = 16, stride: int = 1, L: int = 32) -> None:
        super().__init__()
        d = max(int(features / r), L)
        self.M = M
        self.features = features
        self.convs = nn.ModuleList([])
        for i in range(M):
            self.convs.append(nn.Sequential(
                nn.Conv2d(features, features, kernel_size=3, stride=stride, padding=1 + i, dilation=1 + i, groups=G,
                          bias=False),
                nn.BatchNorm2d(features),
                nn.ReLU(inplace=True)))
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Sequential(nn.Conv2d(features, d, kernel_size=1, stride=1, bias=False), nn.BatchNorm2d(d),
                                nn.ReLU(inplace=True))
        self.fcs = nn.ModuleList([])
        for _ in range(M):
            self.fcs.append(nn.Conv2d(d, features, kernel_size=1, stride=1))
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = x.shape[0]
        feats = [conv(x) for conv in self.convs]
        feats = torch.cat(feats, dim=1)
        feats = feats.view(batch_size, self.M, self.features, feats.shape[2], feats.shape[3])
        feats_U = torch.sum(feats, dim=1)
        feats_S = self.gap(feats_U)
        feats_Z = self.fc(feats_S)
        attention_vectors = [fc(feats_Z) for fc in self.fcs]
        attention_vectors = torch.cat(attention_vectors, dim=1)
        attention_vectors = attention_vectors.view(batch_size, self.M, self.features, 1, 1)
        attention_vectors = self.softmax(attention_vectors)
        return torch.sum(feats * attention_vectors, dim=1)


class SKUnit(nn.Module):
    def __init__(self, in_features: int, mid_features: int, out_features: int, M: int = 2, G: int = 4, r: int = 4,
                 stride: int = 1, L: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_features, mid_features, 1, stride=1, bias=False),
                                   nn.BatchNorm2d(mid_features), nn.ReLU(inplace=True))
        self.conv2_sk = SKConv(mid_features, M=M, G=G, r=r, stride=stride, L=L)
        self.conv3 = nn.Sequential(nn.Conv2d(mid_features, out_features, 1, stride=1, bias=False),
                                   nn.BatchNorm2d(out_features))
        if in_features == out_features:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_features, out_features, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_features))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.conv3(self.conv2_sk(self.conv1(x)))
        return self.relu(out + self.shortcut(residual))


class SKNet(nn.Module):
    def __init__(self, class_num: int = 5, nums_block_list: tuple[int, ...] = (2, 1),
                 strides_list: tuple[int, ...] = (1, 2)) -> None:
        super().__init__()
        self.basic_conv = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage_1 = self._make_layer(8, 8, 16, nums_block=nums_block_list[0], stride=strides_list[0])
        self.stage_2 = self._make_layer(16, 16, 24, nums_block=nums_block_list[1], stride=strides_list[1])
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(24, class_num)

    def _make_layer(self, in_feats: int, mid_feats: int, out_feats: int, nums_block: int,
                    stride: int = 1) -> nn.Sequential:
        layers = [SKUnit(in_feats, mid_feats, out_feats, stride=stride)]
        for _ in range(1, nums_block):
            layers.append(SKUnit(out_feats, mid_feats, out_feats))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.stage_2(self.stage_1(self.maxpool(self.basic_conv(x))))
        fea = self.gap(fea)
        fea = torch.flatten(fea, 1)  # upstream: torch.squeeze(fea), which also drops a batch of one
        return self.classifier(fea)


def _sk_unit(prefix: str, shortcut: bool) -> list[str]:
    names = [f"{prefix}.conv1.1", f"{prefix}.conv3.1", f"{prefix}.conv2_sk.fc.1",
             *(f"{prefix}.conv2_sk.convs.{i}.1" for i in range(2))]
    return names + ([f"{prefix}.shortcut.1"] if shortcut else [])


# Every BN follows a conv that only it reads: the branch BNs a grouped dilated conv each (the cat, the
# view to (B, M, C, H, W), the branch sum and the attention-weighted sum come after their ReLUs); the fc BN
# a 1x1 conv on the pooled (B, C, 1, 1) map; conv3's and the shortcut's BNs are summed after their convs.
SKNET_BN = frozenset(["basic_conv.1", *_sk_unit("stage_1.0", True), *_sk_unit("stage_1.1", False),
                      *_sk_unit("stage_2.0", True)])

# ---------------------------------------------------------------------------------------------------------
# 4. Inception-v3 blocks (torchvision inception.py): BasicConv2d = conv (bias=False) + BN (eps=0.001) +
#    F.relu; InceptionA (1x1, 5x5, double 3x3, avg_pool2d branch), InceptionB (stride-2 3x3, double 3x3 with
#    a stride-2 end, max_pool2d), InceptionC with its 7x7dbl branch (test_zoo_patterns' has none), InceptionE
#    (3x3_1 read by a 1x3 and a 3x1 conv whose outputs are cat, likewise the double-3x3 branch),
#    `torch.cat(outputs, 1)`. BasicConv2d is test_zoo_patterns'; channel counts are upstream's divided by 8.
# ---------------------------------------------------------------------------------------------------------


def _c(channels: int) -> int:
    return channels // 8


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, _c(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, _c(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(_c(48), _c(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, _c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_c(64), _c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(_c(96), _c(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, _c(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, _c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_c(64), _c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(_c(96), _c(96), kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, _c(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, _c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, _c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, _c(192), kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionE(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, _c(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, _c(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(_c(384), _c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(_c(384), _c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, _c(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_c(448), _c(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(_c(384), _c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(_c(384), _c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, _c(192), kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = [self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)]
        branch3x3 = torch.cat(branch3x3, 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)]
        branch3x3dbl = torch.cat(branch3x3dbl, 1)
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionV3Blocks(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, _c(64), kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(_c(64), pool_features=_c(64))  # 288 channels out, as Mixed_5d's
        self.Mixed_6a = InceptionB(_c(288))
        self.Mixed_6b = InceptionC(_c(768), channels_7x7=_c(128))
        self.Mixed_7c = InceptionE(_c(768))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.5)
        self.fc = nn.Linear(_c(2048), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Mixed_7c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5b(self.Conv2d_1a_3x3(x)))))
        x = self.dropout(self.avgpool(x))
        return self.fc(torch.flatten(x, 1))


_INCEPTION_CONVS = {
    "Mixed_5b": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
                 "branch_pool"],
    "Mixed_6a": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "Mixed_6b": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", *(f"branch7x7dbl_{i}" for i in range(1, 6)),
                 "branch_pool"],
    "Mixed_7c": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
                 "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
# Every BasicConv2d's BN follows its own conv, read by the BN alone: the avg-pool branches pool the block
# input before their conv, InceptionE's 3x3_1 output (read by the 1x3 and 3x1 convs) is post-ReLU, and the
# cats come after the ReLUs.
INCEPTION_BN = frozenset(["Conv2d_1a_3x3.bn", *(f"{block}.{conv}.bn" for block, convs in _INCEPTION_CONVS.items()
                                                for conv in convs)])

# ---------------------------------------------------------------------------------------------------------
# 5. ConvMixer (locuslab/convmixer convmixer.py): patch embedding Conv(stride=patch) -> GELU -> BN, then per
#    block `Residual(Sequential(depthwise Conv(padding="same"), GELU, BN))` (`fn(x) + x`) and a 1x1 Conv ->
#    GELU -> BN; AdaptiveAvgPool2d, Flatten, Linear. Written as upstream's function returning a Sequential.
# ---------------------------------------------------------------------------------------------------------


class MixerResidual(nn.Module):
    """convmixer's Residual."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def ConvMixer(dim: int = 8, depth: int = 2, kernel_size: int = 5, patch_size: int = 2,
              n_classes: int = 5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
        nn.GELU(),
        nn.BatchNorm2d(dim),
        *[nn.Sequential(
            MixerResidual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                nn.GELU(),
                nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, kernel_size=1),
            nn.GELU(),
            nn.BatchNorm2d(dim)) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, n_classes))


# Every BN follows a GELU: none folds backward. Forward: the stem BN's and block 0's last BN's outputs feed
# the next block's residual, read by its zero-padded ("same") depthwise conv and by the add; each residual
# BN is an addend of `fn(x) + x`, whose other addend it does not scale; the last BN is averaged by the pool
# before the Linear (exact arithmetic, but no fold passes through a pool, as odd_layers' bn_pool).
CONVMIXER_BN: frozenset[str] = frozenset()
CONVMIXER_KEPT = {"2": _NOT_A_LAYER, "3.0.fn.2": _NOT_A_LAYER, "3.3": _NOT_A_LAYER, "4.0.fn.2": _NOT_A_LAYER,
                  "4.3": _NOT_A_LAYER}

# ---------------------------------------------------------------------------------------------------------
# 6. PointNet (fxia22/pointnet.pytorch pointnet/model.py): STN3d / STNkd = Conv1d(k=1)+BN1d+ReLU x3,
#    `torch.max(x, 2, keepdim=True)[0]`, `x.view(-1, C)`, Linear+BN1d+ReLU x2, Linear, `x + iden` (a flattened
#    identity from numpy, repeated over the batch), view to a matrix; PointNetfeat multiplies the points by
#    the learned transform (transpose, `torch.bmm`, transpose), conv1+bn1, the feature transform, conv2+bn2,
#    conv3+bn3 (no ReLU) and the max; PointNetCls: fc1+bn1+ReLU, `bn2(dropout(fc2(x)))`, fc3, log_softmax
#    (alone: upstream also returns both transforms, for its training loss). Unlike test_zoo_patterns' PointNet,
#    the feature transform (STNkd, a second bmm on BN'd features) is on and the STNs have upstream's three
#    convs and two hidden Linears; widths 8, 16, 32 stand for 64, 128, 1024, and 16, 8 for 512, 256.
# ---------------------------------------------------------------------------------------------------------


class STN3d(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 16, 8)) -> None:
        super().__init__()
        c1, c2, c3, f1, f2 = widths
        self.c3 = c3
        self.conv1 = nn.Conv1d(3, c1, 1)
        self.conv2 = nn.Conv1d(c1, c2, 1)
        self.conv3 = nn.Conv1d(c2, c3, 1)
        self.fc1 = nn.Linear(c3, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, 9)
        self.relu = nn.ReLU()
        self.bn1 = nn.BatchNorm1d(c1)
        self.bn2 = nn.BatchNorm1d(c2)
        self.bn3 = nn.BatchNorm1d(c3)
        self.bn4 = nn.BatchNorm1d(f1)
        self.bn5 = nn.BatchNorm1d(f2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.max(x, 2, keepdim=True)[0]
        x = x.view(-1, self.c3)
        x = F.relu(self.bn4(self.fc1(x)))
        x = F.relu(self.bn5(self.fc2(x)))
        return self.fc3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batchsize = x.size()[0]
        x = self.features(x)
        iden = torch.from_numpy(np.array([1, 0, 0, 0, 1, 0, 0, 0, 1]).astype(np.float32)).view(1, 9).repeat(
            batchsize, 1)
        if x.is_cuda:
            iden = iden.cuda()
        x = x + iden
        return x.view(-1, 3, 3)


class STNkd(STN3d):
    def __init__(self, k: int = 8, widths: tuple[int, ...] = (8, 16, 32, 16, 8)) -> None:
        super().__init__(widths)
        self.conv1 = nn.Conv1d(k, widths[0], 1)
        self.fc3 = nn.Linear(widths[4], k * k)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batchsize = x.size()[0]
        x = self.features(x)
        iden = torch.from_numpy(np.eye(self.k).flatten().astype(np.float32)).view(1, self.k * self.k).repeat(
            batchsize, 1)
        if x.is_cuda:
            iden = iden.cuda()
        x = x + iden
        return x.view(-1, self.k, self.k)


class PointNetfeat(nn.Module):
    def __init__(self, feature_transform: bool = True, widths: tuple[int, ...] = (8, 16, 32)) -> None:
        super().__init__()
        self.stn = STN3d()
        self.conv1 = nn.Conv1d(3, widths[0], 1)
        self.conv2 = nn.Conv1d(widths[0], widths[1], 1)
        self.conv3 = nn.Conv1d(widths[1], widths[2], 1)
        self.bn1 = nn.BatchNorm1d(widths[0])
        self.bn2 = nn.BatchNorm1d(widths[1])
        self.bn3 = nn.BatchNorm1d(widths[2])
        self.width = widths[2]
        self.feature_transform = feature_transform
        if self.feature_transform:
            self.fstn = STNkd(k=widths[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trans = self.stn(x)
        x = x.transpose(2, 1)
        x = torch.bmm(x, trans)
        x = x.transpose(2, 1)
        x = F.relu(self.bn1(self.conv1(x)))
        if self.feature_transform:
            trans_feat = self.fstn(x)
            x = x.transpose(2, 1)
            x = torch.bmm(x, trans_feat)
            x = x.transpose(2, 1)
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x = torch.max(x, 2, keepdim=True)[0]
        return x.view(-1, self.width)  # upstream also returns trans and trans_feat (for a training loss)


class PointNetCls(nn.Module):
    def __init__(self, k: int = 4, feature_transform: bool = True) -> None:
        super().__init__()
        self.feature_transform = feature_transform
        self.feat = PointNetfeat(feature_transform=feature_transform)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 8)
        self.fc3 = nn.Linear(8, k)
        self.dropout = nn.Dropout(p=0.3)
        self.bn1 = nn.BatchNorm1d(16)
        self.bn2 = nn.BatchNorm1d(8)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feat(x)
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.dropout(self.fc2(x))))
        x = self.fc3(x)
        return F.log_softmax(x, dim=1)


# Every BN1d follows a kernel-1 Conv1d on (B, C, N) or a Linear on (B, C) that only it reads (the max over
# points, the views and the bmm come after); the head's bn2 reads fc2 through Dropout, the identity in eval
# mode. bn3 of the feature net has no ReLU: the max comes after it.
POINTNET_BN = frozenset([*(f"feat.{stn}.bn{i}" for stn in ("stn", "fstn") for i in range(1, 6)),
                         *(f"feat.bn{i}" for i in (1, 2, 3)), "bn1", "bn2"])

# ---------------------------------------------------------------------------------------------------------
# 7. Self-supervised heads on a tiny ResNet backbone: MoCo v3's `_build_mlp` (Linear(bias=False) + BN1d + ReLU
#    per hidden layer, a last BatchNorm1d(affine=False) on the projector, none on the predictor) replacing the
#    backbone's fc, BYOL's MLPHead (Linear + BN1d + ReLU + Linear) as a second predictor; the output cats the
#    predictions with the projection
# ---------------------------------------------------------------------------------------------------------


def _build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            # follow SimCLR's design; "for simplicity, we further removed gamma in BN"
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


class MLPHead(nn.Module):
    """BYOL (sthalles/PyTorch-BYOL) MLPHead."""

    def __init__(self, in_channels: int, mlp_hidden_size: int, projection_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, mlp_hidden_size), nn.BatchNorm1d(mlp_hidden_size),
                                 nn.ReLU(inplace=True), nn.Linear(mlp_hidden_size, projection_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet stem and one basic block, with the fc the SSL code replaces."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MoCoV3Heads(nn.Module):
    def __init__(self, dim: int = 8, mlp_dim: int = 16) -> None:
        super().__init__()
        self.base_encoder = TinyResNet()
        hidden_dim = self.base_encoder.fc.weight.shape[1]
        del self.base_encoder.fc
        self.base_encoder.fc = _build_mlp(3, hidden_dim, mlp_dim, dim)
        self.predictor = _build_mlp(2, dim, mlp_dim, dim, False)
        self.byol_predictor = MLPHead(dim, mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base_encoder(x)
        return torch.cat([self.predictor(z), self.byol_predictor(z), z], 1)


# Every BN follows a layer that only it reads: the backbone's after its convs, each MLP's BatchNorm1d after a
# Linear on (B, C); the projector's last BN has no affine parameters (its shift becomes the Linear's new
# bias) and its output, read by both predictors and the cat, comes after it.
SSL_BN = frozenset(["base_encoder.bn1", "base_encoder.bn2", "base_encoder.fc.1", "base_encoder.fc.4",
                    "base_encoder.fc.7", "predictor.1", "byol_predictor.net.1"])

# ---------------------------------------------------------------------------------------------------------
# 8. MobileViT (apple/ml-cvnets mobilevit_block.py, with its ConvLayer = Sequential(conv, norm, act) and
#    MobileNetV2 InvertedResidual): local representation conv3x3+BN+SiLU and a conv1x1 without norm, unfolding
#    into patches by reshape/transpose, TransformerEncoder layers (pre-norm LayerNorm, multi-head attention
#    from one qkv Linear, FFN with SiLU), a LayerNorm, folding back, conv_proj 1x1+BN+SiLU,
#    `fusion(torch.cat((res, fm), dim=1))` with a conv3x3+BN+SiLU, inside a tiny MobileViT
# ---------------------------------------------------------------------------------------------------------


class ConvLayer(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 use_norm: bool = True, use_act: bool = True) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                                          bias=not use_norm))
        if use_norm:
            self.add_module("norm", nn.BatchNorm2d(out_channels, momentum=0.1))
        if use_act:
            self.add_module("act", nn.SiLU())


class MV2InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_dim = int(round(in_channels * expand_ratio))
        block = nn.Sequential()
        if expand_ratio != 1:
            block.add_module("exp_1x1", ConvLayer(in_channels, hidden_dim, 1))
        block.add_module("conv_3x3", ConvLayer(hidden_dim, hidden_dim, 3, stride=stride, groups=hidden_dim))
        block.add_module("red_1x1", ConvLayer(hidden_dim, out_channels, 1, use_act=False))
        self.block = block
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.block(x)
        return self.block(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.attn_dropout = nn.Dropout(0.0)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.softmax = nn.Softmax(dim=-1)
        self.num_heads = num_heads

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        b_sz, n_patches, _ = x_q.shape
        qkv = self.qkv_proj(x_q).reshape(b_sz, n_patches, 3, self.num_heads, -1)
        qkv = qkv.transpose(1, 3).contiguous()
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        query = query * self.scaling
        key = key.transpose(-1, -2)
        attn = self.attn_dropout(self.softmax(torch.matmul(query, key)))
        out = torch.matmul(attn, value)
        out = out.transpose(1, 2).reshape(b_sz, n_patches, -1)
        return self.out_proj(out)


class TransformerEncoder(nn.Module):
    def __init__(self, embed_dim: int, ffn_latent_dim: int, num_heads: int) -> None:
        super().__init__()
        self.pre_norm_mha = nn.Sequential(nn.LayerNorm(embed_dim), MultiHeadAttention(embed_dim, num_heads),
                                          nn.Dropout(0.0))
        self.pre_norm_ffn = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, ffn_latent_dim), nn.SiLU(),
                                          nn.Dropout(0.0), nn.Linear(ffn_latent_dim, embed_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pre_norm_mha(x)
        return x + self.pre_norm_ffn(x)


class MobileViTBlock(nn.Module):
    def __init__(self, in_channels: int, transformer_dim: int, ffn_dim: int, n_transformer_blocks: int = 1,
                 head_dim: int = 8, patch_h: int = 2, patch_w: int = 2, conv_ksize: int = 3) -> None:
        super().__init__()
        self.local_rep = nn.Sequential()
        self.local_rep.add_module("conv_3x3", ConvLayer(in_channels, in_channels, conv_ksize))
        self.local_rep.add_module("conv_1x1", ConvLayer(in_channels, transformer_dim, 1, use_norm=False,
                                                        use_act=False))
        num_heads = transformer_dim // head_dim
        global_rep = [TransformerEncoder(transformer_dim, ffn_dim, num_heads) for _ in range(n_transformer_blocks)]
        global_rep.append(nn.LayerNorm(transformer_dim))
        self.global_rep = nn.Sequential(*global_rep)
        self.conv_proj = ConvLayer(transformer_dim, in_channels, 1)
        self.fusion = ConvLayer(2 * in_channels, in_channels, conv_ksize)
        self.patch_h, self.patch_w = patch_h, patch_w
        self.patch_area = self.patch_w * self.patch_h

    def unfolding(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, dict]:
        patch_w, patch_h = self.patch_w, self.patch_h
        patch_area = int(patch_w * patch_h)
        batch_size, in_channels, orig_h, orig_w = feature_map.shape
        new_h = int(math.ceil(orig_h / self.patch_h) * self.patch_h)
        new_w = int(math.ceil(orig_w / self.patch_w) * self.patch_w)
        interpolate = False
        if new_w != orig_w or new_h != orig_h:
            feature_map = F.interpolate(feature_map, size=(new_h, new_w), mode="bilinear", align_corners=False)
            interpolate = True
        num_patch_w = new_w // patch_w
        num_patch_h = new_h // patch_h
        num_patches = num_patch_h * num_patch_w
        reshaped_fm = feature_map.reshape(batch_size * in_channels * num_patch_h, patch_h, num_patch_w, patch_w)
        transposed_fm = reshaped_fm.transpose(1, 2)
        reshaped_fm = transposed_fm.reshape(batch_size, in_channels, num_patches, patch_area)
        transposed_fm = reshaped_fm.transpose(1, 3)
        patches = transposed_fm.reshape(batch_size * patch_area, num_patches, -1)
        info_dict = {"orig_size": (orig_h, orig_w), "batch_size": batch_size, "interpolate": interpolate,
                     "total_patches": num_patches, "num_patches_w": num_patch_w, "num_patches_h": num_patch_h}
        return patches, info_dict

    def folding(self, patches: torch.Tensor, info_dict: dict) -> torch.Tensor:
        patches = patches.contiguous().view(info_dict["batch_size"], self.patch_area, info_dict["total_patches"], -1)
        batch_size, _, _, channels = patches.size()
        num_patch_h = info_dict["num_patches_h"]
        num_patch_w = info_dict["num_patches_w"]
        patches = patches.transpose(1, 3)
        feature_map = patches.reshape(batch_size * channels * num_patch_h, num_patch_w, self.patch_h, self.patch_w)
        feature_map = feature_map.transpose(1, 2)
        feature_map = feature_map.reshape(batch_size, channels, num_patch_h * self.patch_h,
                                          num_patch_w * self.patch_w)
        if info_dict["interpolate"]:
            feature_map = F.interpolate(feature_map, size=info_dict["orig_size"], mode="bilinear",
                                        align_corners=False)
        return feature_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = x
        fm = self.local_rep(x)
        patches, info_dict = self.unfolding(fm)
        for transformer_layer in self.global_rep:
            patches = transformer_layer(patches)
        fm = self.conv_proj(self.folding(patches=patches, info_dict=info_dict))
        return self.fusion(torch.cat((res, fm), dim=1))


class MobileViT(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv_1 = ConvLayer(3, 8, 3, stride=2)
        self.layer_1 = nn.Sequential(MV2InvertedResidual(8, 8, 1, 2))
        self.layer_2 = nn.Sequential(MV2InvertedResidual(8, 12, 2, 2))
        self.layer_3 = nn.Sequential(MV2InvertedResidual(12, 16, 2, 2),
                                     MobileViTBlock(16, transformer_dim=16, ffn_dim=32))
        self.conv_1x1_exp = ConvLayer(16, 32, 1)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_3(self.layer_2(self.layer_1(self.conv_1(x))))
        return self.classifier(self.conv_1x1_exp(x))


def _mv2(prefix: str) -> list[str]:
    return [f"{prefix}.block.{conv}.norm" for conv in ("exp_1x1", "conv_3x3", "red_1x1")]


# Every BN follows a conv that only it reads: the local conv3x3's BN and SiLU come before the norm-free
# conv1x1; conv_proj's BN follows a 1x1 conv on the folded patches (the reshapes come before that conv);
# the fusion BN a conv over the cat. The MV2 residual adds come after red_1x1's BN.
MOBILEVIT_BN = frozenset(["conv_1.norm", *_mv2("layer_1.0"), *_mv2("layer_2.0"), *_mv2("layer_3.0"),
                          "layer_3.1.local_rep.conv_3x3.norm", "layer_3.1.conv_proj.norm", "layer_3.1.fusion.norm",
                          "conv_1x1_exp.norm"])

# ---------------------------------------------------------------------------------------------------------
# The entries
# ---------------------------------------------------------------------------------------------------------


ROUND6 = [
    ZooModel("shufflenetv2", partial(_build, ShuffleNetV2, 100), (1, 3, 32, 32),
             "ShuffleNetV2: x.chunk(2, dim=1), branch1/branch2 with depthwise conv+BN, cat, channel_shuffle by "
             "view/transpose/contiguous/view, x.mean([2, 3])", SHUFFLENET_BN),
    ZooModel("res2net", partial(_build, Res2Net, 101), (1, 3, 32, 32),
             "Res2Net Bottle2neck: torch.split by width, hierarchical sp + spx[i], convs/bns ModuleLists, cat, "
             "AvgPool2d on the last split ('stage'), out += downsample", RES2NET_BN),
    ZooModel("sknet", partial(_build, SKNet, 102), (1, 3, 32, 32),
             "SKConv: grouped dilated branches conv+BN, cat/view/sum, 1x1 conv+BN on pooled (B, d, 1, 1), "
             "softmax over branches, attention-weighted sum; SK unit residual", SKNET_BN),
    ZooModel("inception_v3", partial(_build, InceptionV3Blocks, 103), (1, 3, 32, 32),
             "Inception-v3 BasicConv2d (BN eps 0.001), InceptionA/B/C/E: avg_pool2d branches, stride-2 + "
             "max_pool2d, 1x7/7x1, a 1x1 read by a 1x3 and a 3x1 conv then cat", INCEPTION_BN),
    ZooModel("convmixer", partial(_build, ConvMixer, 104), (1, 3, 16, 16),
             "ConvMixer: patch conv -> GELU -> BN, Residual(depthwise padding='same' conv, GELU, BN) + x, "
             "1x1 conv -> GELU -> BN, adaptive pool, Flatten, Linear (every BN kept)",
             CONVMIXER_BN, CONVMIXER_KEPT),
    ZooModel("pointnet", partial(_build, PointNetCls, 105), (1, 3, 16),
             "PointNet: STN3d/STNkd (Conv1d+BN1d, torch.max over points, Linear+BN1d, + identity from numpy), "
             "torch.bmm with the learned transforms, Linear -> Dropout -> BN1d head", POINTNET_BN),
    ZooModel("ssl_heads", partial(_build, MoCoV3Heads, 106), (1, 3, 16, 16),
             "MoCo v3 _build_mlp projector (Linear(bias=False)+BN1d+ReLU, last BN1d(affine=False)) replacing the "
             "ResNet fc, predictor MLP, BYOL MLPHead, cat of predictions and projection", SSL_BN),
    ZooModel("mobilevit", partial(_build, MobileViT, 107), (1, 3, 32, 32),
             "MobileViT block: conv3x3+BN+SiLU, norm-free conv1x1, unfolding by reshape/transpose, pre-norm "
             "transformer (qkv Linear, matmul attention), folding, conv1x1+BN+SiLU, fusion conv over "
             "cat((res, fm)); MV2 inverted residuals", MOBILEVIT_BN),
]
BY_NAME = {entry.name: entry for entry in ROUND6}


# ---------------------------------------------------------------------------------------------------------
# The checks of test_zoo_round5.py, one table per kind: fold (eager, ONNX export, .pt2 program, TorchScript
# trace) and recalibrate (eager and ONNX, exact and fast); inspect
# ---------------------------------------------------------------------------------------------------------

FOLD_CHECKS = {
    "eager": lambda entry, tmp_path: more.test_fold_eager(entry),
    "onnx": lambda entry, tmp_path: acceptance.test_fold_onnx_export(acceptance.OnnxCase(entry, tmp_path)),
    "pt2": acceptance.test_fold_pt2_dynamic_batch,
    "torchscript": lambda entry, tmp_path: round4.test_fold_torchscript(entry),
}
RECALIBRATION_CHECKS = {
    "eager": lambda entry, method, tmp_path: round4.test_recalibrate_eager(entry, method),
    "onnx": round4.test_recalibrate_onnx,
}


def test_ground_truth_covers_every_bn() -> None:
    more.assert_ground_truth_covers_every_bn(ROUND6)


@pytest.mark.parametrize("check", FOLD_CHECKS)
@pytest.mark.parametrize("entry", acceptance.marked_params(BY_NAME))
def test_fold(entry: ZooModel, check: str, tmp_path: Path) -> None:
    FOLD_CHECKS[check](entry, tmp_path)


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("check", RECALIBRATION_CHECKS)
@pytest.mark.parametrize("entry", acceptance.marked_params(BY_NAME))
def test_recalibrate(entry: ZooModel, check: str, method: str, tmp_path: Path) -> None:
    RECALIBRATION_CHECKS[check](entry, method, tmp_path)


@pytest.mark.parametrize("entry", acceptance.marked_params(BY_NAME))
def test_inspect_lists_every_bn_with_its_channels(entry: ZooModel) -> None:
    more.test_inspect_lists_every_bn_with_its_channels(entry)
