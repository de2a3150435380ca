"""Models passed inside nn.DataParallel, DistributedDataParallel or torch.compile's wrapper are seen through.

bnfold captures, folds, inspects and recalibrates the model the wrapper holds exactly as it would the bare
model: the same folds, the same statistics, no fallback. Layer names stay paths in the wrapper
(`module.layer1.0.bn1`, `_orig_mod.layer1.0.bn1`), as for a pickled wrapper. The result comes back in a copy
of a DataParallel wrapper; from DistributedDataParallel and torch.compile it comes back bare, with a note
(wrapping again is collective; compiling is for the machine that runs the model).
DistributedDataParallel is built in a gloo process group of one process, destroyed after each test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnfold
from bnfold.layers import FoldStatus
from bnfold.pytorch.model import COMPILED_UNWRAPPED, DISTRIBUTED_UNWRAPPED
from tests.zoo import ZOO_BY_NAME, ZooModel

PREFIX = "module."
# the graph fold; its export fallback; F.batch_norm on buffers, found only in the graph; the module-wise fallback
FOLDED = ["resnet_basic", "mobilenetv2_timm", "shape_dynamic", "functional_bn", "data_dependent"]


def bare(name: str) -> nn.Module:
    return ZOO_BY_NAME[name].factory()


def folds(report, prefix: str = PREFIX) -> list[tuple]:
    """What each decision says, layer names and targets as paths in the bare model (held under `prefix`)."""
    return sorted((d.layer.removeprefix(prefix), d.status, tuple(t.removeprefix(prefix) for t in d.targets),
                   d.direction, d.reason is None) for d in report.plan.decisions)


def run(module: nn.Module, entry: ZooModel) -> torch.Tensor:
    with torch.no_grad():
        return module(entry.example(batch=2, seed=1))


def calibration(entry: ZooModel, samples: int = 48) -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.standard_normal((samples, *entry.input_shape[1:])) * 1.5 + 0.3).astype(np.float32)


@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of one process, as DistributedDataParallel needs one to be built."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", FOLDED)
def test_a_data_parallel_model_folds_as_the_model_it_holds(name: str) -> None:
    entry = ZOO_BY_NAME[name]
    model = bare(name)
    wrapper = nn.DataParallel(model)
    unwrapped = bnfold.fold(bare(name), input_shape=entry.shape_text())
    wrapped = bnfold.fold(wrapper, input_shape=entry.shape_text())
    assert wrapped.passed and unwrapped.passed
    assert folds(wrapped) == folds(unwrapped)
    assert {d.layer for d in wrapped.plan.decisions} == {PREFIX + name for name in entry.bn_layers}
    assert {d.layer for d in wrapped.plan.decisions if d.status is FoldStatus.FOLDED} \
        == {PREFIX + name for name in entry.foldable}
    assert wrapped.notes == unwrapped.notes  # no fallback that the bare model does not take too
    folded = wrapped.folded_model.module
    assert type(folded) is nn.DataParallel and folded.device_ids == wrapper.device_ids
    assert wrapper.module is model and folded.module is not model  # the caller's wrapper still holds its model
    torch.testing.assert_close(run(folded, entry), run(unwrapped.folded_model.module, entry), rtol=0, atol=0)
    torch.testing.assert_close(run(folded, entry), run(wrapper, entry), rtol=1e-4, atol=1e-4)


def test_the_returned_wrapper_keeps_the_callers_hooks() -> None:
    entry = ZOO_BY_NAME["resnet_basic"]
    wrapper = nn.DataParallel(bare("resnet_basic"))
    wrapper.register_forward_hook(lambda module, args, output: output * 2)
    report = bnfold.fold(wrapper, input_shape=entry.shape_text())
    torch.testing.assert_close(run(report.folded_model.module, entry), run(wrapper, entry), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(report.folded_model.module, entry), 2 * run(wrapper.module, entry),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet_basic", "functional_bn"])
def test_inspect_lists_the_layers_of_the_held_model_by_their_names_in_the_wrapper(name: str) -> None:
    entry = ZOO_BY_NAME[name]
    unwrapped = bnfold.inspect(bare(name), input_shape=entry.shape_text())
    wrapped = bnfold.inspect(nn.DataParallel(bare(name)), input_shape=entry.shape_text())
    assert [layer.name for layer in wrapped.layers] == [PREFIX + layer.name for layer in unwrapped.layers]
    assert {n: d.status for n, d in wrapped.folds.items()} == {PREFIX + n: d.status for n, d in unwrapped.folds.items()}
    assert wrapped.notes == unwrapped.notes and wrapped.fold_error is None


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_recalibrating_a_data_parallel_model_gives_the_bare_models_statistics(method: str) -> None:
    entry = ZOO_BY_NAME["resnet_basic"]
    data = calibration(entry)
    unwrapped = bnfold.recalibrate(bare("resnet_basic"), data, method=method, batch_size=16)
    wrapper = nn.DataParallel(bare("resnet_basic"))
    wrapped = bnfold.recalibrate(wrapper, data, method=method, batch_size=16)
    assert [layer.name for layer in wrapped.layers] == [PREFIX + layer.name for layer in unwrapped.layers]
    for ours, theirs in zip(wrapped.layers, unwrapped.layers, strict=True):
        np.testing.assert_allclose(ours.new_mean, theirs.new_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ours.new_var, theirs.new_var, rtol=1e-6, atol=1e-7)
    assert wrapped.notes == unwrapped.notes
    result = wrapped.result.module
    assert type(result) is nn.DataParallel and result.module is not wrapper.module
    assert result.module.bn1.running_mean.tolist() != wrapper.module.bn1.running_mean.tolist()  # caller's untouched
    torch.testing.assert_close(result.module.state_dict(), unwrapped.result.module.state_dict(), rtol=1e-6, atol=1e-7)


def test_a_distributed_data_parallel_model_folds_and_comes_back_bare(process_group) -> None:
    entry = ZOO_BY_NAME["mobilenetv2_timm"]
    wrapper = nn.parallel.DistributedDataParallel(bare("mobilenetv2_timm"))
    unwrapped = bnfold.fold(bare("mobilenetv2_timm"), input_shape=entry.shape_text())
    wrapped = bnfold.fold(wrapper, input_shape=entry.shape_text())
    assert wrapped.passed and folds(wrapped) == folds(unwrapped)
    assert wrapped.notes == [*unwrapped.notes, DISTRIBUTED_UNWRAPPED]
    folded = wrapped.folded_model.module
    assert not isinstance(folded, nn.parallel.DistributedDataParallel)
    torch.testing.assert_close(run(folded, entry), run(unwrapped.folded_model.module, entry), rtol=0, atol=0)
    inspected = bnfold.inspect(wrapper, input_shape=entry.shape_text())
    assert [layer.name for layer in inspected.layers] == [PREFIX + d.layer for d in unwrapped.plan.decisions]
    assert inspected.fold_error is None


def test_recalibrating_a_distributed_data_parallel_model_gives_the_bare_models_statistics(process_group) -> None:
    entry = ZOO_BY_NAME["resnet_basic"]
    data = calibration(entry)
    unwrapped = bnfold.recalibrate(bare("resnet_basic"), data, batch_size=16, distributed=False)
    wrapped = bnfold.recalibrate(nn.parallel.DistributedDataParallel(bare("resnet_basic")), data, batch_size=16,
                                 distributed=False)
    assert wrapped.notes == [*unwrapped.notes, DISTRIBUTED_UNWRAPPED]
    assert not isinstance(wrapped.result.module, nn.parallel.DistributedDataParallel)
    assert [layer.name for layer in wrapped.layers] == [PREFIX + layer.name for layer in unwrapped.layers]
    for ours, theirs in zip(wrapped.layers, unwrapped.layers, strict=True):
        np.testing.assert_allclose(ours.new_mean, theirs.new_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ours.new_var, theirs.new_var, rtol=1e-6, atol=1e-7)


def test_a_pickled_data_parallel_file_folds_whole(tmp_path) -> None:
    entry = ZOO_BY_NAME["resnet_basic"]
    source = tmp_path / "wrapped.pt"
    torch.save(nn.DataParallel(bare("resnet_basic")), source)
    report = bnfold.fold(source, tmp_path / "folded.pt", allow_pickle=True, input_shape=entry.shape_text())
    assert report.passed and report.notes == []
    assert {d.layer for d in report.plan.decisions if d.status is FoldStatus.FOLDED} \
        == {PREFIX + name for name in entry.foldable}
    assert type(torch.load(tmp_path / "folded.pt", weights_only=False)) is nn.DataParallel


# --------------------------------------------------------------------------------------------------------
# torch.compile's wrapper (OptimizedModule) holds the model as `_orig_mod`; the result comes back bare
# --------------------------------------------------------------------------------------------------------

COMPILED = "_orig_mod."


@pytest.mark.parametrize("name", ["resnet_basic", "functional_bn", "data_dependent"])
def test_a_compiled_model_folds_as_the_model_it_compiled(name: str) -> None:
    """It fell back to folding module by module (torch.export cannot capture the compiled frame), and
    recalibration ran its hooks through Dynamo."""
    entry = ZOO_BY_NAME[name]
    model = bare(name)
    compiled = torch.compile(model)
    unwrapped = bnfold.fold(bare(name), input_shape=entry.shape_text())
    wrapped = bnfold.fold(compiled, input_shape=entry.shape_text())
    assert wrapped.passed and folds(wrapped, COMPILED) == folds(unwrapped)
    assert wrapped.notes == [*unwrapped.notes, COMPILED_UNWRAPPED]
    folded = wrapped.folded_model.module
    assert not isinstance(folded, type(compiled)) and compiled._orig_mod is model
    torch.testing.assert_close(run(folded, entry), run(unwrapped.folded_model.module, entry), rtol=0, atol=0)
    inspected = bnfold.inspect(compiled, input_shape=entry.shape_text())
    assert [layer.name for layer in inspected.layers] == [COMPILED + d.layer for d in unwrapped.plan.decisions]
    assert inspected.fold_error is None


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_recalibrating_a_compiled_model_gives_the_bare_models_statistics(method: str, recwarn) -> None:
    entry = ZOO_BY_NAME["resnet_basic"]
    data = calibration(entry)
    unwrapped = bnfold.recalibrate(bare("resnet_basic"), data, method=method, batch_size=16)
    compiled = torch.compile(nn.DataParallel(bare("resnet_basic")))
    wrapped = bnfold.recalibrate(compiled, data, method=method, batch_size=16)
    assert not [warning for warning in recwarn if "dynamo" in str(warning.filename).lower()]
    assert wrapped.notes == [*unwrapped.notes, COMPILED_UNWRAPPED]
    assert [layer.name for layer in wrapped.layers] == [COMPILED + PREFIX + layer.name for layer in unwrapped.layers]
    for ours, theirs in zip(wrapped.layers, unwrapped.layers, strict=True):
        np.testing.assert_allclose(ours.new_mean, theirs.new_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ours.new_var, theirs.new_var, rtol=1e-6, atol=1e-7)
    result = wrapped.result.module  # the compiled DataParallel model comes back as a DataParallel model
    assert type(result) is nn.DataParallel and result.module is not compiled._orig_mod.module
    torch.testing.assert_close(result.module.state_dict(), unwrapped.result.module.state_dict(), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------
# The module-wise fallback's output is a private_copy (a scripted part's parameters stay leaves)
# --------------------------------------------------------------------------------------------------------


class BranchingWithScriptedHead(nn.Module):
    """Branches on a tensor value (the module-wise fallback), with a scripted conv after the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.head = torch.jit.script(nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if y.sum() > 0:
            y = y * 2
        return self.head(y)


def test_module_wise_fold_returns_leaf_parameters_that_an_optimizer_takes() -> None:
    """copy.deepcopy of a ScriptModule clones its parameters with autograd on: non-leaves, which torch.optim
    refuses; the fallback's output is made with private_copy, which keeps them leaves."""
    report = bnfold.fold(BranchingWithScriptedHead().eval(), input_shape="2,3,10,10")
    assert report.passed and "module by module" in report.notes[0]
    parameters = list(report.folded_model.module.parameters())
    assert parameters and all(p.is_leaf and p.requires_grad for p in parameters)
    torch.optim.SGD(parameters, lr=0.1)
