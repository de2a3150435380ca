"""Architectures of the sample models.

Every model takes a float32 tensor of shape (N, 1, 8, 8) holding pixel values in
[0, 1] (sklearn digits are 0..16, divided by 16) and returns logits of shape (N, 10).

Each class has a zero-argument factory (``make_cnn``, ``make_mlp``, ``make_resnet``,
``make_mixed``) that builds the untrained architecture, so that e.g.
``--model-factory sample_models.architectures:make_cnn`` plus ``cnn_state_dict.pt``
rebuilds the trained model.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """Three Conv-BN-ReLU blocks, global average pool, Linear.

    All BN layers directly follow a Conv2d whose output nobody else reads, so all of
    them are foldable. conv1/conv2 have no bias, conv3 has one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)  # 8x8 -> 4x4
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=True)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class DigitsMLP(nn.Module):
    """Flatten -> Linear-BN1d-ReLU-Dropout -> Linear-BN1d-ReLU -> Linear.

    The Dropout sits upstream of bn2: recalibrating bn2 with Dropout in train mode
    would give it wrong statistics.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 128)
        self.bn1 = nn.BatchNorm1d(128)
        self.relu1 = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(128, 64)
        self.bn2 = nn.BatchNorm1d(64)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        x = self.drop(self.relu1(self.bn1(self.fc1(x))))
        x = self.relu2(self.bn2(self.fc2(x)))
        return self.fc3(x)


class ResidualBlock(nn.Module):
    """Main branch conv-bn-relu-conv-bn plus a 1x1 stride-2 conv+BN downsample branch."""

    def __init__(self, cin: int, cout: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class DigitsResNet(nn.Module):
    """Stem conv-bn-relu, one residual block (stride 2), global average pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.block = ResidualBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem_conv(x)))
        x = self.block(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class DigitsMixed(nn.Module):
    """A model where some BN layers cannot be folded exactly.

    * ``input_bn`` normalizes the raw image: it has no producer layer to fold back
      into, and folding it forward into ``conv1`` is not exact because ``conv1``
      zero-pads its input (padding=1): the padded border stays 0 instead of becoming
      the BN shift, so the BN bias cannot be moved into conv1's bias exactly (the
      per-channel scale alone could be).
    * ``bn2`` reads ``conv2``'s output, but that output is also added, un-normalized,
      to the ReLU(bn2(.)) result: folding bn2 into conv2 would change the second
      branch. bn2 is followed by a ReLU, so it cannot fold forward either.
    * ``bn1`` (after ``conv1``) and ``bn3`` (after ``conv3``) are ordinary foldable
      Conv-BN pairs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(1)
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True)  # 8x8 -> 4x4
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_bn(x)
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = self.relu(self.bn2(y)) + y  # conv2's output has two readers
        x = self.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def make_cnn() -> DigitsCNN:
    return DigitsCNN()


def make_mlp() -> DigitsMLP:
    return DigitsMLP()


def make_resnet() -> DigitsResNet:
    return DigitsResNet()


def make_mixed() -> DigitsMixed:
    return DigitsMixed()


FACTORIES = {
    "cnn": make_cnn,
    "mlp": make_mlp,
    "resnet": make_resnet,
    "mixed": make_mixed,
}
