"""A zoo of small but real-shaped architectures with hand-derived BN-folding ground truth.

Each `ZooModel` names a zero-argument factory (importable as `tests.zoo:<factory>`, so the state_dict +
`--model-factory` path works from the repository root), an example input shape, and for every BN layer
whether it is *exactly* foldable, or the reason it is not. The factories build eval-mode models whose BN
statistics and affine parameters are randomized deterministically (a fold of identity statistics proves
nothing), on tiny shapes so that each model folds and verifies in a fraction of a second.

The architectures reproduce the patterns of real model libraries: torchvision ResNets, DenseNet,
EfficientNet and RegNet; timm's `BatchNormAct2d` (a BatchNorm2d subclass that also applies an activation
and dropout), `Conv2dSame` (a conv subclass padding with `F.pad`) and `MixedConv2d`; detectron2's
`Conv2d` with a `norm` child and `FrozenBatchNorm2d` look-alike; LeViT's `Linear`+`BatchNorm1d` over
flattened tokens and its BN->Linear heads; EfficientDet's heads that share convs across levels with
per-level BN; U-Net decoders with grouped ConvTranspose; 1-D and 3-D nets; `F.batch_norm` on buffers
with library-specific names; SyncBatchNorm and LazyBatchNorm; pre-activation ResNets whose stage
transitions feed a BN the sum of a residual branch and a projection shortcut; sums of parallel branches.

Names of BN layers are module paths (`layer2.0.downsample.1`); a BN written with `F.batch_norm` is named
after the module that owns its buffers. Reasons are for readers of this file: tests only require that a
kept layer comes with *some* reason.

Ground-truth choices worth knowing (each is exact arithmetic, and each is one a weaker folder misses):
- a BN after an Add of layer outputs folds into every summed layer (the scale into each, the shift into one)
  when it alone reads the sum, each layer's output feeds only the sum and the channels line up (a branch
  broadcast over space folds, one broadcast over channels does not); an identity shortcut is no layer;
- BN -> reflect/replicate/circular-padded conv folds forward (in ONNX: through the Pad node); BN ->
  zero-padded conv does not;
- a Linear output that `reshape_as` (ONNX: Shape) also reads folds: only its shape is read;
- a conv called at several places, or with tied weights, followed by different BNs is kept in PyTorch
  (issue 3), but folds in ONNX, where each call is its own Conv node and onnxruntime folds it too;
- a weight-standardized conv's BN is kept in PyTorch (weight computed at run time) but folds in ONNX,
  where the weight is a constant subgraph of initializers (issue 4; onnxruntime folds it too);
- conv+BN pairs before and after a branch on tensor values fold: captured piecewise, their outputs
  provably reach nothing else.

`export_onnx` exports with BN kept (the TorchScript-based exporter, no constant folding, eval mode),
`onnx_bn_modules` maps BatchNormalization nodes back to module paths, and `count_bn_ops` counts BN ops
in an ONNX file/proto, an ExportedProgram, or an nn.Module run on an input.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------
# Building blocks in the style of the libraries they imitate
# ---------------------------------------------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass that normalizes, then applies dropout and an activation."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, apply_act: bool = True,
                 act_layer: type[nn.Module] = nn.ReLU, drop_rate: float = 0.0) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4D input")
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        return self.act(x)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow 'SAME' padding computed from the input size, applied with F.pad.

    The Python arithmetic on `x.size()` is what makes torch.fx's symbolic tracer fail on such models.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = _same_padding(ih, kh, self.stride[0], self.dilation[0])
        pad_w = _same_padding(iw, kw, self.stride[1], self.dilation[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class FrozenBatchNorm2d(nn.Module):
    """detectron2/torchvision FrozenBatchNorm2d: BN statistics as buffers, the affine map written by hand."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        scale = scale.reshape(1, -1, 1, 1)
        bias = bias.reshape(1, -1, 1, 1)
        return x * scale.to(x.dtype) + bias.to(x.dtype)


class NormConv2d(nn.Conv2d):
    """detectron2's layers.Conv2d: a conv subclass that owns its norm and activation as children."""

    def __init__(self, *args, norm: nn.Module | None = None, activation: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class WSConv2d(nn.Conv2d):
    """Weight-standardized conv (BiT's StdConv2d, written without F.batch_norm): its weight is computed
    at run time, so a BN after it cannot be folded into stored weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalBN(nn.Module):
    """A BN written with F.batch_norm on buffers and parameters with library-specific names."""

    def __init__(self, num_features: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("mu", torch.zeros(num_features))
        self.register_buffer("sigma2", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mu, self.sigma2, self.gamma, self.beta, False, 0.0, self.eps)


class ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: Sequential(conv, bn, act) under the names 0, 1, 2."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU, eps: float = 1e-5, bias: bool = False) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=bias),
                                   nn.BatchNorm2d(cout, eps=eps)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


def _relu() -> nn.ReLU:
    return nn.ReLU(inplace=True)


# ---------------------------------------------------------------------------------------------------------
# 1. ResNet with basic blocks (torchvision resnet18 layout)
# ---------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = _relu()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet trunk: conv1-bn1-relu-maxpool stem, two stages, average pool, fc."""

    def __init__(self, stem_kernel: int, stem_stride: int, layer1: list[nn.Module], layer2: list[nn.Module],
                 width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, stem_kernel, stem_stride, stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = _relu()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(*layer1)
        self.layer2 = nn.Sequential(*layer2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNetBasic(ResNet):
    def __init__(self) -> None:
        super().__init__(3, 1, [BasicBlock(8, 8)], [BasicBlock(8, 16, 2), BasicBlock(16, 16)], 16)


# ---------------------------------------------------------------------------------------------------------
# 2. ResNet/ResNeXt bottleneck (torchvision resnet50 / resnext layout)
# ---------------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = _relu()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNetBottleneck(ResNet):
    def __init__(self) -> None:
        super().__init__(7, 2, [Bottleneck(8, 4)], [Bottleneck(16, 8, stride=2, groups=2), Bottleneck(32, 8, groups=2)],
                         32)


# ---------------------------------------------------------------------------------------------------------
# 3. MobileNetV2 in timm's style: Conv2dSame stem, BatchNormAct2d everywhere, inverted residuals
# ---------------------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, same_pad: bool = False) -> None:
        super().__init__()
        mid = cin * expand
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid, act_layer=nn.ReLU6)
        conv_dw = Conv2dSame if same_pad else nn.Conv2d
        self.conv_dw = conv_dw(mid, mid, 3, stride, 0 if same_pad else 1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid, act_layer=nn.ReLU6)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.bn2(self.conv_dw(x))
        x = self.bn3(self.conv_pwl(x))
        return x + shortcut if self.has_skip else x


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.bn1 = BatchNormAct2d(cin, act_layer=nn.ReLU6)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = BatchNormAct2d(cout, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_pw(self.bn1(self.conv_dw(x)))) + x


class MobileNetV2Timm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = Conv2dSame(3, 8, 3, 2, bias=False)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.ReLU6)
        self.blocks = nn.Sequential(
            DepthwiseSeparable(8, 8),
            InvertedResidual(8, 8, 1, 4),
            InvertedResidual(8, 16, 2, 3, same_pad=True),
        )
        self.conv_head = nn.Conv2d(16, 32, 1, bias=False)
        self.bn2 = BatchNormAct2d(32, act_layer=nn.ReLU6, drop_rate=0.2)
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_stem(x))
        x = self.bn2(self.conv_head(self.blocks(x)))
        return self.classifier(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------------------
# 4. EfficientNet in torchvision's style: Conv2dNormActivation, SiLU, squeeze-excitation, stochastic depth
# ---------------------------------------------------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int, activation: type[nn.Module] = nn.SiLU,
                 scale_activation: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class StochasticDepth(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, mid, 1, act=nn.SiLU, eps=1e-3))
        layers += [ConvBNAct(mid, mid, k, stride, groups=mid, act=nn.SiLU, eps=1e-3),
                   SqueezeExcitation(mid, max(1, cin // 4)),
                   ConvBNAct(mid, cout, 1, act=None, eps=1e-3)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout
        self.stochastic_depth = StochasticDepth(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res else out


class EfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(3, 8, 3, 2, act=nn.SiLU, eps=1e-3),
            MBConv(8, 8, 3, 1, 1),
            MBConv(8, 12, 5, 2, 4),
            MBConv(12, 12, 5, 1, 4),
            ConvBNAct(12, 32, 1, act=nn.SiLU, eps=1e-3),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------------------------------------------
# 5. RegNetY: grouped 3x3 convs, squeeze-excitation, projection shortcut
# ---------------------------------------------------------------------------------------------------------


class RegNetYBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int) -> None:
        super().__init__()
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = ConvBNAct(cin, cout, 1, stride, act=None)
        self.f = nn.Sequential(OrderedDict(
            a=ConvBNAct(cin, cout, 1),
            b=ConvBNAct(cout, cout, 3, stride, groups=cout // group_width),
            se=SqueezeExcitation(cout, max(1, cin // 4)),
            c=ConvBNAct(cout, cout, 1, act=None),
        ))
        self.activation = _relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj(x) if self.proj is not None else x
        return self.activation(self.f(x) + shortcut)


class RegNetY(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3, 2)
        self.trunk = nn.Sequential(RegNetYBlock(8, 16, 2, 4), RegNetYBlock(16, 16, 1, 4))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.trunk(self.stem(x))), 1))


# ---------------------------------------------------------------------------------------------------------
# 6. detectron2-style backbone: NormConv2d with FrozenBatchNorm2d children, grouped bottlenecks
# ---------------------------------------------------------------------------------------------------------


class FrozenBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.shortcut = None
        if cin != cout:
            self.shortcut = NormConv2d(cin, cout, 1, stride, bias=False, norm=FrozenBatchNorm2d(cout))
        self.conv1 = NormConv2d(cin, mid, 1, bias=False, norm=FrozenBatchNorm2d(mid))
        self.conv2 = NormConv2d(mid, mid, 3, stride, 1, groups=groups, bias=False, norm=FrozenBatchNorm2d(mid))
        self.conv3 = NormConv2d(mid, cout, 1, bias=False, norm=FrozenBatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out += shortcut
        return F.relu_(out)


class FrozenBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv1 = NormConv2d(3, 8, 3, 2, 1, bias=False, norm=FrozenBatchNorm2d(8))
        self.res2 = nn.Sequential(FrozenBottleneck(8, 4, 16, 1, 1), FrozenBottleneck(16, 4, 16, 1, 1))
        self.res3 = nn.Sequential(FrozenBottleneck(16, 8, 32, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu_(self.stem.conv1(x)), 3, 2, 1)
        return self.res3(self.res2(x))


# ---------------------------------------------------------------------------------------------------------
# 7. Vision transformer with BN: LeViT's Linear+BN over flattened tokens, BN->Linear heads, a pre-norm
#    block with BN over transposed tokens, and Linear -> transpose -> BN1d
# ---------------------------------------------------------------------------------------------------------


class LinearNorm(nn.Module):
    """LeViT's Linear_BN: BatchNorm1d over (B*N, C) tokens, the Linear's output features."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTAttention(nn.Module):
    def __init__(self, dim: int, key_dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.key_dim, self.val_dim = heads, key_dim, 2 * key_dim
        self.scale = key_dim ** -0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * self.val_dim, dim))
        self.attention_biases = nn.Parameter(torch.randn(heads, tokens, tokens) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.val_dim)
        return self.proj(x)


class TokenBatchNorm(nn.Module):
    """BatchNorm1d applied to (B, N, C) tokens by transposing to (B, C, N) and back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class PreNormBNBlock(nn.Module):
    """A ViT block whose pre-norms are BN: each norm's output is read only by the next Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = TokenBatchNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = TokenBatchNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (attn.softmax(dim=-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class LinearTokenBN(nn.Module):
    """Linear over tokens, then BatchNorm1d over the transposed (B, C, N) tokens: C is the Linear's output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = TokenBatchNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


class NormLinear(nn.Module):
    """LeViT's classifier head: BatchNorm1d -> Dropout -> Linear."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.drop = nn.Dropout(0.1)
        self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))


class LeViTBlock(nn.Module):
    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.attn = LeViTAttention(dim, 4, 2, tokens)
        self.mlp = nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class VisionTransformerBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(ConvBNAct(3, 8, 3, 2, act=nn.Hardswish), ConvBNAct(8, 16, 3, 2, act=None))
        self.block1 = LeViTBlock(16, 16)
        self.block2 = PreNormBNBlock(16, 2)
        self.mixer = LinearTokenBN(16)
        self.head = NormLinear(16, 10)
        self.head_dist = NormLinear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.mixer(self.block2(self.block1(x)))
        x = x.mean(1)
        return (self.head(x) + self.head_dist(x)) / 2


# ---------------------------------------------------------------------------------------------------------
# 8. Mixed-kernel convolutions (timm MixedConv2d): split, convs of several kernel sizes, concat -> BN
# ---------------------------------------------------------------------------------------------------------


class MixedConv2d(nn.ModuleDict):
    def __init__(self, cin: int, cout: int, kernels: list[int], depthwise: bool = False) -> None:
        splits_in = [cin // len(kernels)] * len(kernels)
        splits_out = [cout // len(kernels)] * len(kernels)
        super().__init__({str(i): nn.Conv2d(ci, co, k, 1, k // 2, groups=co if depthwise else 1, bias=False)
                          for i, (k, ci, co) in enumerate(zip(kernels, splits_in, splits_out))})
        self.splits = splits_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.values())], 1)


class MixNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 12, 3, 2)
        self.mix_dw = MixedConv2d(12, 12, [3, 5, 7], depthwise=True)
        self.bn_dw = BatchNormAct2d(12, act_layer=nn.SiLU)
        self.mix_pw = MixedConv2d(12, 18, [1, 3])
        self.bn_pw = nn.BatchNorm2d(18)
        self.branch_conv = nn.Conv2d(18, 6, 3, 1, 1, bias=True)
        self.branch_pool = nn.MaxPool2d(3, 1, 1)
        self.bn_cat = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_dw(self.mix_dw(self.stem(x)))
        x = self.bn_pw(self.mix_pw(x))
        x = F.relu(self.bn_cat(torch.cat([self.branch_conv(x), self.branch_pool(x)], 1)))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------------------
# 9. 1-D temporal conv net: dilations, circular padding, grouped convs, ConvTranspose1d with groups
# ---------------------------------------------------------------------------------------------------------


class TemporalBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, dilation, dilation, bias=True)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, 1, 2 * dilation, 2 * dilation, groups=groups, bias=False,
                               padding_mode="circular")
        self.bn2 = nn.BatchNorm1d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class TemporalConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(4, 8, 5, 1, 2, bias=False), nn.BatchNorm1d(8), nn.ReLU())
        self.blocks = nn.Sequential(TemporalBlock(8, 8, 1, 2), TemporalBlock(8, 16, 2, 1, groups=4))
        self.up = nn.ConvTranspose1d(16, 8, 4, 2, 1, groups=2, bias=False)
        self.up_bn = nn.BatchNorm1d(8)
        self.head = nn.Conv1d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.up_bn(self.up(self.blocks(self.stem(x))))))


# ---------------------------------------------------------------------------------------------------------
# 10. 3-D conv net: (2+1)D residual block, grouped Conv3d, ConvTranspose3d with groups
# ---------------------------------------------------------------------------------------------------------


class Conv2Plus1D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), 1, (0, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(channels)
        self.temporal = nn.Conv3d(channels, channels, (3, 1, 1), 1, (1, 0, 0), bias=False)
        self.bn2 = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.temporal(F.relu(self.bn1(self.spatial(x)))))
        return F.relu(out + x)


class Video3DNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False),
                                  nn.BatchNorm3d(8, eps=1e-3), nn.ReLU(inplace=True))
        self.block = Conv2Plus1D(8)
        self.down = nn.Conv3d(8, 16, 3, 2, 1, groups=2, bias=True)
        self.down_bn = nn.BatchNorm3d(16)
        self.up = nn.ConvTranspose3d(16, 8, 2, 2, groups=2, bias=True)
        self.up_bn = nn.BatchNorm3d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        x = F.relu(self.down_bn(self.down(x)))
        x = F.relu(self.up_bn(self.up(x)))
        return self.fc(x.mean((2, 3, 4)))


# ---------------------------------------------------------------------------------------------------------
# 11. U-Net: grouped ConvTranspose2d (with padding/output_padding, with and without bias) and skip concats
# ---------------------------------------------------------------------------------------------------------


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), _relu(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=True), nn.BatchNorm2d(cout), _relu())


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = DoubleConv(3, 8)
        self.enc2 = DoubleConv(8, 16)
        self.bottleneck = ConvBNAct(16, 32, 3)
        self.up2 = nn.ConvTranspose2d(32, 16, 3, 2, 1, output_padding=1, groups=2, bias=False)
        self.up2_bn = nn.BatchNorm2d(16)
        self.dec2 = DoubleConv(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, 2, groups=4, bias=True)
        self.up1_bn = nn.BatchNorm2d(8)
        self.dec1 = DoubleConv(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.relu(self.up2_bn(self.up2(b))), e2], 1))
        d1 = self.dec1(torch.cat([F.relu(self.up1_bn(self.up1(d2))), e1], 1))
        return self.out(d1)


# ---------------------------------------------------------------------------------------------------------
# 12. MLP: Linear-BN1d on (N, C), and a Linear over the last axis of (N, C, L) followed by BN1d(C)
# ---------------------------------------------------------------------------------------------------------


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 8)  # (N, 8, 16) -> (N, 8, 8): features on the last axis
        self.bn_tokens = nn.BatchNorm1d(8)  # normalizes axis 1 of (N, 8, 8): not the Linear's features
        self.fc1 = nn.Linear(64, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 32, bias=False)
        self.bn2 = nn.BatchNorm1d(32, eps=1e-3)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_tokens(self.proj(x))).flatten(1)
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


# ---------------------------------------------------------------------------------------------------------
# 13. Models torch.fx cannot trace: shape-dependent Python (export works) and data-dependent branches
# ---------------------------------------------------------------------------------------------------------


class ShapeDynamicNet(nn.Module):
    """Python control flow on input sizes, as detection and segmentation models do to pad to a stride."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, 2, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stages = nn.ModuleList([ConvBNAct(8, 8, 3), ConvBNAct(8, 16, 3, 2)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 != 0:
            x = F.pad(x, [0, 4 - x.shape[-1] % 4])
        x = F.relu(self.stem_bn(self.stem(x)))
        for stage in self.stages[: min(len(self.stages), int(math.log2(x.shape[-1])))]:
            x = stage(x)
        return self.fc(x.mean((2, 3)))


class DataDependentNet(nn.Module):
    """Branches on the values of an activation: neither torch.fx nor torch.export can capture it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.branch_pos = ConvBNAct(8, 8, 3)
        self.branch_neg = ConvBNAct(8, 8, 1)
        self.tail_conv = nn.Conv2d(8, 16, 3, 2, 1, bias=True)
        self.tail_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        if y.mean() > 0.5:
            y = self.branch_pos(y)
        else:
            y = self.branch_neg(y)
        y = F.relu(self.tail_bn(self.tail_conv(y)))
        return self.fc(y.mean((2, 3)))


# ---------------------------------------------------------------------------------------------------------
# 14. BN before a conv ("fold forward"): input normalization, pre-activation blocks, padding modes
# ---------------------------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """Pre-activation ResNet block: bn1 -> relu -> conv1 -> bn2 -> relu -> conv2, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


class FoldForwardNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.conv_reflect = nn.Conv2d(3, 8, 3, 1, 1, padding_mode="reflect", bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool_bn = nn.BatchNorm2d(8)
        self.conv_zero = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.block = PreActBlock(8)
        self.add_bn = nn.BatchNorm2d(8)
        self.conv_1x1 = nn.Conv2d(8, 16, 1, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.conv_dw = nn.Conv2d(16, 16, 3, 1, 0, groups=16, bias=False)
        self.rep_bn = nn.BatchNorm2d(16)
        self.conv_replicate = nn.Conv2d(16, 16, 3, 1, 1, groups=2, padding_mode="replicate", bias=True)
        self.head_bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv_reflect(self.input_bn(x))))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv_zero(self.pool_bn(x))))
        x = self.conv_1x1(self.add_bn(self.block(x)))
        x = self.conv_dw(self.dw_bn(F.relu(x)))
        x = F.relu(self.conv_replicate(self.rep_bn(F.relu(x))))
        return self.fc(self.head_bn(x.mean((2, 3))))


# ---------------------------------------------------------------------------------------------------------
# 15. Shared convs: one conv called at two places with different BNs, one called twice before the same BN,
#     weights tied between two convs, plus other outputs-read-elsewhere cases
# ---------------------------------------------------------------------------------------------------------


class SharedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3)
        self.shared = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn_left = nn.BatchNorm2d(8)
        self.bn_right = nn.BatchNorm2d(8)
        self.twice = nn.Conv2d(8, 8, 1, bias=True)
        self.bn_twice = nn.BatchNorm2d(8)
        self.tied_a = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.tied_b = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.tied_b.weight = self.tied_a.weight
        self.bn_tied_a = nn.BatchNorm2d(8)
        self.bn_tied_b = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        left = F.relu(self.bn_left(self.shared(h)))
        right = F.relu(self.bn_right(self.shared(F.avg_pool2d(h, 3, 1, 1))))
        a = F.relu(self.bn_twice(self.twice(left)))
        b = F.relu(self.bn_twice(self.twice(right)))
        c = self.bn_tied_a(self.tied_a(a))
        d = self.bn_tied_b(self.tied_b(b))
        return self.fc((c + d).mean((2, 3)))


class EdgeCaseNet(nn.Module):
    """BN layers that look foldable to a pattern matcher but are not."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3)
        self.conv_res = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn_res = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.conv_b = nn.Conv2d(8, 8, 1, bias=True)
        self.bn_sum = nn.BatchNorm2d(8)
        self.conv_ws = WSConv2d(8, 8, 3, 1, 1, bias=False)
        self.bn_ws = nn.BatchNorm2d(8)
        self.conv_nostats = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_nostats = nn.BatchNorm2d(8, track_running_stats=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        r = self.conv_res(h)
        h = F.relu(self.bn_res(r) + r)  # the conv output is also read by the Add
        h = F.relu(self.bn_sum(self.conv_a(h) + self.conv_b(h)))  # BN after an Add of two convs: it folds
        h = F.relu(self.bn_ws(self.conv_ws(h)))  # conv weight computed at run time
        h = F.relu(self.bn_nostats(self.conv_nostats(h)))  # batch statistics even in eval mode
        return self.fc(h.mean((2, 3)))


# ---------------------------------------------------------------------------------------------------------
# 16. Detection neck: FPN with lateral 1x1 conv+BN, EfficientDet-style heads shared across levels with
#     per-level BN, and one conv feeding two heads
# ---------------------------------------------------------------------------------------------------------


class FPNDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3, 2)
        self.c3 = ConvBNAct(8, 16, 3, 2)
        self.c4 = ConvBNAct(16, 32, 3, 2)
        self.lateral3 = ConvBNAct(16, 16, 1, act=None)
        self.lateral4 = ConvBNAct(32, 16, 1, act=None)
        self.out3 = ConvBNAct(16, 16, 3)
        self.out4 = ConvBNAct(16, 16, 3)
        self.head_conv = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.head_bn = nn.ModuleList([nn.BatchNorm2d(16), nn.BatchNorm2d(16)])
        self.neck_conv = nn.Conv2d(16, 16, 3, 1, 1, bias=True)
        self.cls_bn = nn.BatchNorm2d(16)
        self.cls_out = nn.Conv2d(16, 4, 1)
        self.box_out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        p4 = self.lateral4(c4)
        p3 = self.lateral3(c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        levels = [self.out3(p3), self.out4(p4)]
        heads = [F.silu(bn(self.head_conv(level))) for bn, level in zip(self.head_bn, levels)]
        feat = self.neck_conv(heads[0])
        cls = self.cls_out(F.relu(self.cls_bn(feat)))
        box = self.box_out(feat)
        return torch.cat([cls.flatten(1), box.flatten(1), heads[1].flatten(1)], 1)


class ConvNormChain(nn.Module):
    """(conv -> norm -> ReLU) per stage, then global average pooling and `fc`."""

    def stages(self) -> list[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in self.stages():
            x = F.relu(norm(conv(x)))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------------------
# 17. F.batch_norm on buffers with non-standard names, and a non-affine BN
# ---------------------------------------------------------------------------------------------------------


class FunctionalBNNet(ConvNormChain):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.stem.norm = FunctionalBN(8)
        self.conv2 = nn.Conv2d(8, 16, 3, 1, 1, bias=True)
        self.norm2 = nn.BatchNorm2d(16, affine=False)
        self.conv3 = nn.Conv2d(16, 16, 1, bias=False)
        self.norm3 = FunctionalBN(16, eps=1e-3)
        self.fc = nn.Linear(16, 10)

    def stages(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.stem.conv, self.stem.norm), (self.conv2, self.norm2), (self.conv3, self.norm3)]


# ---------------------------------------------------------------------------------------------------------
# 18. SyncBatchNorm (eval, CPU) and LazyConv2d/LazyBatchNorm2d
# ---------------------------------------------------------------------------------------------------------


class SyncLazyNet(ConvNormChain):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.SyncBatchNorm(8)
        self.conv2 = nn.LazyConv2d(16, 3, 1, 1, bias=False)
        self.bn2 = nn.LazyBatchNorm2d()
        self.conv3 = nn.Conv2d(16, 16, 3, 1, 1, groups=4, bias=False)
        self.bn3 = nn.SyncBatchNorm(16, eps=1e-3)
        self.fc = nn.Linear(16, 10)

    def stages(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]


# ---------------------------------------------------------------------------------------------------------
# 19. DenseNet: BN after concatenations of features read elsewhere, BN -> ReLU -> conv (pre-activation)
# ---------------------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(torch.cat(features, 1))))
        return self.conv2(F.relu(self.norm2(out)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, cin: int, growth: int) -> None:
        super().__init__({f"denselayer{i + 1}": DenseLayer(cin + i * growth, growth) for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(OrderedDict(norm=nn.BatchNorm2d(cin), relu=_relu(), conv=nn.Conv2d(cin, cout, 1, bias=False),
                                     pool=nn.AvgPool2d(2, 2)))


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            conv0=nn.Conv2d(3, 8, 3, 1, 1, bias=False), norm0=nn.BatchNorm2d(8), relu0=_relu(),
            pool0=nn.MaxPool2d(2, 2),
            denseblock1=DenseBlock(2, 8, 4), transition1=Transition(16, 8),
            denseblock2=DenseBlock(2, 8, 4), norm5=nn.BatchNorm2d(16),
        ))
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------------------
# 20. Pre-activation ResNet (ResNet v2): at a stage transition the next BN reads the sum of the residual
#     branch and the projection shortcut alone; identity shortcuts and outputs read twice keep their BN
# ---------------------------------------------------------------------------------------------------------


class PreActResBlock(nn.Module):
    """kuangliu/pytorch-cifar's PreActBlock: relu(bn1(x)) feeds conv1 and, when the shape changes, a 1x1
    projection shortcut (else the shortcut is x itself); the block returns conv2(relu(bn2(...))) + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """conv stem, identity block, projection block, projection block (reads the previous projection
    block's sum alone), identity block, final BN -> ReLU -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(PreActResBlock(8, 8), PreActResBlock(8, 16, 2))
        self.layer2 = nn.Sequential(PreActResBlock(16, 32, 2), PreActResBlock(32, 32))
        self.bn = nn.BatchNorm2d(32)
        self.linear = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(self.conv1(x)))
        return self.linear(F.relu(self.bn(out)).mean((2, 3)))


# ---------------------------------------------------------------------------------------------------------
# 21. Sums of parallel branches before a BN: three convs (ACNet/RepVGG-style), a decoder merge of a grouped
#     ConvTranspose and a lateral conv, a global-context branch broadcast over space, two Linear heads;
#     kept: a 1-channel gate broadcast over channels, a summed conv output that is also read elsewhere
# ---------------------------------------------------------------------------------------------------------


class BranchSumNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3)
        self.branch3x3 = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.branch1x1 = nn.Conv2d(8, 8, 1, bias=False)
        self.branch_dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=True)
        self.bn_branches = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.bn_down = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, 2, groups=2, bias=False)
        self.lateral = nn.Conv2d(8, 8, 1, bias=True)
        self.bn_merge = nn.BatchNorm2d(8)
        self.local = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.context = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_context = nn.BatchNorm2d(8)
        self.value = nn.Conv2d(8, 8, 1, bias=False)
        self.gate = nn.Conv2d(8, 1, 1)
        self.bn_gate = nn.BatchNorm2d(8)
        self.probe = nn.Conv2d(8, 8, 1, bias=False)
        self.mix = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_probe = nn.BatchNorm2d(8)
        self.fc_a = nn.Linear(8, 10)
        self.fc_b = nn.Linear(8, 10, bias=False)
        self.bn_head = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = F.relu(self.bn_branches(self.branch3x3(h) + self.branch1x1(h) + self.branch_dw(h)))
        deep = F.relu(self.bn_down(self.down(h)))
        h = F.relu(self.bn_merge(self.up(deep) + self.lateral(h)))
        h = F.relu(self.bn_context(self.local(h) + self.context(F.adaptive_avg_pool2d(h, 1))))
        h = F.relu(self.bn_gate(self.value(h) + self.gate(h)))
        probe = self.probe(h)
        h = F.relu(self.bn_probe(probe + self.mix(h))) * torch.sigmoid(probe)
        pooled = h.mean((2, 3))
        return self.bn_head(self.fc_a(pooled) + self.fc_b(F.relu(pooled)))


# ---------------------------------------------------------------------------------------------------------
# Deterministic construction with non-trivial statistics
# ---------------------------------------------------------------------------------------------------------

# Attribute names under which BN-like modules keep (mean, var, weight, bias).
_STAT_NAMES = (("running_mean", "running_var", "weight", "bias"), ("mu", "sigma2", "gamma", "beta"))


def _bn_tensors(module: nn.Module) -> tuple[torch.Tensor | None, ...] | None:
    own = dict(module.named_buffers(recurse=False)) | dict(module.named_parameters(recurse=False))
    for names in _STAT_NAMES:
        if names[0] in own and names[1] in own:
            return tuple(own.get(n) for n in names)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # no running statistics
        return (None, None, own.get("weight"), own.get("bias"))
    return None


def bn_module_names(model: nn.Module) -> set[str]:
    """Module paths of every BN-like module: BN classes and subclasses, look-alikes, F.batch_norm owners."""
    return {name for name, module in model.named_modules() if _bn_tensors(module) is not None}


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BN-like module distinct, non-trivial statistics and affine parameters (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.named_modules():
            tensors = _bn_tensors(module)
            if tensors is None:
                continue
            mean, var, weight, bias = tensors
            if mean is not None:
                mean.copy_(torch.randn(mean.shape, generator=gen) * 0.3)
            if var is not None:
                var.copy_(torch.rand(var.shape, generator=gen) * 1.5 + 0.4)
            if weight is not None:
                sign = torch.where(torch.rand(weight.shape, generator=gen) < 0.15, -1.0, 1.0)
                weight.copy_((torch.rand(weight.shape, generator=gen) + 0.5) * sign)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.3)
            if getattr(module, "num_batches_tracked", None) is not None:
                module.num_batches_tracked.fill_(1000)
    return model


def _build(cls: type[nn.Module], seed: int, materialize: tuple[int, ...] | None = None) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls()
        if materialize is not None:  # lazy modules take their shapes from a first forward
            with torch.no_grad():
                model.eval()(torch.zeros(materialize))
    return randomize_bn(model, seed + 1000).eval()


def resnet_basic() -> nn.Module:
    return _build(ResNetBasic, 1)


def resnet_bottleneck() -> nn.Module:
    return _build(ResNetBottleneck, 2)


def mobilenetv2_timm() -> nn.Module:
    return _build(MobileNetV2Timm, 3)


def efficientnet() -> nn.Module:
    return _build(EfficientNet, 4)


def regnety() -> nn.Module:
    return _build(RegNetY, 5)


def frozen_backbone() -> nn.Module:
    return _build(FrozenBackbone, 6)


def vit_bn() -> nn.Module:
    return _build(VisionTransformerBN, 7)


def mixnet() -> nn.Module:
    return _build(MixNet, 8)


def tcn1d() -> nn.Module:
    return _build(TemporalConvNet, 9)


def video3d() -> nn.Module:
    return _build(Video3DNet, 10)


def unet() -> nn.Module:
    return _build(UNet, 11)


def token_mlp() -> nn.Module:
    return _build(TokenMLP, 12)


def shape_dynamic() -> nn.Module:
    return _build(ShapeDynamicNet, 13)


def data_dependent() -> nn.Module:
    return _build(DataDependentNet, 14)


def fold_forward() -> nn.Module:
    return _build(FoldForwardNet, 15)


def shared_conv() -> nn.Module:
    return _build(SharedConvNet, 16)


def edge_cases() -> nn.Module:
    return _build(EdgeCaseNet, 17)


def fpn_detector() -> nn.Module:
    return _build(FPNDetector, 18)


def functional_bn() -> nn.Module:
    return _build(FunctionalBNNet, 19)


def sync_lazy() -> nn.Module:
    return _build(SyncLazyNet, 20, materialize=(1, 3, 16, 16))


def sync_lazy_skeleton() -> nn.Module:
    """The SyncLazyNet architecture with its lazy modules not yet materialized (for state_dict loading)."""
    return SyncLazyNet().eval()


def densenet() -> nn.Module:
    return _build(DenseNet, 21)


def preact_resnet() -> nn.Module:
    return _build(PreActResNet, 22)


def branch_sum() -> nn.Module:
    return _build(BranchSumNet, 23)


# ---------------------------------------------------------------------------------------------------------
# The zoo and its ground truth
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    """One architecture and, per BN layer, whether it folds exactly (and why not).

    `onnx_kept` replaces `kept` for the ONNX export where the two differ: there a conv called twice is two
    Conv nodes, and ONNX weights that are computed from initializers are constants (issue 4), so a few
    layers PyTorch must keep fold in ONNX. Layers the exporter does not emit as BatchNormalization (the
    frozen-BN look-alike) simply do not appear there.
    """

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    patterns: str
    foldable: frozenset[str]
    kept: Mapping[str, str] = field(default_factory=dict)
    onnx_kept: Mapping[str, str] | None = None
    state_dict_factory: Callable[[], nn.Module] | None = None
    pt2_skip: str | None = None  # why torch.export cannot capture the model
    onnx_skip: str | None = None  # why the ONNX exporter cannot export it with BN kept
    onnx_dynamic_batch: bool = True  # False: export with a fixed batch (what the exporter needs)

    @property
    def bn_layers(self) -> frozenset[str]:
        return self.foldable | frozenset(self.kept)

    @property
    def factory_spec(self) -> str:
        """The `--model-factory` spec that rebuilds the architecture for a state_dict."""
        return f"{__name__}:{(self.state_dict_factory or self.factory).__name__}"

    def shape_text(self, batch: int | None = None) -> str:
        """The input shape as `--input-shape` takes it, optionally with another batch size."""
        shape = self.input_shape if batch is None else (batch, *self.input_shape[1:])
        return ",".join(str(d) for d in shape)

    @property
    def onnx_expected_kept(self) -> Mapping[str, str]:
        return self.kept if self.onnx_kept is None else self.onnx_kept

    def example(self, batch: int | None = None, seed: int = 0) -> torch.Tensor:
        shape = self.input_shape if batch is None else (batch, *self.input_shape[1:])
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _names(*names: str) -> frozenset[str]:
    return frozenset(names)


def _basic_block(prefix: str, downsample: bool) -> list[str]:
    names = [f"{prefix}.bn1", f"{prefix}.bn2"]
    return names + ([f"{prefix}.downsample.1"] if downsample else [])


def _bottleneck(prefix: str, downsample: bool) -> list[str]:
    names = [f"{prefix}.bn1", f"{prefix}.bn2", f"{prefix}.bn3"]
    return names + ([f"{prefix}.downsample.1"] if downsample else [])


def _frozen_bottleneck(prefix: str, shortcut: bool) -> list[str]:
    names = [f"{prefix}.conv{i}.norm" for i in (1, 2, 3)]
    return names + ([f"{prefix}.shortcut.norm"] if shortcut else [])


_CONV_ALSO_READ = "the conv output is also read by another node"
_RELU_AFTER = "no single conv/linear producer, and a ReLU follows"

ZOO: list[ZooModel] = [
    ZooModel(
        "resnet_basic", resnet_basic, (1, 3, 16, 16),
        "basic blocks, residual Add after BN, 1x1 stride-2 downsample conv+BN in nn.Sequential",
        _names("bn1", *_basic_block("layer1.0", False), *_basic_block("layer2.0", True),
               *_basic_block("layer2.1", False)),
    ),
    ZooModel(
        "resnet_bottleneck", resnet_bottleneck, (1, 3, 16, 16),
        "bottlenecks, 7x7 stride-2 stem, grouped 3x3 (ResNeXt), downsample branches",
        _names("bn1", *_bottleneck("layer1.0", True), *_bottleneck("layer2.0", True),
               *_bottleneck("layer2.1", False)),
    ),
    ZooModel(
        "mobilenetv2_timm", mobilenetv2_timm, (1, 3, 16, 16),
        "timm BatchNormAct2d (BN subclass + act + dropout), Conv2dSame (conv subclass, F.pad), depthwise, "
        "inverted residuals",
        _names("bn1", "blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2", "blocks.1.bn3",
               "blocks.2.bn1", "blocks.2.bn2", "blocks.2.bn3", "bn2"),
    ),
    ZooModel(
        "efficientnet", efficientnet, (1, 3, 16, 16),
        "Conv2dNormActivation, SiLU, depthwise k5, squeeze-excitation multiply after BN, stochastic depth, "
        "eps 1e-3",
        _names("features.0.1", "features.1.block.0.1", "features.1.block.2.1",
               "features.2.block.0.1", "features.2.block.1.1", "features.2.block.3.1",
               "features.3.block.0.1", "features.3.block.1.1", "features.3.block.3.1", "features.4.1"),
    ),
    ZooModel(
        "regnety", regnety, (1, 3, 16, 16),
        "grouped 3x3 convs (group width 4), SE, projection shortcut conv+BN",
        _names("stem.1", "trunk.0.proj.1", "trunk.0.f.a.1", "trunk.0.f.b.1", "trunk.0.f.c.1",
               "trunk.1.f.a.1", "trunk.1.f.b.1", "trunk.1.f.c.1"),
    ),
    ZooModel(
        "frozen_backbone", frozen_backbone, (1, 3, 16, 16),
        "detectron2 Conv2d subclass owning its norm, FrozenBatchNorm2d look-alike (x*scale+shift by hand), "
        "grouped bottleneck",
        _names("stem.conv1.norm", *_frozen_bottleneck("res2.0", True), *_frozen_bottleneck("res2.1", False),
               *_frozen_bottleneck("res3.0", True)),
    ),
    ZooModel(
        "vit_bn", vit_bn, (1, 3, 16, 16),
        "LeViT Linear -> bn(x.flatten(0, 1)).reshape_as(x), attention, BN1d -> Dropout -> Linear heads "
        "(fold forward), pre-norm BN over transposed tokens -> Linear (fold forward), Linear -> transpose -> BN1d",
        _names("patch_embed.0.1", "patch_embed.1.1", "block1.attn.qkv.bn", "block1.attn.proj.1.bn",
               "block1.mlp.0.bn", "block1.mlp.2.bn", "block2.norm1.bn", "block2.norm2.bn", "mixer.norm.bn",
               "head.bn", "head_dist.bn"),
    ),
    ZooModel(
        "mixnet", mixnet, (1, 3, 16, 16),
        "MixedConv2d: split, depthwise k3/k5/k7 convs, concat -> BatchNormAct2d (split fold); concat with a "
        "pooling branch -> BN (kept)",
        _names("stem.1", "bn_dw", "bn_pw"),
        {"bn_cat": "one concatenated input is a max-pool, not a conv; a ReLU follows"},
    ),
    ZooModel(
        "tcn1d", tcn1d, (1, 4, 32),
        "Conv1d-BN1d with dilations, circular padding, grouped Conv1d, stride-2 downsample, grouped "
        "ConvTranspose1d -> BN1d",
        _names("stem.1", "blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2", "blocks.1.downsample.1",
               "up_bn"),
    ),
    ZooModel(
        "video3d", video3d, (1, 3, 4, 8, 8),
        "Conv3d-BN3d, (2+1)D residual block, grouped Conv3d with bias, grouped ConvTranspose3d -> BN3d",
        _names("stem.1", "block.bn1", "block.bn2", "down_bn", "up_bn"),
    ),
    ZooModel(
        "unet", unet, (1, 3, 16, 16),
        "U-Net: grouped ConvTranspose2d (groups 2 with padding/output_padding, groups 4 with bias) -> BN, "
        "skip concatenations after the BN",
        _names("enc1.1", "enc1.4", "enc2.1", "enc2.4", "bottleneck.1", "up2_bn", "dec2.1", "dec2.4", "up1_bn",
               "dec1.1", "dec1.4"),
    ),
    ZooModel(
        "token_mlp", token_mlp, (2, 8, 16),
        "Linear -> BN1d on (N, C); Linear over the last axis of (N, C, L) -> BN1d(C) with C == out_features "
        "(must not fold)",
        _names("bn1", "bn2"),
        {"bn_tokens": "BN1d normalizes axis 1 of (N, C, L) but the Linear's features are the last axis; "
                      "a ReLU follows"},
    ),
    ZooModel(
        "shape_dynamic", shape_dynamic, (1, 3, 16, 16),
        "torch.fx cannot trace: Python control flow on input sizes, Conv2dSame, ModuleList slicing by size",
        _names("stem_bn", "stages.0.1", "stages.1.1"),
    ),
    ZooModel(
        "data_dependent", data_dependent, (1, 3, 16, 16),
        "branches on activation values (neither torch.fx nor torch.export captures it); conv+BN before, "
        "inside and after the branch",
        _names("bn", "branch_pos.1", "branch_neg.1", "tail_bn"),
        pt2_skip="torch.export cannot capture a branch on tensor values",
    ),
    ZooModel(
        "fold_forward", fold_forward, (1, 3, 16, 16),
        "BN before a conv: input BN -> reflect-padded conv, BN -> zero-padded conv (kept), pre-activation "
        "block, BN after an Add -> 1x1 conv, BN -> unpadded depthwise conv, BN -> replicate-padded grouped "
        "conv, BN1d -> Linear",
        _names("input_bn", "bn1", "bn2", "block.bn2", "add_bn", "dw_bn", "rep_bn", "head_bn"),
        {"pool_bn": "produced by a max-pool, and the next conv pads with zeros (the shift does not fold "
                    "exactly at the borders)",
         "block.bn1": "its input is also the residual, and a ReLU follows"},
    ),
    ZooModel(
        "shared_conv", shared_conv, (1, 3, 16, 16),
        "a conv module called twice with different BNs (kept), a conv called twice before the same BN "
        "(folds once), two convs with tied weights and different BNs (kept)",
        _names("stem.1", "bn_twice"),
        {"bn_left": "conv `shared` is also called before bn_right",
         "bn_right": "conv `shared` is also called before bn_left",
         "bn_tied_a": "conv tied_a shares its weight with tied_b, followed by another BN",
         "bn_tied_b": "conv tied_b shares its weight with tied_a, followed by another BN"},
        onnx_kept={},  # two Conv nodes each: the weight initializer can be duplicated per node
    ),
    ZooModel(
        "edge_cases", edge_cases, (1, 3, 16, 16),
        "conv output also read by a residual Add, BN after an Add of two convs (folds into both), "
        "weight-standardized conv (weight computed at run time), BN without running statistics",
        _names("stem.1", "bn_sum"),
        {"bn_res": _CONV_ALSO_READ + " (the residual Add)",
         "bn_ws": "the conv's weight is computed at run time (weight standardization)",
         "bn_nostats": "no running statistics: normalizes with batch statistics in eval mode"},
        # In ONNX the standardized weight is a constant subgraph of initializers: it folds (issue 4).
        onnx_kept={"bn_res": _CONV_ALSO_READ + " (the residual Add)",
                   "bn_nostats": "no running statistics: normalizes with batch statistics"},
        # The exporter writes a BN without running statistics only with a static batch (as a
        # BatchNormalization with training_mode=1 whose mean and variance are computed from the input).
        onnx_dynamic_batch=False,
    ),
    ZooModel(
        "fpn_detector", fpn_detector, (1, 3, 16, 16),
        "FPN: lateral 1x1 conv+BN, top-down Add + nearest upsample, a head conv shared across levels with "
        "per-level BN (EfficientDet), one conv feeding two heads",
        _names("stem.1", "c3.1", "c4.1", "lateral3.1", "lateral4.1", "out3.1", "out4.1"),
        {"head_bn.0": "conv head_conv is called on every level, each followed by a different BN",
         "head_bn.1": "conv head_conv is called on every level, each followed by a different BN",
         "cls_bn": _CONV_ALSO_READ + " (box_out)"},
        onnx_kept={"cls_bn": _CONV_ALSO_READ + " (box_out)"},
    ),
    ZooModel(
        "functional_bn", functional_bn, (1, 3, 16, 16),
        "F.batch_norm on buffers named mu/sigma2/gamma/beta inside a custom module, non-affine BatchNorm2d",
        _names("stem.norm", "norm2", "norm3"),
    ),
    ZooModel(
        "sync_lazy", sync_lazy, (1, 3, 16, 16),
        "SyncBatchNorm in eval on CPU, LazyConv2d + LazyBatchNorm2d (materialized), grouped conv",
        _names("bn1", "bn2", "bn3"),
        state_dict_factory=sync_lazy_skeleton,
    ),
    ZooModel(
        "densenet", densenet, (1, 3, 16, 16),
        "DenseNet: BN after concatenations of features also read by later layers, BN -> ReLU -> conv, "
        "transition BN",
        _names("features.norm0", "features.denseblock1.denselayer1.norm2", "features.denseblock1.denselayer2.norm2",
               "features.denseblock2.denselayer1.norm2", "features.denseblock2.denselayer2.norm2"),
        {"features.denseblock1.denselayer1.norm1": "produced by a max-pool; a ReLU follows",
         "features.denseblock1.denselayer2.norm1": "a concat of features also read elsewhere; a ReLU follows",
         "features.transition1.norm": "a concat of features also read elsewhere; a ReLU follows",
         "features.denseblock2.denselayer1.norm1": "produced by an average pool; a ReLU follows",
         "features.denseblock2.denselayer2.norm1": "a concat of features also read elsewhere; a ReLU follows",
         "features.norm5": "a concat of features also read elsewhere; a ReLU follows"},
    ),
    ZooModel(
        "preact_resnet", preact_resnet, (1, 3, 16, 16),
        "pre-activation ResNet: BN after the sum of a residual branch and a projection shortcut (folds into "
        "both convs); BN after sums read by an identity shortcut too, or adding the identity (kept)",
        _names("layer1.0.bn2", "layer1.1.bn2", "layer2.0.bn1", "layer2.0.bn2", "layer2.1.bn2"),
        {"layer1.0.bn1": "the stem conv output is also the identity shortcut; a ReLU follows",
         "layer1.1.bn1": "one summed conv output (the stem's) is also read by layer1.0.bn1; a ReLU follows",
         "layer2.1.bn1": "the sum it normalizes is also the identity shortcut; a ReLU follows",
         "bn": "one summed input is the identity shortcut, a sum read twice, not a layer; a ReLU follows"},
    ),
    ZooModel(
        "branch_sum", branch_sum, (1, 3, 16, 16),
        "BN after sums of layer outputs: three parallel convs (a chain of Adds), grouped ConvTranspose + "
        "lateral conv, a conv on pooled features broadcast over space, two Linear heads; a 1-channel gate "
        "broadcast over channels and a summed conv output also read elsewhere (kept)",
        _names("stem.1", "bn_branches", "bn_down", "bn_merge", "bn_context", "bn_head"),
        {"bn_gate": "the sum broadcasts the 1-channel gate over 8 channels; a ReLU follows",
         "bn_probe": "the probe conv's output is also read by a sigmoid; a ReLU follows"},
    ),
]

ZOO_BY_NAME = {entry.name: entry for entry in ZOO}


# ---------------------------------------------------------------------------------------------------------
# Counting BN ops, exporting to ONNX
# ---------------------------------------------------------------------------------------------------------

_BN_OP_SUBSTRING = "batch_norm"


def count_bn_ops(model_or_path: object, example: torch.Tensor | None = None) -> int:
    """How many BN ops a model runs: BatchNormalization nodes of an ONNX file or proto (subgraphs too),
    batch-norm nodes of an ExportedProgram (or .pt2 file), or batch-norm calls of an nn.Module's forward
    on `example` (look-alikes that compute x*scale+shift by hand are not BN ops)."""
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if path.suffix == ".onnx":
            import onnx

            return count_bn_ops(onnx.load(str(path)))
        model_or_path = torch.export.load(str(path))
    if type(model_or_path).__module__.startswith("onnx"):
        return len(onnx_bn_nodes(model_or_path))
    if isinstance(model_or_path, torch.export.ExportedProgram):
        return sum(1 for node in model_or_path.graph.nodes
                   if node.op == "call_function" and _BN_OP_SUBSTRING in str(node.target))
    if isinstance(model_or_path, nn.Module):
        if example is None:
            raise ValueError("counting the BN ops of an nn.Module needs an example input")
        return sum(bn_calls(model_or_path, example).values())
    raise TypeError(f"cannot count BN ops in a {type(model_or_path).__name__}")


def bn_calls(module: nn.Module, example: torch.Tensor) -> Counter[str]:
    """BN op calls during one forward, by the module path owning the statistics they read ('?' if none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    owners = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        owners.setdefault(tensor.data_ptr(), name.rsplit(".", 1)[0] if "." in name else "")
    calls: Counter[str] = Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _BN_OP_SUBSTRING in func.__name__:
                tensors = [a for a in args[1:5] if isinstance(a, torch.Tensor)]
                owner = next((owners[t.data_ptr()] for t in tensors if t.data_ptr() in owners), "?")
                calls[owner] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Counting():
        module(example)
    return calls


def stat_reads(module: nn.Module, example: torch.Tensor) -> Counter[str]:
    """How many ops of one forward read each BN-like module's running statistics, by module path.

    A folded layer's statistics must be read by nothing: neither a batch-norm op nor the by-hand
    arithmetic of a look-alike (an "identity" BN left in place would still cost its op).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    stat_names = {names[i] for names in _STAT_NAMES for i in (0, 1)}
    owners = {}
    for name, tensor in module.named_buffers(remove_duplicate=False):
        prefix, _, leaf = name.rpartition(".")
        if leaf in stat_names:
            owners.setdefault(tensor.data_ptr(), prefix)
    reads: Counter[str] = Counter()

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [*args, *(kwargs or {}).values()]
            for owner in {owners.get(a.data_ptr()) for a in flat if isinstance(a, torch.Tensor)} - {None}:
                reads[owner] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recording():
        module(example)
    return reads


def onnx_bn_nodes(proto) -> list:
    """Every BatchNormalization node of an ONNX model, main graph and subgraphs."""
    import onnx

    found = []

    def walk(graph) -> None:
        for node in graph.node:
            if node.op_type == "BatchNormalization":
                found.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(proto.graph)
    return found


def onnx_bn_modules(proto, layer_names: frozenset[str] | set[str]) -> Counter[str]:
    """BatchNormalization nodes by the module path whose parameters they read ('?' when none matches).

    The exporter names initializers after the state_dict (`layer1.0.bn1.running_mean`); a non-affine BN
    gets anonymous scale/bias constants, so every parameter input is tried.
    """
    return Counter(onnx_bn_module(node, layer_names) for node in onnx_bn_nodes(proto))


def onnx_bn_module(node, layer_names: frozenset[str] | set[str]) -> str:
    """The module path whose parameters one BatchNormalization node reads ('?' when none matches)."""
    for name in node.input[1:5]:
        prefix = name.rsplit(".", 1)[0]
        if prefix in layer_names:
            return prefix
    return "?"


def export_onnx(module: nn.Module, shape: tuple[int, ...], path: str | Path, *, opset: int = 17,
                dynamic_batch: bool = True) -> Path:
    """Export with BN kept: the TorchScript-based exporter, no constant folding, eval mode.

    (The dynamo exporter and `do_constant_folding=True` fold Conv+BN themselves.) Every BN parameter of
    the zoo is randomized, so the exporter's de-duplication of bit-identical initializers into Identity
    nodes does not hit BN inputs.
    """
    path = Path(path)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, export_params=True, do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL, opset_version=opset, input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None,
        )
    return path


__all__ = ["ZOO", "ZOO_BY_NAME", "ZooModel", "bn_calls", "bn_module_names", "count_bn_ops", "export_onnx",
           "onnx_bn_module", "onnx_bn_modules", "onnx_bn_nodes", "randomize_bn", "stat_reads"]
