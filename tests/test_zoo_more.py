"""More architecture patterns of real model libraries, folded, recalibrated and inspected per format.

Each model re-creates, at toy size, blocks the way their upstream projects write them (torchvision's
DeepLabV3 ASPP, timm's CSPDarknet and DLA, HarDNet, a CenterNet hourglass decoder, torchvision's
MobileNetV3 and EfficientNetV2, GhostNetV2's DFC attention, wav2letter, torchvision's R3D stem,
mmcv/detectron2 BN look-alikes), with the hand-derived set of BN layers that fold exactly:

- fold: the eager module, its ONNX export, a `.pt2` program and TorchScript fold exactly the foldable set,
  keep the rest with a reason, and compute what the original computes at another batch size;
- recalibrate: exact and fast, eager and ONNX, hold against the float64 oracle;
- inspect: every BN layer (look-alikes included) with its channel count and eps.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
import tests.test_zoo_acceptance as acceptance
import tests.test_zoo_patterns as patterns
from bnfold.layers import FoldStatus
from tests.recalibration_oracle import assert_statistics_match
from tests.test_zoo_acceptance import REL_TOLERANCE, check_torch_fold, forward, rel_error
from tests.test_zoo_recalibration import BATCH, OUTPUT_TOLERANCE, assert_skipped, calibration_data, outputs, probe_input
from tests.zoo import FrozenBatchNorm2d, SqueezeExcitation, ZooModel, _build, bn_module_names

# ---------------------------------------------------------------------------------------------------------
# 1. DeepLabV3 (torchvision): dilated backbone, ASPP with dilated branches and an image-pooling branch whose
#    BN sees 1x1 maps, upsampled back with F.interpolate; projection with dropout; bilinear output
# ---------------------------------------------------------------------------------------------------------


class ASPPConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU())


class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, in_channels: int, atrous_rates: list[int], out_channels: int = 8) -> None:
        super().__init__()
        modules = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                                 nn.ReLU())]
        modules += [ASPPConv(in_channels, out_channels, rate) for rate in atrous_rates]
        modules.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = torch.cat([conv(x) for conv in self.convs], dim=1)
        return self.project(res)


class DeepLabV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, 1, padding=2, dilation=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            ASPP(16, [2, 3]), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_shape = x.shape[-2:]
        x = self.classifier(self.backbone(x))
        return F.interpolate(x, size=input_shape, mode="bilinear", align_corners=False)


DEEPLAB_BN = frozenset([
    "backbone.1", "backbone.4", "classifier.0.convs.0.1", "classifier.0.convs.1.1", "classifier.0.convs.2.1",
    "classifier.0.convs.3.2", "classifier.0.project.1", "classifier.2"])

# ---------------------------------------------------------------------------------------------------------
# 2. CSPDarknet (timm CrossStage: split, dark blocks with Mish, transition convs, cat), a DLA aggregation
#    Root (conv over the cat of children, BN, residual add of the first child), a HarDNet block (each layer
#    reads the cat of its linked predecessors; the output is a cat of a subset)
# ---------------------------------------------------------------------------------------------------------


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, act: type[nn.Module] | None = nn.Mish) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DarkBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels // 2, 1)
        self.conv2 = ConvNormAct(channels // 2, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + x


class CrossStage(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.expand_chs = cout
        self.conv_down = ConvNormAct(cin, cout, 3, 2)
        self.conv_exp = ConvNormAct(cout, cout, 1)
        self.blocks = nn.Sequential(DarkBlock(cout // 2), DarkBlock(cout // 2))
        self.conv_transition_b = ConvNormAct(cout // 2, cout // 2, 1)
        self.conv_transition = ConvNormAct(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_exp(self.conv_down(x))
        xs, xb = x.split(self.expand_chs // 2, dim=1)
        xb = self.conv_transition_b(self.blocks(xb)).contiguous()
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class DlaBasic(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class DlaRoot(nn.Module):
    def __init__(self, cin: int, cout: int, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, 1, bias=False, padding=0)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual

    def forward(self, x_children: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv(torch.cat(x_children, 1))
        x = self.bn(x)
        if self.residual:
            x += x_children[0]
        return self.relu(x)


class DlaTree(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.tree1 = DlaBasic(channels, channels)
        self.tree2 = DlaBasic(channels, channels)
        self.root = DlaRoot(2 * channels, channels, residual=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.tree1(x)
        x2 = self.tree2(x1)
        return self.root([x2, x1])


class HarDBlock(nn.Module):
    """HarDNet: layer k reads the cat of layers k - 2^i; the output is the cat of the odd layers and the last."""

    def __init__(self, cin: int, growth: int, n_layers: int) -> None:
        super().__init__()
        self.links = []
        layers = []
        for k in range(1, n_layers + 1):
            link = [k - 2 ** i for i in range(8) if k % 2 ** i == 0 and k - 2 ** i >= 0]
            self.links.append(link)
            channels = sum(cin if j == 0 else growth for j in link)
            layers.append(ConvNormAct(channels, growth, 3, act=nn.ReLU6))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers_ = [x]
        for link, layer in zip(self.links, self.layers):
            tin = [layers_[i] for i in link]
            x = torch.cat(tin, 1) if len(tin) > 1 else tin[0]
            layers_.append(layer(x))
        t = len(layers_)
        out = [layers_[i] for i in range(t) if (i == 0) or (i == t - 1) or (i % 2 == 1)]
        return torch.cat(out, 1)


class CspDlaHarDNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3)
        self.stage = CrossStage(8, 16)
        self.dla = DlaTree(16)
        self.hard = HarDBlock(16, 6, 4)
        self.head = nn.Conv2d(16 + 6 + 6 + 6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hard(self.dla(self.stage(self.stem(x))))).mean((2, 3))


def _cna(*prefixes: str) -> list[str]:
    return [f"{prefix}.bn" for prefix in prefixes]


CSP_BN = frozenset([
    *_cna("stem", "stage.conv_down", "stage.conv_exp", "stage.blocks.0.conv1", "stage.blocks.0.conv2",
          "stage.blocks.1.conv1", "stage.blocks.1.conv2", "stage.conv_transition_b", "stage.conv_transition",
          "hard.layers.0", "hard.layers.1", "hard.layers.2", "hard.layers.3"),
    "dla.tree1.bn1", "dla.tree1.bn2", "dla.tree2.bn1", "dla.tree2.bn2", "dla.root.bn"])

# ---------------------------------------------------------------------------------------------------------
# 3. Hourglass decoder (CenterNet / Stacked Hourglass): strided encoder, ConvTranspose2d with groups,
#    stride, output_padding and dilation (with and without bias) -> BN, skip branch added after its BN
# ---------------------------------------------------------------------------------------------------------


class Hourglass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.down2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, groups=4, bias=False),
            nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.skip1 = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(8, 8, 3, stride=2, padding=2, output_padding=1, groups=8, dilation=2, bias=True),
            nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(inplace=True))
        self.up0 = nn.ConvTranspose2d(8, 4, 2, 2, bias=False)
        self.up0_bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        up = self.up2(self.down2(d1)) + self.skip1(d1)
        y = self.up0_bn(self.up0(self.up1(up)))
        return self.head(F.relu(y))


HOURGLASS_BN = frozenset(["down1.1", "down2.1", "up2.1", "skip1.1", "up1.1", "up0_bn"])

# ---------------------------------------------------------------------------------------------------------
# 4. MobileNetV3 (torchvision: hardswish, SE with hardsigmoid and a ReLU squeeze), EfficientNetV2 Fused-MBConv
#    (3x3 expand, 1x1 project, stochastic depth), GhostNetV2 DFC attention (avg-pool, 1x5/5x1 depthwise
#    convs, sigmoid, nearest upsample, multiply)
# ---------------------------------------------------------------------------------------------------------


def conv_norm_act(cin: int, cout: int, k: int, s: int = 1, groups: int = 1,
                  act: type[nn.Module] | None = nn.Hardswish, eps: float = 1e-3) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=eps)]
    return nn.Sequential(*layers, *([act(inplace=True)] if act is not None else []))


class InvertedResidualV3(nn.Module):
    def __init__(self, cin: int, expanded: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_norm_act(cin, expanded, 1), conv_norm_act(expanded, expanded, k, stride, groups=expanded),
            SqueezeExcitation(expanded, 8, nn.ReLU, nn.Hardsigmoid), conv_norm_act(expanded, cout, 1, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        return result + x if self.use_res_connect else result


class FusedMBConv(nn.Module):
    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        self.block = nn.Sequential(conv_norm_act(channels, channels * expand, 3, act=nn.SiLU),
                                   conv_norm_act(channels * expand, channels, 1, act=None))
        self.stochastic_depth = nn.Dropout(0.2)  # identity in eval, like torchvision's StochasticDepth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stochastic_depth(self.block(x)) + x


class DFCAttention(nn.Module):
    """GhostNetV2's decoupled fully-connected attention, gating a ghost module's output."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.primary_conv = conv_norm_act(cin, cout // 2, 1, act=nn.ReLU, eps=1e-5)
        self.cheap_operation = conv_norm_act(cout // 2, cout // 2, 3, groups=cout // 2, act=nn.ReLU, eps=1e-5)
        self.short_conv = nn.Sequential(
            nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout),
            nn.Conv2d(cout, cout, (1, 5), 1, (0, 2), groups=cout, bias=False), nn.BatchNorm2d(cout),
            nn.Conv2d(cout, cout, (5, 1), 1, (2, 0), groups=cout, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out * F.interpolate(res.sigmoid(), size=out.shape[-1], mode="nearest")


class MobileNetV3EffV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_norm_act(3, 8, 3, 2), FusedMBConv(8, 2), InvertedResidualV3(8, 16, 8, 3, 1),
            InvertedResidualV3(8, 24, 12, 5, 2), DFCAttention(12, 12), conv_norm_act(12, 24, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(24, 16), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


MOBILENETV3_BN = frozenset([
    "features.0.1", "features.1.block.0.1", "features.1.block.1.1",
    *(f"features.{i}.block.{j}.1" for i in (2, 3) for j in (0, 1, 3)),
    "features.4.primary_conv.1", "features.4.cheap_operation.1", "features.4.short_conv.1",
    "features.4.short_conv.3", "features.4.short_conv.5", "features.5.1"])

# ---------------------------------------------------------------------------------------------------------
# 5. Odd layers: BN affine=False and unusual eps after convs with bias and circular/reflect padding, a grouped
#    dilated conv, a padding='same' depthwise conv with channel multiplier 2 (TorchScript records it as
#    aten::_convolution_mode); BN after a ReLU (nothing to fold into backward) before a zero-padded conv
#    (kept), before an AvgPool and an unpadded conv (kept); BN1d after max-pool and flatten, before Linear
# ---------------------------------------------------------------------------------------------------------


class OddLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=True, padding_mode="circular")
        self.bn1 = nn.BatchNorm2d(8, affine=False, eps=1e-3)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, padding=2, dilation=2, groups=4, bias=True, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(8, eps=0.1)
        self.conv_same = nn.Conv2d(8, 16, 5, padding="same", groups=8, bias=False)  # ORT: no dilated SAME
        self.bn_same = nn.BatchNorm2d(16)
        self.bn_pad = nn.BatchNorm2d(16)  # after a ReLU, before a zero-padded conv: kept
        self.conv3 = nn.Conv2d(16, 8, 3, 1, 1, bias=False)
        self.bn_pool = nn.BatchNorm2d(8)  # after a ReLU, before AvgPool -> unpadded 1x1 conv
        self.conv4 = nn.Conv2d(8, 8, 1, bias=True)
        self.bn_fc = nn.BatchNorm1d(8 * 4 * 4)  # after a max-pool and flatten, before Linear
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn_same(self.conv_same(x)))
        x = F.relu(self.conv3(self.bn_pad(x)))
        x = self.conv4(F.avg_pool2d(self.bn_pool(x), 2))
        x = F.max_pool2d(x, 2)  # no ReLU: a channel dead on all data would have no statistics to compare
        return self.fc(self.bn_fc(torch.flatten(x, 1)))


ODD_FOLDABLE = frozenset(["bn1", "bn2", "bn_same", "bn_fc"])
ODD_KEPT = {"bn_pad": "pads its input with zeros", "bn_pool": "not a conv or linear layer"}

# ---------------------------------------------------------------------------------------------------------
# 6. wav2letter (torchaudio): Conv1d with stride 2, a wide dilated Conv1d, 1x1 Conv1d, BN1d after each
# ---------------------------------------------------------------------------------------------------------


class Wav2Letter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.acoustic_model = nn.Sequential(
            nn.Conv1d(8, 16, 11, stride=2, padding=5), nn.BatchNorm1d(16), nn.ReLU(inplace=True),
            nn.Conv1d(16, 16, 7, stride=1, padding=6, dilation=2), nn.BatchNorm1d(16), nn.ReLU(inplace=True),
            nn.Conv1d(16, 16, 5, stride=1, padding=2, groups=4, padding_mode="replicate"), nn.BatchNorm1d(16),
            nn.ReLU(inplace=True), nn.Conv1d(16, 12, 1), nn.BatchNorm1d(12), nn.ReLU(inplace=True),
            nn.Conv1d(12, 6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.acoustic_model(x), dim=1)


# ---------------------------------------------------------------------------------------------------------
# 7. R3D-18 (torchvision video): BasicStem Conv3d (3,7,7) with temporal stride, max-pool, BasicBlock with a
#    Conv3DSimple and a temporally strided 1x1x1 downsample
# ---------------------------------------------------------------------------------------------------------


class BasicBlock3d(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(inplanes, planes, 3, stride, 1, bias=False), nn.BatchNorm3d(planes),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv3d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm3d(planes))
        self.downsample = nn.Sequential(nn.Conv3d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class R3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 8, (3, 7, 7), stride=(2, 2, 2), padding=(1, 3, 3), bias=False), nn.BatchNorm3d(8),
            nn.ReLU(inplace=True))
        self.pool = nn.MaxPool3d((1, 2, 2))
        self.layer2 = BasicBlock3d(8, 12, 2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.pool(self.stem(x)))
        return self.fc(self.avgpool(x).flatten(1))


# ---------------------------------------------------------------------------------------------------------
# 8. BN look-alikes: mmcv-style norm layer that is no _BatchNorm subclass but calls F.batch_norm on its own
#    running_mean/running_var/weight/bias/eps; detectron2's FrozenBatchNorm2d (F.batch_norm without grad);
#    SyncBatchNorm in a non-distributed eval model
# ---------------------------------------------------------------------------------------------------------


class LookAlikeBN(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


class D2FrozenBatchNorm2d(FrozenBatchNorm2d):
    """detectron2's form of the same layer: its buffers normalized by F.batch_norm, not by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


class LookAlikes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.norm1 = LookAlikeBN(8, eps=1e-3)
        self.conv2 = nn.Conv2d(8, 8, 3, 2, 1, groups=2, bias=False)
        self.norm2 = D2FrozenBatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 1, bias=True)
        self.norm3 = nn.SyncBatchNorm(16, eps=1e-4)
        self.conv4 = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.norm4 = LookAlikeBN(16)  # its conv's output also feeds the residual add: kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = F.relu(self.norm3(self.conv3(x)))
        y = self.conv4(x)
        return (F.relu(self.norm4(y)) + y).mean((2, 3))


# ---------------------------------------------------------------------------------------------------------
# The entries
# ---------------------------------------------------------------------------------------------------------


def deeplab() -> nn.Module:
    return _build(DeepLabV3, 60)


def csp_dla_hardnet() -> nn.Module:
    return _build(CspDlaHarDNet, 61)


def hourglass() -> nn.Module:
    return _build(Hourglass, 62)


def mobilenetv3() -> nn.Module:
    return _build(MobileNetV3EffV2, 63)


def odd_layers() -> nn.Module:
    return _build(OddLayers, 64)


def wav2letter() -> nn.Module:
    return _build(Wav2Letter, 65)


def r3d() -> nn.Module:
    return _build(R3D, 66)


def look_alikes() -> nn.Module:
    return _build(LookAlikes, 67)


MORE = [
    ZooModel("deeplab", deeplab, (1, 3, 16, 16),
             "dilated backbone, ASPP with dilated branches and an image-pooling branch (BN on 1x1 maps), "
             "interpolate, cat, dropout", DEEPLAB_BN),
    ZooModel("csp_dla_hardnet", csp_dla_hardnet, (1, 3, 16, 16),
             "CSPDarknet split/cat with Mish, DLA root (conv over cat, BN, += child), HarDNet linked cats",
             CSP_BN),
    ZooModel("hourglass", hourglass, (1, 3, 16, 16),
             "ConvTranspose2d with groups, stride, output_padding, dilation, bias -> BN; skip added after BN",
             HOURGLASS_BN),
    ZooModel("mobilenetv3", mobilenetv3, (1, 3, 16, 16),
             "hardswish, SE with hardsigmoid, Fused-MBConv, GhostNetV2 DFC attention", MOBILENETV3_BN),
    ZooModel("odd_layers", odd_layers, (1, 3, 16, 16),
             "affine=False, eps 1e-3/0.1, conv bias with circular/reflect padding, grouped dilated conv, "
             "padding='same' depthwise conv with multiplier 2, "
             "BN -> zero-padded conv, BN -> AvgPool -> conv, BN1d -> Linear after flatten",
             ODD_FOLDABLE, ODD_KEPT),
    ZooModel("wav2letter", wav2letter, (1, 8, 32),
             "Conv1d stride 2, dilated Conv1d, grouped replicate-padded Conv1d, BN1d",
             frozenset(["acoustic_model.1", "acoustic_model.4", "acoustic_model.7", "acoustic_model.10"])),
    ZooModel("r3d", r3d, (1, 3, 4, 16, 16), "Conv3d (3,7,7) stem with temporal stride, strided 3-D basic block",
             frozenset(["stem.1", "layer2.conv1.1", "layer2.conv2.1", "layer2.downsample.1"])),
    ZooModel("look_alikes", look_alikes, (1, 3, 16, 16),
             "mmcv-style F.batch_norm norm layer, detectron2 FrozenBatchNorm2d (F.batch_norm), SyncBatchNorm",
             frozenset(["norm1", "norm2", "norm3"]), {"norm4": "add"}),
]
BY_NAME = {entry.name: entry for entry in MORE}


def entries() -> list:
    return [pytest.param(entry, id=entry.name) for entry in MORE]


def assert_kept_reasons(report, entry: ZooModel) -> None:
    reasons = {d.layer: d.reason for d in report.kept}
    for layer, words in entry.kept.items():
        assert words in reasons[layer], f"{layer}: {reasons[layer]}"


# ---------------------------------------------------------------------------------------------------------
# Fold
# ---------------------------------------------------------------------------------------------------------


def assert_ground_truth_covers_every_bn(entries: list[ZooModel]) -> None:
    """Every BN module of each model has a decision, and none is both foldable and kept (every round)."""
    for entry in entries:
        assert bn_module_names(entry.factory()) == set(entry.bn_layers), entry.name
        assert not entry.foldable & set(entry.kept)


def test_ground_truth_covers_every_bn() -> None:
    assert_ground_truth_covers_every_bn(MORE)


@pytest.mark.parametrize("entry", entries())
def test_fold_eager(entry: ZooModel) -> None:
    model = entry.factory()
    report = bnfold.fold(model, input_shape=entry.shape_text(batch=2))
    check_torch_fold(report, entry, model)
    assert_kept_reasons(report, entry)


@pytest.mark.parametrize("entry", entries())
def test_fold_onnx(entry: ZooModel, tmp_path: Path) -> None:
    acceptance.test_fold_onnx_export(acceptance.OnnxCase(entry, tmp_path))


@pytest.mark.parametrize("entry", entries())
def test_fold_pt2(entry: ZooModel, tmp_path: Path) -> None:
    acceptance.test_fold_pt2_dynamic_batch(entry, tmp_path)


@functools.cache
def torchscript_fold(name: str):
    """The fold of the model traced at batch 2."""
    entry = BY_NAME[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.jit.trace(entry.factory(), entry.example(batch=2))
    return bnfold.fold(compiled, input_shape=entry.shape_text(batch=2))


@pytest.mark.parametrize("entry", entries())
def test_fold_torchscript(entry: ZooModel) -> None:
    report = torchscript_fold(entry.name)
    acceptance.assert_decisions(report, entry)
    acceptance.assert_verified(report)
    for batch in (2, 3):
        x = entry.example(batch=batch, seed=7)
        assert rel_error(forward(entry.factory(), x), forward(report.folded_model.module, x)) <= REL_TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# Recalibrate
# ---------------------------------------------------------------------------------------------------------

METHODS = ["exact", "fast"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", entries())
def test_recalibrate_eager(entry: ZooModel, method: str) -> None:
    patterns.test_recalibrate_eager(entry, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", entries())
def test_recalibrate_onnx(entry: ZooModel, method: str, tmp_path: Path) -> None:
    patterns.test_recalibrate_onnx(entry, method, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Inspect
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", entries())
def test_inspect_lists_every_bn_with_its_channels(entry: ZooModel) -> None:
    model = entry.factory()
    expected = {name: (m.num_features, m.eps) for name, m in model.named_modules() if name in entry.bn_layers}
    report = bnfold.inspect(model, input_shape=entry.shape_text(batch=2))
    assert {layer.name: (layer.channels, layer.eps) for layer in report.layers} == expected
    assert report.folds is not None
    assert {name for name, d in report.folds.items() if d.status is not FoldStatus.KEPT} == entry.foldable


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", [pytest.param(BY_NAME[name], id=name) for name in ("look_alikes", "deeplab")])
def test_recalibrate_pt2(entry: ZooModel, method: str) -> None:
    """A `.pt2` program: the look-alikes' F.batch_norm calls are BN ops there, recalibrated as in eager form."""
    program = torch.export.export(entry.factory(), (entry.example(batch=2),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    found = patterns._oracle(entry, method, ddof=1)
    report = bnfold.recalibrate(program, calibration_data(entry), method=method, batch_size=BATCH)
    assert_skipped(report, {})
    state = report.result.program.state_dict
    assert sorted(layer.name for layer in report.layers) == sorted(entry.bn_layers)
    for layer, (mean, var) in found.reads.items():
        assert_statistics_match(state[mean], state[var], *found.statistics[layer], layer=layer)
    x = probe_input(entry)
    result = report.result.program.module()
    assert rel_error(outputs(found.reference_model(), x.double()), outputs(result, x)) <= OUTPUT_TOLERANCE
