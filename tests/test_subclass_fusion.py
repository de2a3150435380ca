"""The fast method inside BN subclasses with a forward of their own (timm's BatchNormAct2d).

Their one eval-mode `F.batch_norm` call on the module's input and statistics is taken over and normalized
by the batch (`_OwnForwardByBatch`); a forward that cannot be taken so (it calls `torch.batch_norm`, feeds
F.batch_norm another tensor, or calls it twice) gets its first batch rejected and falls back to the
batch's statistics written into its buffers. Either way the statistics match the float64 oracle of
`tests.recalibration_oracle`, and every sample is counted once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.pytorch import recalibrate as torch_recalibrate
from tests.recalibration_oracle import assert_statistics_match, fast_oracle


class ActBatchNorm(nn.BatchNorm2d):
    """BatchNormAct2d's shape: F.batch_norm on the input, then an activation, in one module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps))


class AtenBatchNorm(ActBatchNorm):
    """The same function through `torch.batch_norm`, which no replacement of F.batch_norm sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, False, 0.0,
                                       self.eps, False))


class CopiedInput(ActBatchNorm):
    """The same function on a copy of the input: the call reads another tensor than the module's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * 1.0)


class TwoCalls(ActBatchNorm):
    """Two calls on the module's statistics, the second on the input mirrored (the same batch statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + super().forward(x.flip(-1))


def model(kind: type[nn.BatchNorm2d]) -> nn.Module:
    """Two layers of `kind` and a torch BN after them, with random statistics, so that each layer's batch
    normalization shows in the statistics of the layers below it."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 6, 3), kind(6), nn.Conv2d(6, 5, 3), kind(5), nn.Conv2d(5, 4, 1),
                           nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        for bn in (module[1], module[3], module[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return module


def values_per_channel(module: nn.Module) -> dict[str, int]:
    """How many values per channel the data gives the input of each `kind` layer (of `model`)."""
    shapes = {}
    hooks = [module[index].register_forward_pre_hook(lambda _, args, name=str(index): shapes.update({name: args[0].shape}))
             for index in (1, 3)]
    with torch.no_grad():
        module(torch.from_numpy(DATA[:1]))
    for hook in hooks:
        hook.remove()
    return {name: len(DATA) * shape[2] * shape[3] for name, shape in shapes.items()}


DATA = (np.random.default_rng(0).standard_normal((40, 3, 10, 10)) * 2 + 0.5).astype(np.float32)
BATCH = 8


@pytest.fixture
def instrumented(monkeypatch) -> dict[str, list[str]]:
    """The layers `InputStatistics.normalize` normalized, and one entry per batch an instrumented forward rejected."""
    seen: dict[str, list[str]] = {"normalized": [], "rejected": []}
    normalize, reject = torch_recalibrate.InputStatistics.normalize, torch_recalibrate.InputStatistics.reject_batch

    def normalized(self, layer, *args, **kwargs):
        seen["normalized"].append(layer)
        return normalize(self, layer, *args, **kwargs)

    def rejected(self) -> None:
        seen["rejected"].append("batch")
        reject(self)

    monkeypatch.setattr(torch_recalibrate.InputStatistics, "normalize", normalized)
    monkeypatch.setattr(torch_recalibrate.InputStatistics, "reject_batch", rejected)
    return seen


@pytest.mark.parametrize("kind, rejected", [(ActBatchNorm, 0), (AtenBatchNorm, 2), (CopiedInput, 2), (TwoCalls, 2)])
def test_a_subclass_forward_normalizes_by_the_batch_taken_over_or_not(kind, rejected, instrumented):
    module = model(kind)
    # torch.batch_norm is no F.batch_norm call for the oracle to see: it studies the same function written so
    reference = model(ActBatchNorm) if kind is AtenBatchNorm else module
    expected, _ = fast_oracle(reference, DATA, 1, batch=BATCH)
    if kind is TwoCalls:  # the oracle pools both calls, the same values twice: 2n - 1 degrees of freedom, not n - 1
        for name, values in values_per_channel(module).items():
            mean, var = expected[name]
            expected[name] = mean, var * (2 * values - 1) / (2 * values) * values / (values - 1)
    report = bnfold.recalibrate(module, DATA, method="fast", batch_size=BATCH, min_samples=1)
    assert len(instrumented["rejected"]) == rejected  # one first batch per layer that cannot be taken over
    if kind is ActBatchNorm:  # every call of every layer normalized by InputStatistics
        assert sorted(instrumented["normalized"]) == sorted(["1", "3", "5"] * (len(DATA) // BATCH))
    assert report.samples == len(DATA) and {layer.name for layer in report.layers} == {"1", "3", "5"}
    state = report.result.module.state_dict()
    for name in ("1", "3", "5"):
        assert_statistics_match(state[f"{name}.running_mean"], state[f"{name}.running_var"], *expected[name],
                                layer=name)
        assert int(state[f"{name}.num_batches_tracked"]) == len(DATA) // BATCH


def test_the_taken_call_leaves_f_batch_norm_as_it_was_also_when_the_forward_fails():
    original = F.batch_norm

    class Failing(ActBatchNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            super().forward(x)
            raise RuntimeError("a forward that fails")

    with pytest.raises(Exception, match="a forward that fails"):
        bnfold.recalibrate(model(Failing), DATA, method="fast", batch_size=BATCH, min_samples=1)
    assert F.batch_norm is original
    bnfold.recalibrate(model(ActBatchNorm), DATA, method="fast", batch_size=BATCH, min_samples=1)
    assert F.batch_norm is original
