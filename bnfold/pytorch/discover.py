"""Find BN layers in torch models: BN classes, their subclasses, look-alikes, and BN ops in graphs."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from bnfold.health import no_statistics
from bnfold.layers import BNLayer

BN_CLASS_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
                  "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"}

# aten BN ops and the argument positions of (input, weight, bias, mean, var, training, momentum, eps).
BN_ATEN_SIGNATURES = {
    "aten::batch_norm": (0, 1, 2, 3, 4, 5, 6, 7),
    "aten::_native_batch_norm_legit_no_training": (0, 1, 2, 3, 4, None, 5, 6),
    "aten::_native_batch_norm_legit": (0, 1, 2, 3, 4, 5, 6, 7),
    "aten::native_batch_norm": (0, 1, 2, 3, 4, 5, 6, 7),
    "aten::_native_batch_norm_legit_functional": (0, 1, 2, 3, 4, 5, 6, 7),
    "aten::cudnn_batch_norm": (0, 1, 2, 3, 4, 5, 6, 7),
}


def _array(tensor) -> np.ndarray | None:
    if not isinstance(tensor, torch.Tensor) or _is_uninitialized(tensor):
        return None
    return tensor.detach().to("cpu", torch.float64).numpy().ravel().copy()


def _is_uninitialized(tensor: torch.Tensor) -> bool:
    from torch.nn.parameter import UninitializedTensorMixin

    return isinstance(tensor, UninitializedTensorMixin)


def _dtype(*tensors) -> str:
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and not _is_uninitialized(tensor):
            return str(tensor.dtype).removeprefix("torch.")
    return "unknown"


def _class_name(module: nn.Module) -> str:
    return getattr(module, "original_name", None) or type(module).__name__


def bn_kind(module: nn.Module) -> str | None:
    """How a module is a BN: its class, a subclass of one, a look-alike, or None when it is not one."""
    name = _class_name(module)
    if isinstance(module, _BatchNorm):
        if type(module).__module__.startswith("torch.nn"):
            return name
        base = next(c.__name__ for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
        return f"{name} ({base} subclass)"
    own = {n for n, _ in module.named_buffers(recurse=False)} | {n for n, _ in module.named_parameters(recurse=False)}
    if isinstance(module, torch.jit.ScriptModule) and name in BN_CLASS_NAMES:
        return name
    if {"running_mean", "running_var"} <= own:
        return f"{name} (look-alike)"
    return None


# What keeps a torch BN class from holding statistics when nothing else says: it registers none only then
# (a traced module keeps no track_running_stats, a graph only the class its BN op was called in).
BN_CLASS_WITHOUT_STATISTICS = "track_running_stats=False"


def missing_statistics(module: nn.Module) -> str | None:
    """Why (`no_statistics`) a BN module, also scripted or traced, or a hand-written one (an `eps` and a
    `running_mean` that is None) has no statistics to recalibrate or fold; None for any other module.
    InstanceNorm keeps none by design: it is no BN."""
    if isinstance(module, _BatchNorm) or (isinstance(module, torch.jit.ScriptModule) and bn_kind(module)):
        tracking = getattr(module, "track_running_stats", None)  # a traced module keeps no such attribute
        if tracking is not False and getattr(module, "running_mean", None) is not None \
                and getattr(module, "running_var", None) is not None:
            return None
        return no_statistics("running_mean/running_var is None" if tracking else BN_CLASS_WITHOUT_STATISTICS)
    if isinstance(module, _NormBase) or not hasattr(module, "eps") or getattr(module, "running_mean", 0) is not None:
        return None
    return no_statistics("running_mean is None")


def op_missing_statistics(class_name: str | None) -> str:
    """Why (`no_statistics`) a BN op in a graph that reads no running statistics has none, from the class of
    the module that called it (None: unknown)."""
    return no_statistics(BN_CLASS_WITHOUT_STATISTICS if class_name in BN_CLASS_NAMES else None)


def describe_module(name: str, module: nn.Module, kind: str) -> BNLayer:
    """A BN-like module as a BNLayer."""
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    tracked = getattr(module, "num_batches_tracked", None)
    channels = getattr(module, "num_features", None)
    if not isinstance(channels, int) or channels <= 0:
        known = next((t for t in (mean, var, weight) if isinstance(t, torch.Tensor) and not _is_uninitialized(t)), None)
        channels = int(known.numel()) if known is not None else None  # e.g. a lazy BN not yet materialized
    eps = getattr(module, "eps", None)
    extra = {} if eps is not None else {"eps_unknown": True}
    momentum = getattr(module, "momentum", None)
    return BNLayer(
        name=name or "<root>",
        kind=kind,
        framework="torch",
        channels=channels,
        eps=float(eps) if eps is not None else math.nan,
        momentum=float(momentum) if isinstance(momentum, (int, float)) else None,
        affine=bool(getattr(module, "affine", weight is not None)),
        track_running_stats=bool(getattr(module, "track_running_stats", mean is not None)),
        running_mean=_array(mean),
        running_var=_array(var),
        weight=_array(weight),
        bias=_array(bias),
        num_batches_tracked=int(tracked.item()) if isinstance(tracked, torch.Tensor) and tracked.numel() == 1 else None,
        dtype=_dtype(weight, mean),
        training=bool(module.training),
        extra=extra,
    )


def discover_module(module: nn.Module, share_tensors: bool = False) -> list[BNLayer]:
    """BN layers of an eager or scripted module: its BN-like submodules, then BN ops only its graph shows
    (traced on a `private_copy`, sharing the module's tensors with `share_tensors`)."""
    layers = []
    # One BN module held under two attribute names (DGCNN's `self.bn1`, also `conv1[1]`) is listed once by
    # eager named_modules(), under its first name; TorchScript copies it per name, the copies sharing its
    # tensors. A copy is that layer again (`aliases`: its name -> the first), not a second one that the
    # forward never calls.
    first_name_of: dict[tuple[int, ...], str] = {}  # by `_storage_key`
    aliases: dict[str, str] = {}
    for name, child in module.named_modules():
        kind = bn_kind(child)
        key = _storage_key(child) if kind is not None and isinstance(module, torch.jit.ScriptModule) else None
        if key in first_name_of:
            aliases[name] = first_name_of[key]
        elif kind is not None:
            if key is not None:
                first_name_of[key] = name
            layers.append(describe_module(name, child, kind))
    if isinstance(module, torch.jit.ScriptModule):
        return with_script_graph(module, layers, aliases)
    return with_graph_layers(module, layers, share_tensors)


def _storage_key(module: nn.Module) -> tuple[int, ...] | None:
    """Where a BN module's statistics and affine parameters live, which TorchScript's copies of one module
    share (None: it holds none; `tensor_key` tells tensors apart, this tells modules)."""
    tensors = [getattr(module, name, None) for name in ("running_mean", "running_var", "weight", "bias")]
    key = tuple(t.data_ptr() if isinstance(t, torch.Tensor) else 0 for t in tensors)
    return key if any(key) else None


def inlined_graph(module: torch.jit.ScriptModule) -> torch._C.Graph | None:
    """A copy of a TorchScript module's forward graph with every submodule call inlined (None: no forward),
    as this instance runs it: a call through an interface-typed attribute (`torch.jit.interface`) is
    inlined as the module the attribute holds (as torch.jit.freeze does), and an Optional attribute that
    holds None and that no node sets is read as a None constant, as TorchScript compiles a buffer
    registered as None (BatchNorm's track_running_stats=False)."""
    forward = getattr(module, "forward", None)
    graph = getattr(forward, "graph", None)
    if graph is None:
        return None
    graph = graph.copy()
    torch._C._jit_pass_inline(graph)
    while _resolve_interfaces(module, graph):
        torch._C._jit_pass_inline(graph)
    _read_unset_none_as_constant(module, graph)
    return graph


def _resolve_interfaces(module: torch.jit.ScriptModule, graph: torch._C.Graph) -> bool:
    """Type each interface-typed submodule read as the module it holds, so that inlining sees through its
    calls; whether any was. A module picked at run time (a ModuleDict indexed by a variable) stays hidden."""
    resolved = False
    for node in graph.findAllNodes("prim::GetAttr", True):
        if node.output().type().kind() != "InterfaceType":
            continue
        held = resolve_path(module, _value_path(node.output()))
        if isinstance(held, torch.jit.ScriptModule):
            node.output().setType(held._c._type())
            resolved = True
    return resolved


def _read_unset_none_as_constant(module: torch.jit.ScriptModule, graph: torch._C.Graph) -> None:
    """Read each Optional attribute that holds None and that no node sets as a None constant: a hand-written
    BN's `running_mean: Optional[Tensor] = None` then reads as BatchNorm's track_running_stats=False does."""
    written = {node.s("name") for node in graph.findAllNodes("prim::SetAttr", True)}
    for node in graph.findAllNodes("prim::GetAttr", True):
        if node.output().type().kind() != "OptionalType" or node.s("name") in written:
            continue
        path = _value_path(node.output())
        if path is not None and resolve_path(module, path) is None:
            graph.setInsertPoint(node)
            node.output().replaceAllUsesWith(graph.insertConstant(None))


def _hidden_interface_calls(graph: torch._C.Graph) -> list[str]:
    """The submodules (or containers, for a module picked from one at run time) that the graph still calls
    through an interface: what they run is not in the graph."""
    hidden = []
    for node in graph.findAllNodes("prim::CallMethod", True):
        callee = node.inputsAt(0)
        if callee.type().kind() != "InterfaceType":
            continue
        if callee.node().kind() == "prim::ModuleContainerIndex":
            callee = callee.node().inputsAt(0)
        hidden.append(_value_path(callee) or "")
    return hidden


def attribute_path(node: torch._C.Node, position: int) -> str | None:
    """The path of the module attribute a node reads as input `position` ("layer1.0.bn1.running_mean")."""
    return _value_path(node.inputsAt(position))


def _value_path(value: torch._C.Value) -> str | None:
    """The path of the module attribute a graph value is read from, or None when it is no attribute."""
    names = []
    while value.node().kind() == "prim::GetAttr":
        names.append(value.node().s("name"))
        value = value.node().inputsAt(0)
    if value.node().kind() != "prim::Param" or not names:
        return None
    return ".".join(reversed(names))


def resolve_path(module: nn.Module, path: str | None) -> Any:
    """The attribute at a dotted path ("stem.norm.mu"; ScriptModules have no get_submodule), or None."""
    return functools.reduce(_attribute, path.split("."), module) if path else None


def owner_at(root: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path in `root` ('' is `root`), plain nn.Modules made where parts are missing:
    where a tensor or a model is to be stored under a name `root` does not have yet."""
    owner = root
    for part in path.split(".") if path else []:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    return owner


def _attribute(owner: Any, name: str) -> Any:
    """`getattr`, except that a ScriptModule's own properties (`code`, `graph`) do not hide its submodules,
    parameters and buffers of the same name."""
    if isinstance(owner, torch.jit.ScriptModule):
        for table in (owner._modules, owner._parameters, owner._buffers):
            if name in table:
                return table[name]
    return getattr(owner, name)


def constant_input(node: torch._C.Node, position: int) -> Any:
    """The value of a node's input when it is a graph constant, else None."""
    value = node.inputsAt(position)
    return value.toIValue() if value.node().kind() == "prim::Constant" else None


def with_script_graph(module: torch.jit.ScriptModule, known: list[BNLayer],
                      aliases: dict[str, str]) -> list[BNLayer]:
    """`known` completed from the module's inlined graph: the eps (and momentum) a traced module keeps only
    as constants of its batch_norm calls, `F.batch_norm` on buffers of modules that are no BN module,
    named after the module owning the statistics (the buffer's own name when the root owns them), and the
    batch_norm calls of a frozen module, whose statistics are graph constants (`frozen_batch_norms`)."""
    try:
        graph = inlined_graph(module)  # held for as long as its nodes are used
        return known if graph is None else _complete_from_graph(module, graph, known, aliases)
    except (RuntimeError, AttributeError):  # a graph bnfold cannot read: the module walk is all there is
        return known


FROZEN_KIND = "F.batch_norm (frozen)"
FROZEN_INPUTS = {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}  # batch_norm input positions


def frozen_batch_norms(graph: torch._C.Graph) -> list[tuple[str, torch._C.Node]]:
    """The batch_norm calls of a frozen graph (torch.jit.freeze made the statistics constants), with the
    layer names both inspect and fold give them: the module path freezing kept in the constant's debug
    name ("self.bn2.running_mean": "bn2"; only in memory, torch.jit.save drops it), else `batch_norm`,
    `batch_norm_1`, ... in graph order. Calls reading the same running_mean constant are one layer."""
    found, names = [], {}
    for node in graph.findAllNodes("aten::batch_norm", True):
        mean = constant_input(node, 3)
        if not isinstance(mean, torch.Tensor):
            continue
        key = tensor_key(mean)
        if key not in names:
            debug, number = node.inputsAt(3).debugName(), len(names)
            path = debug.removeprefix("self.").removesuffix(".running_mean")
            name = path if debug != path and debug.endswith(".running_mean") and path \
                else (f"batch_norm_{number}" if number else "batch_norm")
            names[key] = name if name not in names.values() else f"{name}_{number}"
        found.append((names[key], node))
    return found


def frozen_constant_targets(module: torch.jit.ScriptModule) -> dict[tuple, str]:
    """Where fold puts each tensor constant of a frozen module, by the identity of the tensor (`tensor_key`:
    torch's TorchScript converter lifts the very same tensors): the statistics of its batch_norm calls
    under the layer names inspect gives them ("bn2.running_var"), the other weights under the module path
    freezing kept in their debug names ("conv1.weight"; only in memory, torch.jit.save drops it), so that
    fold names the layers it folds into as the model does."""
    graph = _readable_graph(module)
    if graph is None:
        return {}
    targets = {}
    for name, node in frozen_batch_norms(graph):
        for position, attribute in FROZEN_INPUTS.items():
            tensor = constant_input(node, position)
            if isinstance(tensor, torch.Tensor):
                targets.setdefault(tensor_key(tensor), f"{name}.{attribute}")
    taken = set(targets.values())
    for debug, tensor in _tensor_constants(graph):
        path = debug.removeprefix("self.")
        if path != debug and path not in taken and tensor_key(tensor) not in targets:
            targets[tensor_key(tensor)] = path
            taken.add(path)
    return targets


def constant_values(module: torch.jit.ScriptModule) -> int:
    """How many values the tensor constants of a scripted module's graph hold: the weights of a frozen
    module, which its state_dict no longer has. A Python number a trace recorded (the 2 of `h - 2`, the
    0.5 of `x * 0.5`) is a weight of no model: saved, it is a 0-dim int64 or float64 constant."""
    graph = _readable_graph(module)
    return sum(tensor.numel() for _, tensor in _tensor_constants(graph)
               if not _traced_number(tensor)) if graph is not None else 0


def _traced_number(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 0 and tensor.dtype in (torch.int64, torch.float64, torch.bool, torch.complex128)


def _readable_graph(module: torch.jit.ScriptModule) -> torch._C.Graph | None:
    """`inlined_graph`, or None when there is none bnfold can read."""
    try:
        return inlined_graph(module)
    except (RuntimeError, AttributeError):
        return None


def _tensor_constants(graph: torch._C.Graph) -> list[tuple[str, torch.Tensor]]:
    """The tensors a graph holds as constants, each once, with their debug names ("self.conv.weight")."""
    found: dict[tuple, tuple[str, torch.Tensor]] = {}
    for node in graph.findAllNodes("prim::Constant", True):
        value = node.output().toIValue() if node.output().type().kind() == "TensorType" else None
        if isinstance(value, torch.Tensor):
            found.setdefault(tensor_key(value), (node.output().debugName(), value))
    return list(found.values())


def tensor_key(tensor: torch.Tensor) -> tuple:
    """What tells one stored tensor from another without comparing values."""
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride())


def _complete_from_graph(module: torch.jit.ScriptModule, graph: torch._C.Graph, known: list[BNLayer],
                         aliases: dict[str, str]) -> list[BNLayer]:
    layers = {layer.name: layer for layer in known}
    for name, node in frozen_batch_norms(graph):
        if name not in layers:
            weight, bias, mean, var = (constant_input(node, position) for position in FROZEN_INPUTS)
            settings = _call_settings(module, node)
            settings["momentum"] = _module_momentum(settings["momentum"])  # a frozen BN module's call
            layers[name] = describe_tensors(name, FROZEN_KIND, mean=mean, var=var, weight=weight, bias=bias,
                                            **settings)
    called = set()
    for node in graph.findAllNodes("aten::batch_norm", True):
        tensor_path = _naming_path(node)
        if tensor_path is None:  # statistics that are no attribute (computed, or frozen: above), or no weight
            continue
        owner_path = tensor_path.rpartition(".")[0]
        name = aliases.get(owner_path) or owner_path or ("<root>" if "<root>" in layers else tensor_path)
        called.add(name)
        settings = _call_settings(module, node)
        layer = layers.get(name)
        if layer is None:
            owner = resolve_path(module, owner_path) if owner_path else module
            weight, bias, mean, var = (resolve_path(module, attribute_path(node, at)) for at in (1, 2, 3, 4))
            layers[name] = describe_tensors(name, f"F.batch_norm ({_class_name(owner)})", mean=mean, var=var,
                                            weight=weight, bias=bias, **settings)
            continue
        if math.isnan(layer.eps) and settings["eps"] is not None:  # a traced module keeps no eps attribute
            layer.eps = settings["eps"]
            layer.extra.pop("eps_unknown", None)
        if layer.momentum is None:  # a BN module's call
            layer.momentum = _module_momentum(settings["momentum"])
        if settings["training_fixed"] and layer.has_running_stats:  # without statistics it has no other mode
            layer.training = layer.training_fixed = True
    hidden = _hidden_interface_calls(graph)
    for layer in layers.values():
        callee = next((path for path in hidden if _is_within(layer.name, path)), None)
        if layer.name not in called and callee is not None:  # its call is somewhere in code the graph hides
            layer.extra["hidden_call"] = (f"called through a TorchScript interface ({callee or 'unknown'}) "
                                          "bnfold cannot see through")
    return list(layers.values())


def _naming_path(node: torch._C.Node) -> str | None:
    """The attribute a batch_norm call is named after: its running_mean, or its weight when it has no
    statistics (track_running_stats=False)."""
    if node.inputsAt(3).type().kind() == "NoneType":
        return attribute_path(node, 1)
    return attribute_path(node, 3)


def _is_within(name: str, path: str) -> bool:
    """Whether module `name` is the module at `path` or inside it ("" stands for anywhere)."""
    return not path or name == path or name.startswith(path + ".")


def _call_settings(module: torch.jit.ScriptModule, node: torch._C.Node) -> dict[str, Any]:
    """eps, momentum, training and training_fixed of a batch_norm call, where constants say (as a hand-written
    call passes them) or the module attributes it reads (as a scripted hand-written BN passes `self.eps`)."""
    eps, momentum, training = (_input_value(module, node, position) for position in (7, 6, 5))
    return {"eps": eps if isinstance(eps, float) else None,
            "momentum": momentum if isinstance(momentum, float) else None, "training": training is True,
            # a constant, not the module's mode: a hand-written training=True, or a trace in training mode
            "training_fixed": constant_input(node, 5) is True}


def _input_value(module: torch.jit.ScriptModule, node: torch._C.Node, position: int) -> Any:
    """A node's input when it is a graph constant or a module attribute, else None."""
    path = attribute_path(node, position)
    return resolve_path(module, path) if path else constant_input(node, position)


def _module_momentum(passed: float | None) -> float | None:
    """A BN module's momentum from what its forward passes: 0.0 stands for momentum=None (a cumulative
    average, not a frozen one)."""
    return passed if passed else None


def with_graph_layers(source: nn.Module | torch.export.ExportedProgram, known: list[BNLayer],
                      share_tensors: bool = False) -> list[BNLayer]:
    """`known` plus the BN layers found in the captured graph only (F.batch_norm on oddly named buffers,
    look-alikes inside a program); the same capture and analysis that folding uses."""
    from bnfold.pytorch.capture import capture_program, trace_functional
    from bnfold.pytorch.fold import GraphFolder

    try:
        graph = capture_program(source).module if isinstance(source, torch.export.ExportedProgram) \
            else trace_functional(source, share_tensors)
    except Exception:  # user code that does not trace without an example input: the walk is all there is
        return known
    unique = {layer.name: layer for layer in known}  # a BN op called twice: one layer
    found = {layer.name: layer for layer in GraphFolder(graph).layers()}
    for name, layer in unique.items():  # a BN module in eval mode whose forward passes training=True
        if name in found and found[name].training_fixed:
            layer.training = layer.training_fixed = True
    return list(unique.values()) + [layer for name, layer in found.items() if name not in unique]


def _schema_name(target) -> str | None:
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else None


def first_names(program: torch.export.ExportedProgram) -> dict[str, str]:
    """Each state_dict key of a program, mapped to the first key of the same tensor. A module held under two
    names (DGCNN's `self.bn1`, also `conv1[1]`) has its tensors under both in the program, and its ops read
    them by the call's path (`conv1.1`); eager named_modules() names the module by its first name (`bn1`)."""
    first: dict[tuple, str] = {}
    return {key: first.setdefault(tensor_key(tensor), key) for key, tensor in program.state_dict.items()}


def discover_exported(program: torch.export.ExportedProgram) -> list[BNLayer]:
    """BN ops in an ExportedProgram's graph, named after the module path of their parameters (`first_names`)."""
    signature = program.graph_signature
    first = first_names(program)
    sources = {**{name: first.get(key, key) for name, key in {**signature.inputs_to_parameters,
                                                                **signature.inputs_to_buffers}.items()},
               **signature.inputs_to_lifted_tensor_constants}
    values = {**program.state_dict, **program.constants}
    layers = []
    for node in program.graph.nodes:
        positions = BN_ATEN_SIGNATURES.get(_schema_name(node.target)) if node.op == "call_function" else None
        if positions is None:
            continue
        args = list(node.args) + [None] * 9

        def tensor_at(position):
            arg = args[position] if position is not None else None
            key = sources.get(getattr(arg, "name", None))
            return key, (values.get(key) if key else None)

        (weight_key, weight), (bias_key, bias) = tensor_at(1), tensor_at(2)
        (mean_key, mean), (var_key, var) = tensor_at(3), tensor_at(4)
        keys = [k for k in (mean_key, weight_key, var_key, bias_key) if k]
        prefix = keys[0].rsplit(".", 1)[0] if keys and "." in keys[0] else (keys[0] if keys else node.name)
        training_position = positions[5]
        training = bool(args[training_position]) if training_position is not None else False
        stack = node.meta.get("nn_module_stack") or {}
        class_path = list(stack.values())[-1][1] if stack else ""
        class_name = class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) and class_path else "batch_norm"
        tracked = values.get(f"{prefix}.num_batches_tracked")
        layers.append(describe_tensors(
            prefix, class_name, mean=mean, var=var, weight=weight, bias=bias, eps=float(args[positions[7]]),
            momentum=args[positions[6]], training_fixed=training,  # an exported graph has no mode to switch
            tracked=int(tracked.item()) if isinstance(tracked, torch.Tensor) else None,
            extra={"node": node.name}))
    return with_graph_layers(program, layers)


def describe_tensors(name: str, kind: str, *, mean, var, weight=None, bias=None, eps: float | None = None,
                     momentum=None, training: bool = False, training_fixed: bool = False,
                     tracked: int | None = None, extra: dict | None = None) -> BNLayer:
    """A BN layer found as an op in a graph, from the tensors it reads (`BNLayer.training_fixed`: the op
    runs in training mode whatever the mode of the module that calls it)."""
    reference = next((t for t in (mean, weight, var) if isinstance(t, torch.Tensor)), None)
    training_fixed = training_fixed and mean is not None  # without statistics it has no other mode
    extra = dict(extra or {})
    if eps is None:
        extra["eps_unknown"] = True
    return BNLayer(
        name=name,
        kind=kind,
        framework="torch",
        channels=int(reference.numel()) if reference is not None else None,
        eps=float(eps) if eps is not None else math.nan,
        momentum=float(momentum) if isinstance(momentum, (int, float)) else None,
        affine=weight is not None,
        track_running_stats=mean is not None,
        running_mean=_array(mean),
        running_var=_array(var),
        weight=_array(weight),
        bias=_array(bias),
        num_batches_tracked=tracked,
        dtype=_dtype(weight, mean),
        training=training or training_fixed,
        training_fixed=training_fixed,
        extra=extra,
    )
