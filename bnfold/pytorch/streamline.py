"""The folded eager model made as cheap to call as the code it came from.

A folded GraphModule runs one line of generated Python per node, and each line that calls a leaf module
first walks to it through nested attribute lookups (`getattr(self.trunk, "0").f.a`) and then pays a full
module call for what is usually one function: ReLU, SiLU, pooling. On small models at batch 1 that
overhead is up to a sixth of the run time, more than the BN layers saved (BENCHMARKS.md section 2). So,
after folding:

- stateless torch.nn leaf modules (no tensors, children or hooks, the same code in training and eval
  mode) become the functional calls their forward makes, and an Identity disappears;
- a `reshape_as`/`view_as` back to the tensor that a chain of flatten/reshape ops started from (what is
  left of `bn(x.flatten(0, 1)).reshape_as(x)` once the BN is folded) becomes that tensor;
- an aten op of a graph captured with torch.export (`torch.ops.aten.conv2d.default`, a Python object
  whose call parses its arguments against the schema: microseconds per op) becomes torch's generated
  binding of the same operator (`torch.conv2d`), which dispatches to the same kernel.

Every module that holds tensors keeps its name, so the folded model's state_dict keys stay the original
model's module paths (but for the few names a GraphModule uses itself: `bnfold.pytorch.capture`).
"""

from __future__ import annotations

import copy
import types

import torch
from torch import fx, nn

from bnfold.pytorch.ops import kind_of

_ROUND_TRIP_ENDS = ("reshape_as", "view_as")


def streamline(root: nn.Module) -> None:
    """Streamline every GraphModule in `root` (changed in place); outputs do not change."""
    for module in list(root.modules()):
        if isinstance(module, fx.GraphModule):
            changed = [_inline_stateless(module), _drop_round_trips(module), _bind_aten_ops(module)]
            if any(changed):
                module.graph.lint()
                module.delete_all_unused_submodules()
                module.recompile()


def _inline_stateless(module: fx.GraphModule) -> bool:
    changed = False
    graphs: dict[tuple[str, int], fx.Graph | None] = {}  # a module called at several places is traced once
    for node in list(module.graph.nodes):
        if node.op != "call_module" or node.kwargs:
            continue
        key = (str(node.target), len(node.args))
        if key not in graphs:
            graphs[key] = _functional_graph(module.get_submodule(key[0]), key[1])
        graph = graphs[key]
        if graph is None:
            continue
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        with module.graph.inserting_before(node):
            value = module.graph.graph_copy(graph, dict(zip(placeholders, node.args)))
        node.replace_all_uses_with(value)
        module.graph.erase_node(node)
        changed = True
    return changed


def _functional_graph(module: nn.Module, arity: int) -> fx.Graph | None:
    """The graph of a stateless torch.nn module's forward on `arity` inputs, when it provably computes
    the same thing whatever the module's mode; None for anything else."""
    if (not type(module).__module__.startswith("torch.nn.") or any(True for _ in module.parameters())
            or any(True for _ in module.buffers()) or any(True for _ in module.children())
            or module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
            or module._backward_pre_hooks):
        return None
    graphs = []
    for training in (False, True):  # Dropout's code reads the mode: it stays a module
        try:
            graphs.append(fx.symbolic_trace(copy.deepcopy(module).train(training)))
        except Exception:  # forward branches on its input: keep the call
            return None
    graph = graphs[0].graph
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1].args[0]
    if (graphs[0].code != graphs[1].code or len(placeholders) != arity or not isinstance(output, fx.Node)
            or any(n.op not in ("placeholder", "call_function", "call_method", "output") for n in nodes)):
        return None
    return graph


def _drop_round_trips(module: fx.GraphModule) -> bool:
    changed = False
    for node in list(module.graph.nodes):
        source = _round_trip_source(node, module)
        if source is not None:
            node.replace_all_uses_with(source)
            chain = node.args[0]
            module.graph.erase_node(node)
            while isinstance(chain, fx.Node) and chain is not source and not chain.users:
                previous = chain.args[0]
                module.graph.erase_node(chain)
                chain = previous
            changed = True
    return changed


def _round_trip_source(node: fx.Node, module: fx.GraphModule) -> fx.Node | None:
    """`x` for `y.reshape_as(x)` where `y` comes from `x` through flatten/reshape ops that nothing else
    reads, and nothing else reads `x` either (so whether the result aliases `x` cannot matter)."""
    if node.op != "call_method" or node.target not in _ROUND_TRIP_ENDS or len(node.args) != 2 or node.kwargs:
        return None
    chain, source = node.args
    if not isinstance(source, fx.Node):
        return None
    links: list[fx.Node] = []
    while isinstance(chain, fx.Node) and chain is not source:
        if kind_of(chain, module) not in ("flatten", "reshape") or len(chain.users) != 1 or not chain.args:
            return None
        links.append(chain)
        chain = chain.args[0]
    if chain is not source or not links or set(source.users) != {links[-1], node}:
        return None
    return source


def _bind_aten_ops(module: fx.GraphModule) -> bool:
    changed = False
    for node in module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            binding = _binding(node.target)
            if binding is not None:
                node.target = binding
                changed = True
    return changed


def _binding(op: torch._ops.OpOverload) -> types.BuiltinFunctionType | None:
    """torch's generated Python binding of an aten operator (`torch.conv2d`, `torch._C._nn.pad`), if the
    generated code can name it. Bindings are generated from the operator's schemas, so the arguments the
    graph passes (positional and keyword-only as in the schema) select an overload of the same operator."""
    if op.namespace != "aten":
        return None
    name = op._schema.name.split("::")[1]
    for space, public in ((torch._C._VariableFunctions, torch), (torch._C._nn, torch._C._nn)):
        binding = getattr(space, name, None)
        if isinstance(binding, types.BuiltinFunctionType) and getattr(public, name, None) is binding:
            return binding
    return None
