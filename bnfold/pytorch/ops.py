"""One vocabulary for two graph dialects: functional torch calls (symbolic tracing) and aten ops (export).

Every op the fold passes care about is classified once here, with its argument names in positional
order, so the pattern code reads `arg(node, "weight")` whichever dialect captured the model. The rest
are small graph facts the passes need: constant values, shapes, and names a user recognises.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_T_PARAMS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
CONVOLUTION_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                      "groups")
ATEN_BN_PARAMS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0,
                 "transposed": False}
BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


@dataclass(frozen=True)
class OpSpec:
    """What an op is (`kind`) and the names of its positional arguments."""

    kind: str  # conv, conv_transpose, convolution, linear, batch_norm, pad, cat, reshape, flatten, mul, ...
    params: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    tuple_output: bool = False  # the op returns (out, ...) and users read item 0


def _specs() -> dict[Any, OpSpec]:
    conv = OpSpec("conv", CONV_PARAMS, CONV_DEFAULTS)
    conv_t = OpSpec("conv_transpose", CONV_T_PARAMS, CONV_DEFAULTS)
    linear = OpSpec("linear", ("input", "weight", "bias"), {"bias": None})
    aten_bn = OpSpec("batch_norm", ATEN_BN_PARAMS, BN_DEFAULTS)
    aten_bn_tuple = OpSpec("batch_norm", ATEN_BN_PARAMS, BN_DEFAULTS, tuple_output=True)
    reshape = OpSpec("reshape", ("input", "shape"))
    flatten = OpSpec("flatten", ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    pad = OpSpec("pad", ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
    cat = OpSpec("cat", ("tensors", "dim"), {"dim": 0})
    binary = {kind: OpSpec(kind, ("input", "other"), {"alpha": 1}) for kind in ("mul", "add", "sub", "div")}
    table: dict[Any, OpSpec] = {
        F.batch_norm: OpSpec("batch_norm", ("input", "running_mean", "running_var", "weight", "bias", "training",
                                            "momentum", "eps"), BN_DEFAULTS),
        torch.batch_norm: aten_bn, aten.batch_norm.default: aten_bn,
        aten._native_batch_norm_legit_no_training.default: OpSpec(
            "batch_norm", ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
            BN_DEFAULTS, tuple_output=True),
        aten._native_batch_norm_legit.default: aten_bn_tuple,
        aten.native_batch_norm.default: aten_bn_tuple,
        aten._native_batch_norm_legit_functional.default: aten_bn_tuple,
        F.linear: linear, aten.linear.default: linear,
        aten.convolution.default: OpSpec("convolution", CONVOLUTION_PARAMS, CONV_DEFAULTS),
        # a conv with string padding ("same"/"valid") as TorchScript records it, and its graph converted back
        aten._convolution_mode.default: OpSpec("conv", CONV_PARAMS, CONV_DEFAULTS),
        F.pad: pad, torch._C._nn.pad: pad, aten.pad.default: pad,
        aten.constant_pad_nd.default: OpSpec("pad", ("input", "pad", "value"), {"value": 0, "mode": "constant"}),
        torch.cat: cat, aten.cat.default: cat, torch.concat: cat, torch.concatenate: cat,
        torch.reshape: reshape, aten.reshape.default: reshape, aten.view.default: reshape,
        aten._unsafe_view.default: reshape,
        torch.flatten: flatten, aten.flatten.using_ints: flatten,
        operator.mul: binary["mul"], torch.mul: binary["mul"], aten.mul.Tensor: binary["mul"],
        aten.mul.Scalar: binary["mul"],
        operator.add: binary["add"], torch.add: binary["add"], aten.add.Tensor: binary["add"],
        aten.add.Scalar: binary["add"],
        operator.sub: binary["sub"], torch.sub: binary["sub"], aten.sub.Tensor: binary["sub"],
        aten.sub.Scalar: binary["sub"],
        operator.truediv: binary["div"], torch.div: binary["div"], aten.div.Tensor: binary["div"],
        aten.div.Scalar: binary["div"],
    }
    for dims in (1, 2, 3):
        table[getattr(torch, f"conv{dims}d")] = conv
        table[getattr(aten, f"conv{dims}d").default] = conv
        table[getattr(aten, f"conv{dims}d").padding] = conv
        table[getattr(torch, f"conv_transpose{dims}d")] = conv_t
        for overload in getattr(aten, f"conv_transpose{dims}d").overloads():
            table[getattr(getattr(aten, f"conv_transpose{dims}d"), overload)] = conv_t
        for aten_name, mode in (("reflection", "reflect"), ("replication", "replicate")):
            table[getattr(aten, f"{aten_name}_pad{dims}d").default] = OpSpec("pad", ("input", "pad"), {"mode": mode})
    transpose = OpSpec("transpose", ("input", "dim0", "dim1"))
    permute = OpSpec("permute", ("input", "dims"))
    identity = OpSpec("identity", ("input",))
    dropout = OpSpec("dropout", ("input", "p", "training"), {"p": 0.5, "training": True})
    table.update({torch.transpose: transpose, aten.transpose.int: transpose, torch.permute: permute,
                  aten.permute.default: permute, aten.clone.default: identity, aten.alias.default: identity,
                  F.dropout: dropout, aten.dropout.default: OpSpec("dropout", ("input", "p", "train"))})
    methods = {"reshape": reshape, "transpose": transpose, "permute": permute, "contiguous": identity,
               "clone": identity, "view": OpSpec("reshape", ("input", "shape")), "flatten": flatten,
               "reshape_as": OpSpec("reshape", ("input", "other")), "view_as": OpSpec("reshape", ("input", "other")),
               "unflatten": OpSpec("reshape", ("input", "dim", "sizes"))}
    methods.update({kind: spec for kind, spec in binary.items()})
    table.update({("method", name): spec for name, spec in methods.items()})
    table[("module", nn.Flatten)] = OpSpec("flatten", ("input",), {"start_dim": 1, "end_dim": -1})
    table[("module", nn.Unflatten)] = OpSpec("reshape", ("input",))
    table[("module", nn.Identity)] = identity
    table[("module", nn.modules.dropout._DropoutNd)] = OpSpec("dropout", ("input",))
    return table


SPECS = _specs()

# Ops whose result is random or changes state: never evaluated as constants.
_IMPURE_WORDS = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "poisson", "exponential",
                 "seed", "empty")


def spec_of(node: fx.Node, root: nn.Module | None = None) -> OpSpec | None:
    """The classified op of a node, or None for ops the fold passes treat as opaque."""
    if node.op == "call_function":
        return SPECS.get(node.target)
    if node.op == "call_method":
        return SPECS.get(("method", node.target))
    if node.op == "call_module" and root is not None:
        module = _submodule(root, str(node.target))
        if module is not None:
            return next((spec for key, spec in SPECS.items() if isinstance(key, tuple) and key[0] == "module"
                         and isinstance(module, key[1])), None)
    return None


def kind_of(node: fx.Node, root: nn.Module | None = None) -> str | None:
    spec = spec_of(node, root)
    return spec.kind if spec else None


def is_identity(node: fx.Node, root: nn.Module) -> bool:
    """Ops that pass their input through unchanged in eval mode (Identity, contiguous, eval dropout)."""
    kind = kind_of(node, root)
    if kind == "identity":
        return True
    if kind != "dropout":
        return False
    if node.op == "call_module":
        return not _submodule(root, str(node.target)).training
    spec = spec_of(node)
    return arg(node, "train" if "train" in spec.params else "training", spec) is False


_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
_SHAPE_OPS = {"aten::dim", "aten::size", "aten::numel", "aten::sym_size", "aten::sym_numel", "aten::sym_stride",
              "aten::sym_storage_offset"}


def reads_only_metadata(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` looks only at `node`'s shape or dtype (so a fold that keeps those is invisible to it)."""
    name = user.target if user.op == "call_method" else None
    if isinstance(user.target, torch._ops.OpOverload):
        name = user.target._schema.name.removeprefix("aten::")
        if user.target._schema.name in _SHAPE_OPS:
            return True
    elif user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _SHAPE_ATTRIBUTES
    if name in ("size", "dim") and user.args[:1] == (node,):
        return True
    return (name in ("reshape_as", "view_as", "expand_as", "type_as") and user.args[0] is not node
            and node not in user.args[2:] and node not in user.kwargs.values())


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users that read `node`'s values, not just its shape."""
    return [user for user in node.users if not reads_only_metadata(user, node)]


def arg(node: fx.Node, name: str, spec: OpSpec | None = None) -> Any:
    """The value of a named argument, positional or keyword, or its default."""
    spec = spec or spec_of(node)
    assert spec is not None, f"{node} is not a classified op"
    position = spec.params.index(name) if name in spec.params else None
    if position is not None and position < len(node.args):
        return node.args[position]
    if name in node.kwargs:
        return node.kwargs[name]
    return spec.defaults.get(name)


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Replace a named argument wherever the call passes it (positionally or by keyword)."""
    spec = spec_of(node)
    assert spec is not None
    position = spec.params.index(name)
    if position < len(node.args):
        node.update_arg(position, value)
    elif name in node.kwargs or position > len(node.args):
        node.update_kwarg(name, value)
    else:
        node.args = (*node.args, value)


def may_write(node: fx.Node) -> bool:
    """Whether running the op may change a tensor it reads: in-place and mutating ops, and BN in training
    mode, which updates its running statistics although `aten::batch_norm`'s schema does not say so."""
    if node.op != "call_function":
        return False
    if getattr(getattr(node.target, "_schema", None), "is_mutable", False):
        return True
    spec = spec_of(node)
    return spec is not None and spec.kind == "batch_norm" and "training" in spec.params \
        and arg(node, "training", spec) is not False


def conv_is_transposed(node: fx.Node) -> bool:
    kind = kind_of(node)
    return kind == "conv_transpose" or (kind == "convolution" and bool(arg(node, "transposed")))


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def fetch_attr(root: nn.Module, target: str) -> Any:
    owner_path, _, name = target.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return getattr(owner, name)


class Constants:
    """Evaluates nodes that depend only on stored tensors (get_attr), never on the model's inputs."""

    def __init__(self, root: fx.GraphModule) -> None:
        self.root = root
        self._values: dict[fx.Node, Any] = {}
        self._constant: dict[fx.Node, bool] = {}

    def is_constant(self, value: Any) -> bool:
        if not isinstance(value, fx.Node):
            return True
        if value not in self._constant:
            self._constant[value] = self._check(value)
        return self._constant[value]

    def _check(self, node: fx.Node) -> bool:
        if node.op == "get_attr" or self._metadata(node) is not None:
            return True
        if node.op not in ("call_function", "call_method"):
            return False
        name = getattr(node.target, "__name__", str(node.target)).lower()
        if name.endswith("_") or any(word in name for word in _IMPURE_WORDS):
            return False
        return all(self.is_constant(n) for n in node.all_input_nodes)

    def value(self, node: Any) -> Any:
        """The value of a constant argument (a tensor, or the plain Python value it already is)."""
        if not isinstance(node, fx.Node):
            return node
        if node not in self._values:
            assert self.is_constant(node), f"{node} is not constant"
            self._values[node] = self._evaluate(node)
        return self._values[node]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return fetch_attr(self.root, str(node.target))
        metadata = self._metadata(node)
        if metadata is not None:
            return metadata
        args = fx.node.map_arg(node.args, self.value)
        kwargs = fx.node.map_arg(node.kwargs, self.value)
        with torch.no_grad():
            if node.op == "call_method":
                self_value, *rest = args
                return getattr(self_value, str(node.target))(*rest, **kwargs)
            return node.target(*args, **kwargs)  # type: ignore[operator]

    def _metadata(self, node: fx.Node) -> Any:
        """`x.dtype` / `x.device`, known without running the model: from recorded metadata, or for a
        conv/linear output from its stored weight (torch requires the two to match)."""
        if node.op != "call_function" or node.target is not getattr or node.args[1] not in ("dtype", "device"):
            return None
        source, attribute = node.args
        if not isinstance(source, fx.Node):
            return None
        value = source.meta.get("val")
        value = value if isinstance(value, torch.Tensor) else source.meta.get("tensor_meta")
        known = getattr(value, attribute, None)
        spec = spec_of(source)
        if known is None and spec is not None and spec.kind in ("conv", "conv_transpose", "convolution", "linear"):
            weight = arg(source, "weight", spec)
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                known = getattr(fetch_attr(self.root, str(weight.target)), attribute)
        return known

    def forget(self) -> None:
        self._values.clear()
        self._constant.clear()


def shape_of(node: Any) -> tuple | None:
    """The node's tensor shape from shape propagation or export metadata (SymInts stay symbolic)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(module path, class name) from outermost to innermost module the node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = []
    for path, cls in stack.values():
        name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
        if path:
            entries.append((str(path), name))
    return entries


def target_name(node: fx.Node) -> str:
    """A readable op name: `conv2d`, `add`, `relu`, a module path for leaf modules."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "output":
        return "the model output"
    if node.op == "placeholder":
        return f"the model input {node.target}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return str(getattr(target, "__name__", target)).strip("_")
