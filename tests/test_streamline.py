"""The folded eager model's form: stateless leaf modules inlined, no-op round trips and unread tensors gone,
names of everything that holds tensors unchanged, and all of it surviving a save and load."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import fx, nn

from bnfold.pytorch.capture import quiet, unlift
from bnfold.pytorch.streamline import streamline
from tests.torch_builders import fold, outputs, randomized, runnable
from tests.zoo import ZOO_BY_NAME


def _module_calls(folded: nn.Module) -> list[str]:
    """Class names of the leaf modules that the folded graphs still call."""
    return [type(graph.get_submodule(str(node.target))).__name__
            for graph in folded.modules() if isinstance(graph, fx.GraphModule)
            for node in graph.graph.nodes if node.op == "call_module"]


def _ops(folded: nn.Module) -> list[str]:
    return [str(getattr(node.target, "__name__", node.target))
            for graph in folded.modules() if isinstance(graph, fx.GraphModule) for node in graph.graph.nodes]


def _reloaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_stateless_leaf_modules_become_functions_and_names_stay_module_paths():
    entry = ZOO_BY_NAME["regnety"]  # ReLU, SiLU, Sigmoid and pooling modules, nested four deep
    model = entry.factory()
    folded = runnable(fold(model, entry.input_shape).folded_model)
    assert _module_calls(folded) == []
    assert {"relu", "silu", "sigmoid", "adaptive_avg_pool2d"} <= set(_ops(folded))
    owners = {name.rpartition(".")[0] for name in folded.state_dict()}  # folded biases are new tensors
    assert owners <= {name for name, _ in model.named_modules()}
    again = _reloaded(folded)  # the pickled code is regenerated from the same graph
    assert _module_calls(again) == []
    x = entry.example(batch=2)
    assert np.array_equal(outputs(folded, x), outputs(again, x))


class DropHooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.act, self.drop, self.skip = nn.ReLU(), nn.Dropout(0.5), nn.Identity()

    def forward(self, x):
        return self.skip(self.drop(self.act(self.bn(self.conv(x)))))


def test_modules_whose_code_reads_the_mode_or_that_carry_hooks_stay_calls():
    model = randomized(DropHooked())
    seen = []
    model.act.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    folded = runnable(fold(model, (1, 3, 6, 6)).folded_model)
    assert sorted(_module_calls(folded)) == ["Dropout", "ReLU"]  # the Identity is gone
    seen.clear()
    folded(torch.randn(1, 3, 6, 6))
    assert seen == [torch.Size([1, 4, 4, 4])]
    folded.train()  # dropout still follows the mode
    assert (folded(torch.ones(1, 3, 6, 6)) == 0).any()


class TokenBN(nn.Module):
    """LeViT: BN over flattened tokens, reshaped back to the linear output's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(8, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def test_what_a_folded_bn_leaves_between_flatten_and_reshape_back_disappears():
    model, x = randomized(TokenBN()), torch.randn(2, 5, 8)
    folded = runnable(fold(model, tuple(x.shape)).folded_model)
    assert not {"flatten", "reshape_as"} & set(_ops(folded))
    assert np.allclose(outputs(model, x), outputs(folded, x), rtol=1e-5, atol=1e-6)


class RoundTrip(nn.Module):
    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.shared = shared

    def forward(self, x):
        y = x * 2
        back = y.reshape(-1, 4).flatten().view_as(y).relu_()  # in place: on `y` itself if nothing reads it
        return back + y if self.shared else back


def test_a_round_trip_stays_when_its_source_is_read_elsewhere():
    x = torch.randn(3, 4, 5)
    for shared, left in ((False, set()), (True, {"reshape", "flatten", "view_as"})):
        graph = fx.symbolic_trace(RoundTrip(shared))
        streamline(graph)
        assert {"reshape", "flatten", "view_as"} & set(_ops(graph)) == left
        assert torch.equal(graph(x), RoundTrip(shared)(x))


def test_an_exported_graph_calls_torch_bindings_and_fetches_only_what_it_reads():
    entry = ZOO_BY_NAME["mobilenetv2_timm"]  # Conv2dSame: captured with torch.export, which fetches every buffer
    model, x = entry.factory(), entry.example(batch=2)
    folded = runnable(fold(model, entry.input_shape).folded_model)
    assert not [node for node in folded.graph.nodes if node.op == "get_attr" and not node.users]
    assert not [name for name in folded.state_dict() if name.endswith("num_batches_tracked")]
    assert not [node for node in folded.graph.nodes if isinstance(node.target, torch._ops.OpOverload)]
    again = _reloaded(folded)
    assert "torch.conv2d(" in again.code
    assert np.allclose(outputs(model, x), outputs(again, x), rtol=1e-5, atol=1e-6)


def test_aten_ops_without_a_function_binding_stay_as_they_are():
    graph = fx.Graph()
    x = graph.placeholder("x")
    viewed = graph.call_function(torch.ops.aten.view.default, (x, [2, 6]))  # a Tensor method only
    graph.output(graph.call_function(torch.ops.aten.relu.default, (viewed,)))
    module = fx.GraphModule(nn.Module(), graph)
    streamline(module)
    assert [node.target for node in module.graph.nodes if node.op == "call_function"] == [
        torch.ops.aten.view.default, torch.relu]
    x = torch.randn(3, 4)
    assert torch.equal(module(x), x.view(2, 6).relu())


@pytest.mark.parametrize("name", ["vit_bn", "unet", "tcn1d"])  # attention and token ops, ConvTranspose and
def test_streamlined_export_graphs_compute_bit_for_bit_the_same(name):  # concat, circular padding
    entry = ZOO_BY_NAME[name]
    model, x = entry.factory(), entry.example(batch=2)
    with quiet():
        graph = unlift(torch.export.export(model, (x,), strict=False))
    expected = outputs(graph, x)
    streamline(graph)
    left = {node.target.__name__ for node in graph.graph.nodes if isinstance(node.target, torch._ops.OpOverload)}
    assert left <= {"view.default", "reshape_as.default"}  # Tensor methods: no function binding
    assert np.array_equal(outputs(graph, x), expected)
