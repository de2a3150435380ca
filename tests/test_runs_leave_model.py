"""inspect, fold, check and bench run a model many times and leave it, and what fold writes, as it was.

A BN whose forward fixes training mode (F.batch_norm(..., training=True) in eval mode, the training-mode
op in a .pt2) moves its running statistics on every call. bnfold's runs moved the caller's live module
(inspect with data, fold's verification), and fold wrote a kept layer's statistics as its verification
had moved them: a pickled model folded with --input-shape came back with running_mean 0.0225 where the
input held 0. torch's BN kernels write running statistics without bumping the tensor's version, so
`buffers_kept` compares values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization import MinMaxObserver

import bnfold
from bnfold.pytorch.state import buffers_kept
from tests.test_fixed_training_mode import NORMS, SHAPE, Net

DATA = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32) * 2 + 1


class CountsCalls(nn.Module):
    """Counts its forwards in a buffer, as some research code does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.bn(self.conv(x))


def _net(norm: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return Net(norm).eval()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


def _assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert [key for key in before if not torch.equal(after[key], before[key])] == []


def _saved(tmp_path, module: nn.Module, how: str):
    """`module` written as `how`, and the path."""
    example = (torch.randn(2, 3, 8, 8),)
    if how == "export":
        path = tmp_path / "model.pt2"
        torch.export.save(torch.export.export(module, example), path)
    elif how in ("script", "trace"):
        path = tmp_path / "model.ts"
        scripted = torch.jit.script(module) if how == "script" else torch.jit.trace(module, example)
        torch.jit.save(scripted, str(path))
    else:
        path = tmp_path / "model.pt"
        torch.save(module, path)
    return path


def _loaded_state(path, how: str) -> dict[str, torch.Tensor]:
    if how == "export":
        return dict(torch.export.load(path).state_dict)
    if how in ("script", "trace"):
        return torch.jit.load(str(path)).state_dict()
    return torch.load(path, weights_only=False).state_dict()


@pytest.mark.parametrize("norm", NORMS, ids=lambda norm: norm.__name__)
def test_a_live_module_comes_back_unchanged(norm):
    """Before: inspect, fold and check each moved bn1's running statistics; bench's timing loop moved them
    on every one of its calls."""
    model = _net(norm)
    before = _state(model)
    bnfold.inspect(model, DATA, fail_on=None)
    bnfold.fold(model, input_shape=SHAPE)
    bnfold.fold(model, data=DATA)
    bnfold.check(model, DATA)
    bnfold.bench(model, input_shape=SHAPE, runs=2, warmup=1)
    _assert_same_state(model, before)


@pytest.mark.parametrize("how", ["pickle", "export", "trace"])
@pytest.mark.parametrize("norm", NORMS, ids=lambda norm: norm.__name__)
def test_fold_writes_the_kept_layer_statistics_the_input_held(tmp_path, norm, how):
    """The kept bn1 (fixed in training mode) must reach the output with the statistics it came with,
    whichever runs fold made: capture's shape propagation, verification, TorchScript's trace back."""
    path = _saved(tmp_path, _net(norm), how)
    given = _loaded_state(path, how)
    output = tmp_path / f"folded{path.suffix}"
    report = bnfold.fold(path, output, input_shape=SHAPE, allow_pickle=True)
    assert report.passed
    folded = _loaded_state(output, how)
    kept = [key for key in given if key.endswith(("bn1.running_mean", "bn1.running_var"))]
    assert len(kept) == 2
    for key in kept:
        torch.testing.assert_close(folded[key], given[key], rtol=0, atol=0)


class Observed(nn.Module):
    """A plain observer after the BN (post-training quantization calibration left in the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.observer = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), MinMaxObserver()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.observer(self.bn(self.conv(x)))


def test_a_pt2_with_a_plain_observer_keeps_what_it_observed(tmp_path):
    """The exported observer writes its min/max on every run; the folded program holds the input's."""
    path = _saved(tmp_path, Observed().eval(), "export")
    report = bnfold.fold(path, tmp_path / "folded.pt2", data=DATA)
    assert report.passed and [d.layer for d in report.folded] == ["bn"]
    given, folded = _loaded_state(path, "export"), _loaded_state(tmp_path / "folded.pt2", "export")
    for key in ("observer.min_val", "observer.max_val"):
        assert torch.equal(folded[key], given[key]) and given[key].isinf()


def test_a_module_counting_its_calls_counts_none_of_bnfolds():
    model = CountsCalls().eval()
    bnfold.inspect(model, DATA, fail_on=None)
    bnfold.fold(model, data=DATA)
    assert int(model.calls) == 0


def test_buffers_kept_puts_back_written_resized_and_replaced_buffers():
    module = nn.Module()
    for name, value in {"written": torch.zeros(3), "resized": torch.ones(2), "replaced": torch.full((2,), 5.0),
                        "count": torch.tensor(7), "untouched": torch.tensor([float("nan"), 1.0])}.items():
        module.register_buffer(name, value)
    originals = dict(module.named_buffers())
    with buffers_kept(module) as changed:
        module.written.add_(1)
        module.resized.resize_(5).fill_(3)
        module.replaced = torch.zeros(2)
        module.count += 1
    assert sorted(changed) == ["count", "replaced", "resized", "written"]  # NaN equals NaN: no change
    assert all(getattr(module, name) is tensor for name, tensor in originals.items())
    assert module.written.tolist() == [0, 0, 0] and module.resized.tolist() == [1, 1]
    assert module.replaced.tolist() == [5, 5] and int(module.count) == 7


def test_buffers_kept_finds_torch_bn_writes_that_keep_the_tensor_version():
    bn = nn.BatchNorm1d(3).train()
    with buffers_kept(bn) as changed:
        bn(torch.randn(4, 3) + 2)
    assert sorted(changed) == ["num_batches_tracked", "running_mean", "running_var"]
    assert bn.running_mean.tolist() == [0, 0, 0] and int(bn.num_batches_tracked) == 0
