"""Quantization-aware training (torch.ao.quantization) under bnfold's forward passes.

A FakeQuantize keeps observing in eval mode: each forward moves its scale, zero point and its observer's
min/max before quantizing with them, and a plain observer records every input it sees. Recalibration,
drift measurement and fold verification must see what the model computes with the quantization it holds,
and must leave that quantization as it was.

The quantizers are found in each form a model takes: eager modules by their class; TorchScript submodules
(which are all RecursiveScriptModules) by the class their TorchScript type is named after; and in the
GraphModule of a torch.export program, which has no quantizer modules, by the fused observe-and-quantize
op (what the default QAT qconfig's FusedMovingAvgObsFakeQuantize exports to) and the tensors it reads.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn
from torch.ao.quantization import FakeQuantizeBase, ObserverBase

from bnfold.errors import InputError
from bnfold.pytorch.ops import fetch_attr

_QUANTIZERS = (FakeQuantizeBase, ObserverBase)
_MANGLED = re.compile(r"___torch_mangle_\d+\.")
_FUSED = torch.ops.aten.fused_moving_avg_obs_fake_quant.default
# the aten op in an exported program; torch's function of that name in a symbolic trace
_FUSED_TARGETS = (_FUSED, torch.fused_moving_avg_obs_fake_quant)


@contextmanager
def observers_frozen(module: nn.Module) -> Iterator[None]:
    """For the duration, fake quantization uses the scale and zero point `module` holds and no observer
    learns; afterwards the state of every quantizer (observer_enabled and fake_quant_enabled flags
    included) is what it was before. A TorchScript quantizer that observes whatever its flag says (a
    traced FakeQuantize) is refused with an InputError before anything runs."""
    flags, state = _quantizer_tensors(module)
    saved = [(tensor, tensor.clone()) for tensor in {id(t): t for t in [*flags, *state]}.values()]
    for flag in flags:
        flag.zero_()
    try:
        yield
    finally:
        for tensor, value in saved:  # a per-channel observer resizes its min/max in place on its first input
            tensor.resize_(value.shape).copy_(value)


def _quantizer_tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The observer_enabled flags to switch off, and every tensor of quantizer state to put back."""
    flags: list[torch.Tensor] = []
    state: list[torch.Tensor] = []
    for name, child in module.named_modules():
        if isinstance(child, fx.GraphModule):
            _graph_quantizer_tensors(child, flags, state)
        elif isinstance(child, _QUANTIZERS) or _scripted_quantizer(child):
            buffers = dict(child.named_buffers(recurse=False))
            state += buffers.values()
            if "observer_enabled" in buffers:
                if isinstance(child, torch.jit.ScriptModule):
                    _check_obeys_flag(name, child)
                flags.append(buffers["observer_enabled"])
    return flags, state


def _scripted_quantizer(module: nn.Module) -> bool:
    """Whether a TorchScript submodule was scripted or traced from a FakeQuantize or observer class (one
    bnfold can see: torch's own, or the user's where its module is imported; nothing is imported here)."""
    if not isinstance(module, torch.jit.RecursiveScriptModule):
        return False
    name = _MANGLED.sub("", module._c._type().qualified_name()).removeprefix("__torch__.")
    owner, _, class_name = name.rpartition(".")
    cls = getattr(sys.modules.get(owner), class_name, None)
    return isinstance(cls, type) and issubclass(cls, _QUANTIZERS)


def _check_obeys_flag(name: str, quantizer: torch.jit.ScriptModule) -> None:
    """torch.jit.trace keeps only the branch its example took: a FakeQuantize traced while observing calls
    its observer on every call, its flag unread, and quantizes with the scale that call's batch gives (one
    traced with its observer off never observes, and is run as it is)."""
    graph = quantizer.forward.graph
    reads_flag = any(node.s("name") == "observer_enabled" for node in graph.findAllNodes("prim::GetAttr"))
    observes = bool(graph.findAllNodes("prim::CallMethod") or graph.findAllNodes("aten::copy_"))
    if observes and not reads_flag:
        raise InputError(f"the fake quantizer {name} of this TorchScript model observes on every call whatever "
                         "its observer_enabled flag says (torch.jit.trace kept its observing branch), so any "
                         "forward pass would move its scale and zero point",
                         "trace the model with its observers disabled "
                         "(model.apply(torch.ao.quantization.disable_observer)), or use torch.jit.script")


def _graph_quantizer_tensors(module: fx.GraphModule, flags: list[torch.Tensor], state: list[torch.Tensor]) -> None:
    """In a captured graph, the fused op's observer_on input and the tensors it writes (min/max, scale,
    zero point)."""
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in _FUSED_TARGETS:
            continue
        values = {**dict(zip((argument.name for argument in _FUSED._schema.arguments), node.args)), **node.kwargs}
        for argument in _FUSED._schema.arguments:
            value = values.get(argument.name)
            if not isinstance(value, fx.Node) or value.op != "get_attr":
                continue
            tensor = fetch_attr(module, str(value.target))
            if argument.name == "observer_on":
                flags.append(tensor)
            elif argument.alias_info is not None and argument.alias_info.is_write:
                state.append(tensor)


def holds_quantizers(module: nn.Module) -> bool:
    """Whether running `module` could move quantization state (a plain observer's included)."""
    flags, state = _quantizer_tensors(module)
    return bool(flags or state)


def disable_observers(module: nn.Module) -> None:
    """Switch every observer of `module` off for good: for a private copy, which nothing restores."""
    for flag in _quantizer_tensors(module)[0]:
        flag.zero_()
