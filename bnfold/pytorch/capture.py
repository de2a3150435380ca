"""Capture a torch model as an fx graph, on a private copy, down to the calls that BN folding rewrites.

Eager modules are traced symbolically at the *functional* level: BN, conv and linear modules (and their
subclasses and look-alikes) are traced through, so the graph holds `F.batch_norm`, `torch.conv2d`,
`F.linear`, ... on `get_attr` tensors, and whatever else a subclass does (an activation after the
normalization, a custom padding) stays in the graph as its own op. When symbolic tracing fails
(data-dependent control flow), torch.export captures the model at aten level instead. ExportedPrograms
and TorchScript (converted with torch.export) are aten-level already. `bnfold.pytorch.ops` reads both.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import io
import logging
import operator
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnfold.errors import first_line
from bnfold.pytorch.discover import (bn_kind, first_names, frozen_constant_targets, owner_at, resolve_path,
                                     tensor_key)
from bnfold.pytorch.quantization import observers_frozen
from bnfold.pytorch.state import buffers_kept

SYMBOLIC = "symbolic tracing"
EXPORT = "torch.export"
PROGRAM = "ExportedProgram"
TORCHSCRIPT = "TorchScript converted with torch.export"
MODULEWISE = "module by module"


class CaptureFailed(Exception):
    """No graph could be captured; the message says why in user terms."""


@dataclass
class Capture:
    """A graph of a private copy of the model (or, module by module, a copy made of graphs), plus how."""

    module: nn.Module
    method: str
    example: tuple[torch.Tensor, ...] | None  # the inputs shapes were propagated with, if any
    note: str | None = None  # why a fallback method was used


class FunctionalTracer(fx.Tracer):
    """Traces through BN/conv/linear modules so folds see (and keep) exactly what each one computes."""

    def __init__(self, proxy_buffers: bool) -> None:
        super().__init__()
        # Buffers as get_attr nodes keep a look-alike's x * scale + shift arithmetic visible in the graph.
        self.proxy_buffer_attributes = proxy_buffers

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (_ConvNd, nn.Linear)):
            return False
        if bn_kind(module) is not None:
            # A BN in training mode stays one opaque call: it has no fixed affine map to fold.
            return isinstance(module, _BatchNorm) and module.training
        return super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        if not isinstance(module, _BatchNorm):
            return super().call_module(module, forward, args, kwargs)
        # BN modules check the input's rank with Python control flow, which a proxy cannot answer.
        module._check_input_dim = _no_check
        module._check_non_zero_input_channels = _no_check
        try:
            return super().call_module(module, forward, args, kwargs)
        finally:
            del module._check_input_dim, module._check_non_zero_input_channels


def _no_check(_input) -> None:
    return None


def private_copy(module: nn.Module, share_tensors: bool = False) -> nn.Module:
    """A copy to trace and fold, which change the modules they work on. With `share_tensors` (models
    bnfold loaded itself) it keeps the original's parameters and buffers: nothing writes into a tensor,
    and a copy of every weight per capture was most of the PyTorch eager formats' peak memory.

    It is `copy.deepcopy`'s copy, made faster (5.4 to 1.8 ms on the zoo's 39-module ResNet, whose fast
    recalibration over 1,024 samples takes about 120 ms): plain tensors are cloned directly rather than through
    `Tensor.__deepcopy__`, and modules that copy by their state are copied attribute by attribute, with
    their empty bookkeeping dicts made afresh; everything else goes through deepcopy, one memo for all."""
    if share_tensors:
        memo: dict[int, Any] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    else:
        memo = _plain_tensor_copies(module) if _copied_by_state(type(module)) else {}
    memo.update(_computed_tensors(module))
    with torch.no_grad():  # a ScriptModule's deepcopy clones its parameters with autograd on: no leaves
        copied = _module_copy(module, memo)
    _keep_requires_grad(module, copied)
    return copied


def _keep_requires_grad(original: nn.Module, copied: nn.Module) -> None:
    """Give the copy's parameters the original's requires_grad, which cloning without autograd drops.
    With autograd, a scripted model's copy (the model `recalibrate` returns) held non-leaf parameters:
    torch.optim refuses them, and `Module.to` warned when it read their .grad."""
    originals = dict(original.named_parameters())
    for name, parameter in copied.named_parameters():
        if name in originals:
            parameter.requires_grad_(originals[name].requires_grad)


def holding(wrapper: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of `wrapper` (its settings and hooks, as deepcopy copies them) that holds `model`, not a
    copy of it, in place of its child `module`."""
    return _module_copy(wrapper, {id(wrapper.module): model})


_ATOMIC = (bool, int, float, str, type(None))


def _copied_by_state(cls: type) -> bool:
    """Whether deepcopy copies instances of `cls` by `__getstate__` and `__setstate__` alone."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls not in copyreg.dispatch_table)


def _module_copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """`copy.deepcopy(module, memo)`, as deepcopy makes it, for a module copied by its state dict."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    state = module.__getstate__() if _copied_by_state(cls) else None
    if type(state) is not dict:
        return copy.deepcopy(module, memo)
    copied = cls.__new__(cls)
    memo[id(module)] = copied
    fresh: dict[str, Any] = {}
    for name, value in state.items():
        kind = type(value)
        if name == "_modules" and kind is dict:
            fresh[name] = {key: child if child is None else _module_copy(child, memo) for key, child in value.items()}
        elif kind in _ATOMIC:
            fresh[name] = value
        elif kind in (dict, OrderedDict, set) and not value:  # hooks and buffer sets, mostly empty
            fresh[name] = kind()
        else:
            fresh[name] = copy.deepcopy(value, memo)
    copied.__setstate__(fresh)
    return copied


def _plain_tensor_copies(module: nn.Module) -> dict[int, torch.Tensor]:
    """Clones of the module's parameters and buffers that deepcopy would copy to the same effect, by the
    original's id: plain dense leaves without a gradient or attributes of their own, each alone on its
    storage (deepcopy keeps storages shared; these do not share one)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}.values()
    storages = Counter(t.untyped_storage().data_ptr() for t in tensors if t.layout == torch.strided)
    copies: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        if (type(tensor) in (torch.Tensor, nn.Parameter) and tensor.layout == torch.strided and tensor.is_leaf
                and tensor.grad is None and not vars(tensor) and not tensor.is_quantized and not tensor.is_conj()
                and not tensor.is_neg() and tensor.device.type != "meta"
                and storages[tensor.untyped_storage().data_ptr()] == 1
                and (type(tensor) is nn.Parameter or not tensor.requires_grad)):
            clone = tensor.detach().clone()
            copies[id(tensor)] = nn.Parameter(clone, tensor.requires_grad) if type(tensor) is nn.Parameter else clone
    return copies


def _computed_tensors(module: nn.Module) -> dict[int, torch.Tensor]:
    """Detached copies of the non-leaf tensors that modules hold as plain attributes, by the original's id:
    `torch.nn.utils.weight_norm`'s `weight`, outputs a feature hook kept. deepcopy refuses such a tensor
    (torch cannot copy its autograd history), and the hooks that computed them compute them again."""
    copies: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    pending = [value for child in module.modules() for value in vars(child).values()]
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if not value.is_leaf:
                copies[id(value)] = value.detach().clone()
        elif isinstance(value, (list, tuple, set, frozenset)):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
    return copies


def trace_functional(module: nn.Module, share_tensors: bool = False) -> fx.GraphModule:
    """A functional-level GraphModule of a `private_copy` of `module`; raises when tracing fails."""
    private = private_copy(module, share_tensors)
    error: Exception | None = None
    for proxy_buffers in (True, False):  # some models branch on buffer values: retry with plain buffers
        try:
            tracer = FunctionalTracer(proxy_buffers)
            graph = tracer.trace(private)
            _no_assigned_proxies(private)
        except Exception as failure:  # user code raises anything while tracing
            error = error or failure
            continue
        return _graph_module(tracer.root, _portable(graph), type(module).__name__)
    assert error is not None
    raise error


def _no_assigned_proxies(traced: nn.Module) -> None:
    """Raise where the trace stored a value into a module (`self.calls += 1`): the graph does not record
    the write, and the module holds a Proxy where its buffer was."""
    for path, module in traced.named_modules():
        for name, value in (*vars(module).items(), *module._buffers.items(), *module._parameters.items()):
            if isinstance(value, fx.Proxy):
                raise TypeError(f"the forward assigns {f'{path}.{name}'.lstrip('.')}, which symbolic tracing "
                                "cannot record")


RENAMED = "bnfold_renamed"  # GraphModule.meta key: {name in the graph: the model's name} (see `_graph_module`)


def _graph_module(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """`fx.GraphModule(root, graph)`, with each attribute of `root` that the graph reads and whose name the
    GraphModule uses itself (`code`, `graph`, `meta`, ...) renamed (`code_`): the generated code reaches it
    as `self.code`, which would find the GraphModule's own attribute, and building the module would fail
    or clash. The graph's targets and module paths follow; `meta[RENAMED]` maps the names back."""
    read = {str(node.target).partition(".")[0] for node in graph.nodes if node.op in ("get_attr", "call_module")}
    renamed = _renames(read, _top_level_names(root))
    for name, new in renamed.items():  # root is the private copy being traced: give it the new names too
        table = next(t for t in (root._modules, root._parameters, root._buffers, vars(root)) if name in t)
        table[new] = table[name]
    for node in graph.nodes if renamed else ():
        if node.op in ("get_attr", "call_module"):
            node.target = _renamed_path(str(node.target), renamed)
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {key: (_renamed_path(path, renamed), cls)
                                            for key, (path, cls) in stack.items()}
    module = fx.GraphModule(root, graph, class_name)
    if renamed:
        module.meta[RENAMED] = {new: name for name, new in renamed.items()}
    return module


def _renames(names: set[str], taken: set[str]) -> dict[str, str]:
    """A name not `taken` (`code_`) for each of `names` that a GraphModule uses itself."""
    taken = names | taken | _graph_module_attributes()
    renamed = {}
    for name in sorted(names & _graph_module_attributes()):
        new = f"{name}_"
        while new in taken:
            new += "_"
        taken.add(new)
        renamed[name] = new
    return renamed


def _top_level_names(module: nn.Module) -> set[str]:
    return {*module._modules, *module._parameters, *module._buffers, *vars(module)}


def model_path(module: fx.GraphModule, path: str) -> str:
    """The model's own name for a module path in a graph `_graph_module` made (`code_.0` -> `code.0`)."""
    return _renamed_path(path, module.meta.get(RENAMED, {}))


def _renamed_path(path: str, renamed: dict[str, str]) -> str:
    first, dot, rest = path.partition(".")
    return renamed.get(first, first) + dot + rest


@functools.cache
def _graph_module_attributes() -> frozenset[str]:
    """Every name a GraphModule answers itself, before its children, parameters and buffers."""
    graph = fx.Graph()
    graph.output(graph.placeholder("x"))
    module = fx.GraphModule(nn.Module(), graph)
    return frozenset(dir(type(module))) | frozenset(module.__dict__)


def capture_module(module: nn.Module, example: tuple[torch.Tensor, ...] | None,
                   share_tensors: bool = False) -> Capture:
    """Symbolic tracing, with torch.export as the fallback when an example input is available."""
    try:
        traced = trace_functional(module, share_tensors)
    except Exception as error:
        if example is None:
            raise CaptureFailed(f"symbolic tracing failed ({first_line(error, 200)}) and capturing with torch.export "
                                "needs an example input (--input-shape)") from None
        program = _export(module, example, share_tensors)
        return Capture(unlift(program), EXPORT, example,
                       note=f"symbolic tracing failed ({first_line(error, 200)}); captured with torch.export instead")
    if example is not None:
        try:
            # shapes do not depend on the mode; BN statistics (also of a BN fixed in training mode) and a QAT
            # model's quantization must not move (with tensors shared, the fold's output holds them)
            with _eval_mode(traced), observers_frozen(traced), buffers_kept(traced):
                ShapeProp(traced).propagate(*example)
        except Exception as error:  # the trace specialised on something: trust export instead
            program = _export(module, example, share_tensors)
            return Capture(unlift(program), EXPORT, example,
                           note=f"the symbolic trace does not run ({first_line(error, 200)}); captured with torch.export")
    return Capture(traced, SYMBOLIC, example)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def quiet() -> Iterator[None]:
    """torch.export and the TorchScript converter warn and log at length; bnfold reports outcomes itself."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.fx.experimental.symbolic_shapes",
                                                    "torch._export", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:  # export also prints a failed trace's partial graph straight to stderr
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], share_tensors: bool) -> torch.export.ExportedProgram:
    auto = torch.export.Dim.AUTO
    dynamic = tuple({0: auto} if t.dim() else {} for t in example)
    try:
        with quiet():
            return torch.export.export(private_copy(module, share_tensors), example, dynamic_shapes=dynamic, strict=False)
    except Exception as error:
        raise CaptureFailed(f"neither symbolic tracing nor torch.export can capture the model "
                            f"({first_line(error, 200)})") from None


def capture_program(program: torch.export.ExportedProgram) -> Capture:
    """The aten graph of an ExportedProgram as a module whose tensors are attributes, each read under its
    first name (`first_names`), as discovery names the layers."""
    module = unlift(program)
    first = first_names(program)
    renamed = [node for node in module.graph.nodes
               if node.op == "get_attr" and first.get(str(node.target), str(node.target)) != str(node.target)]
    for node in renamed:
        node.target = first[str(node.target)]
    if renamed:
        module.recompile()
    return Capture(module, PROGRAM, None)


def capture_script(module: torch.jit.ScriptModule, example: tuple[torch.Tensor, ...] | None) -> Capture:
    """TorchScript has no fx graph: convert it with torch.export's TorchScript converter."""
    if example is None:
        raise CaptureFailed("analysing TorchScript converts it with torch.export, which needs an example "
                            "input (--input-shape)")
    example = _batch_widened(module, example)
    try:
        program = _convert(module, example)
    except Exception as error:
        raise CaptureFailed(_conversion_failure(module, example, error)) from None
    return Capture(_frozen_names(unlift(program), module), TORCHSCRIPT, example)


def _batch_widened(module: torch.jit.ScriptModule, example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`example` with a batch of one doubled (`widened`), where the model runs on that: a model converted at
    `--input-shape 1,...` came back made for batch 1 alone (with a note saying so) although it runs at any
    batch. A model that runs at batch 1 only keeps its example."""
    if not example or any(tensor.dim() == 0 or tensor.shape[0] != 1 for tensor in example):
        return example
    doubled = widened(example, [{0}] * len(example))
    try:
        with torch.no_grad(), quiet(), buffers_kept(module):
            module(*doubled)
    except Exception:  # a trace at batch 1 may hold the batch as a constant (`view(1, -1)`)
        return example
    return doubled


def widened(example: tuple[torch.Tensor, ...], dynamic) -> tuple[torch.Tensor, ...]:
    """The example with every axis of `dynamic` (per input, a collection of axes or None) at least 2 long:
    export specializes a size-1 axis to a constant and then rejects its own dynamic-dimension request
    (e.g. `fold --input-shape 1,...` of a .pt2)."""
    result = []
    for tensor, axes in zip(example, dynamic):
        for axis in axes or {}:
            if tensor.shape[axis] < 2:
                tensor = torch.cat([tensor, tensor], dim=axis)
        result.append(tensor)
    return tuple(result)


def _convert(module: torch.jit.ScriptModule, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """The converter's program, with each 0-dim constant it lifted cloned: a traced model's Python numbers
    (the 2 of `h - 2`) come as "wrapped number" tensors, which a ScriptModule traced back from the graph
    stores as a Python int (fold failed: "'int' object has no attribute 'detach'"); a clone is a plain tensor.
    The converter's graph is made to keep sizes symbolic before torch.export retraces it
    (`_symbolic_size_arithmetic`)."""
    from torch._export.converter import TS2EPConverter

    converter = TS2EPConverter(_members_over_properties(module), example)
    retrace = converter.retrace_as_exported_program
    converter.retrace_as_exported_program = lambda graph_module, constants: retrace(
        _symbolic_size_arithmetic(graph_module), constants)
    with quiet():
        program = converter.convert()
    for name, constant in program.constants.items():
        if isinstance(constant, torch.Tensor) and constant.dim() == 0:
            program.constants[name] = constant.clone()
    return program


# A scripted model's integer arithmetic on sizes (`h * w`, `c // 2`): the converter writes it as these aten
# ops on ints, which torch.export runs on the example's sizes; Python's operators keep the sizes symbolic.
# Ops with a float or bool (`int(h * 0.5)`, `if h % 2`) are left to specialize: the converter cannot keep
# a symbolic float's int() or a branch on a size.
_SIZE_OPERATORS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv,
                   "remainder": operator.mod, "neg": operator.neg}


def _symbolic_size_arithmetic(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The converter's graph (and its branches' graphs) with its integer arithmetic, its slices of size
    lists and its `aten.__interpolate` as the Python operators and function, which take symbolic sizes,
    and a traced model's sizes computed as ints (`_size_tensors_as_ints`).

    torch.export retraces the converter's graph with every input axis dynamic; an aten op on ints
    (`aten.mul.int`) specializes the sizes it is given, so a scripted `x.view(b, c, h * w)` folded at 8x8
    reshaped to 64 at every size (and failed, or computed otherwise, at another height or width)."""
    for module in graph_module.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        _size_tensors_as_ints(module)
        for node in module.graph.nodes:
            if node.op != "call_function" or node.kwargs:
                continue
            if node.target is torch.ops.aten.slice.t:  # `x.shape[-2:]`: the op refuses export's list of sizes
                node.target, node.args = operator.getitem, (node.args[0], slice(*_slice_bounds(*node.args[1:])))
            elif getattr(node.target, "overloadpacket", None) is torch.ops.aten.__interpolate:
                node.target = nn.functional.interpolate  # the op takes the sizes as ints, the function as SymInts
            elif (operator_ := _size_operator(node.target)) is not None:
                node.target = operator_
        module.recompile()
    return graph_module


def _rsub(size: object, other: object) -> object:
    """`aten.rsub` as Python arithmetic: a trace of `k - w` on a size (EfficientDet's static 'same' padding)."""
    return other - size


aten = torch.ops.aten
# A traced model computes on sizes as 0-dim tensors (`h - 2`, `c // 2`): the converter writes that arithmetic
# as these aten ops (on lifted 0-dim constants), whose Python operators compute it on the sizes themselves.
SIZE_ARITHMETIC = {aten.add.Tensor: operator.add, aten.add.Scalar: operator.add, aten.sub.Tensor: operator.sub,
                   aten.sub.Scalar: operator.sub, aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul,
                   aten.floor_divide.default: operator.floordiv, aten.remainder.Tensor: operator.mod,
                   aten.remainder.Scalar: operator.mod, aten.rsub.Scalar: _rsub, aten.rsub.Tensor: _rsub}


def _size_tensors_as_ints(module: fx.GraphModule) -> None:
    """Compute a traced model's sizes as ints where it reads them back as ints. A trace keeps a size it
    computes on as a 0-dim tensor (`prim::NumToTensor`) and reads it back with `aten::Int`; the converter
    writes that as scalar_tensor, aten arithmetic, a cast and `_local_scalar_dense`, whose value torch.export
    cannot relate to the input's sizes: it makes up a new symbol, and a graph that compares it (a ceil_mode
    pooling after TResNet's `H // 4`, a conv after EfficientDet's F.pad of sizes) failed with "Could not
    guard on data-dependent expression". Each such chain is written as the Python operators on the sizes,
    which export keeps as expressions of the input's sizes; a size tensor that a tensor op reads stays."""
    graph = module.graph
    ints: dict[fx.Node, object] = {}  # a size tensor: the node (or number) computing it as an int
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        source = node.args[0]
        if node.target is aten.scalar_tensor and len(node.args) == 1 and isinstance(source, fx.Node) \
                and integral(node):
            ints[node] = source
        elif node.target is aten._to_copy.default and source in ints and integral(node):
            ints[node] = ints[source]
        elif node.target is aten._local_scalar_dense.default and source in ints:
            node.replace_all_uses_with(ints[source])  # type: ignore[arg-type]
            graph.erase_node(node)
        elif (operator_ := _int_operator(node)) is not None and any(arg in ints for arg in node.args):
            numbers = [ints[arg] if arg in ints else _integer(module, arg) for arg in node.args[:2]]
            if None not in numbers:
                with graph.inserting_before(node):
                    ints[node] = graph.call_function(operator_, tuple(numbers))
    for node in reversed(list(ints)):  # the size tensors that no tensor op reads
        if not node.users:
            graph.erase_node(node)


def integral(node: fx.Node) -> bool:
    """Whether a node that moves a size between int and tensor keeps it the integer it is:
    `_local_scalar_dense`, or a cast to (or a scalar_tensor of) an integer type."""
    if node.target is aten._local_scalar_dense.default:
        return True
    dtype = node.kwargs.get("dtype")
    return set(node.kwargs) == {"dtype"} and not (dtype.is_floating_point or dtype.is_complex or dtype is torch.bool)


def _int_operator(node: fx.Node) -> Any:
    """The Python operator an aten node computes on two ints, else None: `SIZE_ARITHMETIC` (adds and
    subtractions that scale by 1 only), and `torch.div(..., rounding_mode="floor")`, which traced code
    writes for `//` (older torch warned that `//` on tensors was deprecated)."""
    if node.target is aten.div.Tensor_mode or node.target is aten.div.Scalar_mode:
        return operator.floordiv if node.kwargs == {"rounding_mode": "floor"} and len(node.args) == 2 else None
    return SIZE_ARITHMETIC[node.target] if node.target in SIZE_ARITHMETIC and _unit_alpha(node) else None


def _unit_alpha(node: fx.Node) -> bool:
    """Whether an aten add, sub or rsub node scales its other operand by 1 (its `alpha`), as Python's operators do."""
    alpha = node.args[2] if len(node.args) > 2 else node.kwargs.get("alpha", 1)
    return alpha == 1 and set(node.kwargs) <= {"alpha"}


def _integer(module: fx.GraphModule, arg: object) -> int | None:
    """`arg` as a Python int: an int, or the value of a lifted 0-dim integer constant; else None."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and "." not in str(arg.target):
        arg = getattr(module, str(arg.target), None)
        if not isinstance(arg, torch.Tensor) or arg.dim() or arg.is_floating_point() or arg.is_complex():
            return None
        arg = arg.item()
    return arg if type(arg) is int else None


def _slice_bounds(start: object = None, end: object = None, step: object = 1) -> tuple[object, object, object]:
    """`aten.slice.t`'s bounds, defaults included, as `slice` takes them."""
    return start, end, step


def _size_operator(target: object) -> Any:
    """The Python operator of an aten op that computes on ints alone (`aten.mul.int`), else None."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    schema = target._schema
    if not all(argument.type.kind() == "IntType" for argument in (*schema.arguments, *schema.returns)):
        return None
    return _SIZE_OPERATORS.get(target.overloadpacket.__name__)


# A ScriptModule's own properties (`code`, `graph`, ...), which hide its members of the same names.
_SCRIPT_PROPERTIES = frozenset(name for cls in torch.jit.RecursiveScriptModule.__mro__
                               for name, value in vars(cls).items() if isinstance(value, property))


def _property_members(module: nn.Module) -> set[str]:
    """The submodules, parameters and buffers of `module` named like a ScriptModule property."""
    return _SCRIPT_PROPERTIES & {*module._modules.keys(), *module._parameters.keys(), *module._buffers.keys()}


def _members_over_properties(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """`module`, or a copy in which a member named like a ScriptModule property (a child `code`) is what
    the name reads: the converter resolves every attribute with getattr, met the property (a string, a
    Graph) and failed with "'str' object has no attribute '0'"."""
    if not any(_property_members(child) for child in module.modules()):
        return module
    copied = copy.deepcopy(module)
    for child in copied.modules():
        names = _property_members(child)
        if names:
            own = type(child)
            child.__class__ = type(own.__name__, (own,),
                                   {name: property(functools.partial(resolve_path, path=name)) for name in names})
    return copied


def _conversion_failure(module: torch.jit.ScriptModule, example: tuple[torch.Tensor, ...],
                        error: Exception) -> str:
    """Why the converter failed, in user terms. It cannot convert a BN's training branch (whose batch-size
    check is a loop): when a copy with those BN in eval mode converts, they are named as the cause. A BN
    without running statistics always takes that branch, and no mode changes that: it is named beside the
    converter's error."""
    bns = [(name, child) for name, child in module.named_modules() if bn_kind(child) is not None]
    no_statistics = [name for name, child in bns if getattr(child, "running_mean", None) is None]
    training = [name for name, child in bns if child.training and name not in no_statistics]
    if training:
        in_eval = copy.deepcopy(module)
        for name in training:
            resolve_path(in_eval, name).train(False)
        try:
            _convert(in_eval, example)
        except Exception:  # something else stops the converter as well
            pass
        else:
            return (f"torch.export cannot convert this TorchScript model because {', '.join(training)} "
                    f"{'is' if len(training) == 1 else 'are'} in training mode (the converter cannot convert "
                    "BatchNorm's batch-statistics branch); call .eval() on the model before torch.jit.script "
                    "or torch.jit.save")
    failure = f"torch.export cannot convert this TorchScript model ({first_line(error, 200)})"
    reserved = sorted(_property_members(module) & _graph_module_attributes())
    if reserved:
        one = len(reserved) == 1
        return (f"{failure}: the model's top-level {', '.join(reserved)} {'is' if one else 'are'} named like an "
                "attribute of torch.fx.GraphModule, which the converter builds; rename "
                f"{'it' if one else 'them'} (e.g. {reserved[0]}_) before torch.jit.script")
    if no_statistics:
        one = len(no_statistics) == 1
        return (f"{failure}: {', '.join(no_statistics)} {'has' if one else 'have'} no running statistics "
                f"(track_running_stats=False), so {'it always normalizes' if one else 'they always normalize'} "
                "by batch statistics, a BatchNorm branch the converter cannot convert")
    return failure


def _frozen_names(graph_module: fx.GraphModule, script: torch.jit.ScriptModule) -> fx.GraphModule:
    """The converter names a frozen module's constants `lifted_tensor_N` (or after their debug names): the
    statistics of its batch_norm calls get the names inspect reports (`frozen_constant_targets`), so fold
    names those layers alike."""
    targets = frozen_constant_targets(script)
    reserved = _renames({target.partition(".")[0] for target in targets.values()}, _top_level_names(graph_module))
    targets = {key: _renamed_path(target, reserved) for key, target in targets.items()}
    renamed: dict[str, str] = {}
    for node in graph_module.graph.nodes if targets else ():
        if node.op != "get_attr":
            continue
        old = str(node.target)
        tensor = resolve_path(graph_module, old)
        target = targets.get(tensor_key(tensor)) if isinstance(tensor, torch.Tensor) else None
        if target is None:
            continue
        if old not in renamed:
            path, _, attribute = target.rpartition(".")
            owner = owner_at(graph_module, path)
            holder, _, name = old.rpartition(".")
            holder = resolve_path(graph_module, holder) or graph_module
            if name in holder._buffers:
                owner.register_buffer(attribute, tensor)
            else:
                setattr(owner, attribute, tensor)
            delattr(holder, name)
            renamed[old] = target
        node.target = renamed[old]
    if renamed:
        graph_module.delete_all_unused_submodules()
        graph_module.recompile()
    if reserved:
        graph_module.meta[RENAMED] = {new: name for name, new in reserved.items()}
    return graph_module


def unlift(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """`program.module()` without its input guards, as a plain (picklable) GraphModule."""
    try:
        with quiet():
            module = program.module()
    except Exception as error:  # e.g. a top-level module named `code` or `graph`, which a GraphModule reserves
        raise CaptureFailed(f"the torch.export program does not unlift into a GraphModule "
                            f"({first_line(error, 200)})") from None
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    return fx.GraphModule(module, _portable(graph))


def _portable(graph: fx.Graph) -> fx.Graph:
    """A graph whose GraphModule pickles and loads with torch alone (no tracer class, no string types)."""
    graph._tracer_cls = None
    graph._tracer_extras = {}
    for node in graph.nodes:
        if isinstance(node.type, str):  # postponed annotations (`from __future__ import annotations`)
            node.type = None
    return graph
