"""Small PyTorch models and checks for the fold tests: build, fold with bnfold, compare with the original."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.layers import FoldStatus
from tests.zoo import bn_calls, randomize_bn

__all__ = ["BNAct", "FrozenBN", "FunctionalNorm", "Wrap", "assert_folds", "bn_calls", "fold", "outputs",
           "randomized", "runnable"]


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` in eval mode with distinct, non-trivial BN statistics (a fold of identity BN proves nothing)."""
    return randomize_bn(model, seed).eval()


def runnable(model) -> nn.Module:
    """The eager callable behind a bnfold Model (an ExportedProgram's unlifted module)."""
    return model.program.module() if hasattr(model, "program") else model.module


@torch.no_grad()
def outputs(module, x: torch.Tensor) -> np.ndarray:
    return module(x).detach().double().numpy()


def fold(model: nn.Module, shape: tuple[int, ...], **options):
    return bnfold.fold(model, input_shape=",".join(str(d) for d in shape), **options)


def assert_folds(model: nn.Module, shape: tuple[int, ...], folded: set[str], kept: dict[str, str] | None = None,
                 rtol: float = 1e-5, seed: int = 1, **options):
    """Fold, then check the decisions, that the folded model computes the same function on a fresh input,
    and that no BN op of a folded layer is left. `kept` maps layer -> a word its reason must contain."""
    kept = kept or {}
    report = fold(model, shape, **options)
    assert report.verified, (report.difference, report.verify_error)
    decisions = {d.layer: d for d in report.decisions}
    assert {d.layer for d in report.decisions if d.status is FoldStatus.FOLDED} == folded, decisions
    assert {d.layer for d in report.decisions if d.status is FoldStatus.KEPT} == set(kept), decisions
    for layer, word in kept.items():
        assert word in decisions[layer].reason, decisions[layer].reason
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(_dtype(model))
    expected, actual = outputs(model, x), outputs(runnable(report.folded_model), x)
    assert np.abs(expected - actual).max() <= rtol * np.abs(expected).max()
    left = bn_calls(runnable(report.folded_model), x)
    assert not set(left) & folded, left
    return report


def _dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


class Wrap(nn.Module):
    """Applies its children in order (like nn.Sequential, but a plain custom module)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class BNAct(nn.BatchNorm2d):
    """A BN subclass that also applies an activation inside the same module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(super().forward(x))


class FrozenBN(nn.Module):
    """A frozen-BN look-alike computing x * scale + shift by hand."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class FunctionalNorm(nn.Module):
    """BN written with F.batch_norm on buffers and parameters with non-standard names."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.rand(channels) + 0.5)
        self.b = nn.Parameter(torch.randn(channels))
        self.register_buffer("avg", torch.randn(channels))
        self.register_buffer("spread", torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.avg, self.spread, self.g, self.b, False, 0.0, 1e-3)
