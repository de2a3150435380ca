"""Exact BN folds on a captured fx graph: where each BN's affine map can go, and moving it there.

An *occurrence* is one place the model applies a BN layer: a batch-norm op, or a look-alike module's
hand-written `x * scale + shift`. Each is y = scale * x + shift along one channel axis, and it folds

- back into the conv, transposed conv or linear layer whose output only it reads, also through layout
  ops (reshape, flatten, transpose, permute) that provably keep the channel axis;
- split across the producers of a channel concatenation;
- into every conv or linear layer of a sum of their outputs (the shift into one of them);
- forward into the one conv or linear layer that reads it, when no zero padding meets the shift;
- beside a conv or linear layer that reads the same input, into its centre tap, when their outputs are
  summed (RepVGG's identity branch: BN(x) + conv(x)) and that tap reads x where the output lies.

Anything else is kept, with the reason in words. Passes run until nothing changes; the arithmetic is
`bnfold.foldmath` in float64, rounded once to the layer's dtype.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold import foldmath
from bnfold.health import fixed_training, fold_refusal, no_statistics
from bnfold.layers import BNLayer, FoldDecision, FoldDirection, FoldStatus
from bnfold.pytorch.capture import model_path
from bnfold.pytorch.discover import (BN_CLASS_WITHOUT_STATISTICS, bn_kind, describe_tensors, missing_statistics,
                                     op_missing_statistics, owner_at)
from bnfold.pytorch.ops import (Constants, OpSpec, arg, conv_is_transposed, fetch_attr, is_identity, kind_of,
                                module_stack, set_arg, shape_of, spec_of, target_name, value_users)

TRAINING = ("in training mode: it normalizes each batch with that batch's statistics, so there is no fixed "
            "scale and shift to fold (call model.eval() first)")
NO_STATS = no_statistics(BN_CLASS_WITHOUT_STATISTICS)  # what the engine says when no graph was analysed
LAYER_KINDS = ("conv", "conv_transpose", "convolution", "linear")
LAYOUT_KINDS = ("reshape", "flatten", "transpose", "permute")
AFFINE_KINDS = ("mul", "add", "sub", "div")
_SPLITS = ("chunk", "split", "split_with_sizes", "unsafe_split", "unsafe_chunk")
_INPLACE_ADD = OpSpec("add", ("input", "other"), {"alpha": 1})  # aten.add_.Tensor, which `spec_of` leaves out


@dataclass
class Occurrence:
    """One application of a BN layer: y = scale * x + shift along `axis` of `input` (None: scalars only)."""

    layer: str
    kind: str
    input: fx.Node
    output: fx.Node  # whose users receive the BN's result
    reader: fx.Node  # the op that reads `input` (BN op, or a look-alike's first mul/add)
    axis: int | None = 1
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    refusal: str | None = None  # why it can never fold
    stats: dict[str, Any] = field(default_factory=dict)  # what discovery reports about it


@dataclass
class LayerCall:
    """A conv, transposed conv or linear call whose weight (and bias) are stored tensors."""

    node: fx.Node
    name: str
    kind: str  # conv, conv_transpose, linear
    weight: fx.Node
    bias: fx.Node | None
    groups: int


@dataclass
class Update:
    """New weight and bias for the calls that share one stored weight, as the float64 arithmetic that
    makes them from the weight and bias those calls read."""

    calls: list[LayerCall]
    arithmetic: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]
    biased: bool = True  # False: the calls stay without bias


@dataclass
class Deferred:
    """An update's arithmetic, left to `GraphFolder.folded`: the tensors the calls read when it was
    planned (stand-ins, when an earlier update made them) and the stand-ins it left in their place."""

    arithmetic: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]
    weight: torch.Tensor
    bias: torch.Tensor | None
    results: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (target, stand-in): weight, bias


@dataclass
class Fold:
    direction: FoldDirection
    targets: list[str]
    updates: list[Update]
    occurrences: list[Occurrence]
    bypass: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # absorbed ops -> what they read


class GraphFolder:
    """Folds every exactly-foldable BN of one GraphModule (which it changes) and says why for the rest.

    Folding rewrites the graph but leaves each folded weight a stand-in of its shape and dtype (analysis
    reads nothing else of it), so deciding costs no copy of the weights; `folded` then computes them
    into a new module. `prefix` is the module path of the GraphModule inside the whole model, so layer
    names stay module paths.
    """

    def __init__(self, module: fx.GraphModule, prefix: str = "") -> None:
        self.module = module
        self.graph = module.graph
        self.prefix = f"{prefix}." if prefix else ""
        self.constants = Constants(module)
        self._at_input: dict[fx.Node, Occurrence] = {}
        self._at_output: dict[fx.Node, Occurrence] = {}
        self._claimed: set[fx.Node] = set()  # ops that belong to an occurrence (a look-alike's arithmetic)
        self._deferred: list[Deferred] = []

    # ---- the pass ----------------------------------------------------------------------------------------

    def fold_all(self) -> dict[str, FoldDecision]:
        """Fold until nothing changes; one decision per BN layer found in the graph."""
        decisions: dict[str, FoldDecision] = {}
        progress = True
        while progress:
            progress = False
            for layer, occurrences in self.occurrences().items():
                outcome = self._plan(occurrences)
                bias = self._producer_bias(occurrences[0])
                if isinstance(outcome, Fold):
                    self._apply(outcome)
                    self._record_fold(decisions, layer, outcome, bias)
                    progress = True
                    break
                previous = decisions.get(layer)
                if previous is not None and previous.status is FoldStatus.FOLDABLE:
                    outcome = f"only some of its calls fold: {outcome}"
                decisions[layer] = FoldDecision(layer, FoldStatus.KEPT, reason=outcome, producer_bias=bias)
        self._prune()
        self.module.recompile()
        return decisions

    def folded(self) -> fx.GraphModule:
        """The folded module, after `fold_all`: the rewritten graph on the same tensors, with each
        stand-in replaced by the weights it stands for, computed in the order the folds were made."""
        with warnings.catch_warnings():  # copying an exported graph's codegen trips torch's own deprecations
            warnings.simplefilter("ignore", FutureWarning)
            module = fx.GraphModule(self.module, copy.deepcopy(self.graph), type(self.module).__name__)
        for holder in module.modules():  # the graph and the modules fx made to hold its tensors have no mode
            if holder is module or type(holder) is nn.Module:  # of their own; in training mode they would
                holder.training = False  # make `TorchEngine.run` copy the whole model before every run
        read = {str(node.target) for node in module.graph.nodes if node.op == "get_attr"}
        made: dict[int, torch.Tensor] = {}  # id(stand-in) -> what it stands for
        for deferred in self._deferred:
            weight, bias = (made.get(id(t), t) if t is not None else None for t in (deferred.weight, deferred.bias))
            values = deferred.arithmetic(_values(weight), _values(bias))
            for (target, stand_in), result in zip(deferred.results, values):
                # The bias takes the conv's dtype, also when the BN was float32 (CASES E2).
                tensor = _rounded(result, weight)
                # A result that a later fold replaced under another name is only that fold's input.
                made[id(stand_in)] = assign(module, target, tensor, weight) if target in read else tensor
        return module

    def _prune(self) -> None:
        """Drop the tensors no op reads any more (folded BN statistics), so they are not saved."""
        for node in [n for n in self.graph.nodes if n.op == "get_attr" and not n.users]:
            self.graph.erase_node(node)  # torch.export fetches every buffer, also those no op reads
        used = {str(n.target) for n in self.graph.nodes if n.op in ("get_attr", "call_module")}
        named = [*self.module.named_parameters(remove_duplicate=False), *self.module.named_buffers(remove_duplicate=False)]
        for name, _ in named:
            if name not in used and not any(name.startswith(f"{u}.") for u in used):
                owner, _, attr = name.rpartition(".")
                delattr(self.module.get_submodule(owner) if owner else self.module, attr)
        self.module.delete_all_unused_submodules()

    def _path(self, path: str) -> str:
        """The module path in the whole model of a module path in the graph."""
        return self.prefix + model_path(self.module, path)

    def layers(self) -> list[BNLayer]:
        """Every BN layer applied in the graph, described from the tensors its ops read (for discovery)."""
        seen: dict[str, BNLayer] = {}
        for name, occurrences in self.occurrences().items():
            stats = occurrences[0].stats
            if stats:
                seen[name] = describe_tensors(name, occurrences[0].kind, **stats)
        return list(seen.values())

    def _record_fold(self, decisions: dict[str, FoldDecision], layer: str, fold: Fold, bias: str | None) -> None:
        decision = decisions.get(layer)
        if decision is None or decision.status is not FoldStatus.FOLDABLE:
            decisions[layer] = FoldDecision(layer, FoldStatus.FOLDABLE, list(fold.targets), fold.direction,
                                            producer_bias=bias)
        else:
            decision.targets += [t for t in fold.targets if t not in decision.targets]

    # ---- occurrences -------------------------------------------------------------------------------------

    def occurrences(self) -> dict[str, list[Occurrence]]:
        """BN occurrences by layer name, in graph order."""
        self.constants.forget()
        found: dict[str, list[Occurrence]] = {}
        owners: dict[str, str] = {}  # layer name -> the statistics tensor it reads (tells apart name clashes)
        claimed: set[str] = set()
        for node in list(self.graph.nodes):
            spec = spec_of(node, self.module)
            if spec is not None and spec.kind == "batch_norm":
                occurrence = self._bn_op(node, owners, claimed)
            elif node.op == "call_module" and bn_kind(self.module.get_submodule(str(node.target))):
                occurrence = self._bn_module(node)
            else:
                continue
            if occurrence is not None:
                found.setdefault(occurrence.layer, []).append(occurrence)
        self._claimed = set()
        for path in self._lookalike_paths(claimed):
            occurrence = self._lookalike(path)
            if occurrence is not None:
                found.setdefault(occurrence.layer, []).append(occurrence)
        self._at_input = {o.input: o for group in found.values() for o in group}
        self._at_output = {o.output: o for group in found.values() for o in group}
        return found

    def _bn_op(self, node: fx.Node, owners: dict[str, str], claimed: set[str]) -> Occurrence | None:
        x = arg(node, "input")
        if not isinstance(x, fx.Node) or self.constants.is_constant(x):
            return None  # normalizes a stored tensor (weight standardization), not activations
        output = self._bn_output(node)
        mean, var, weight, bias = (arg(node, n) for n in ("running_mean", "running_var", "weight", "bias"))
        # without statistics and without the module stack a traced TorchScript model loses: named after its
        # weight, as discovery names it
        name = self._op_layer_name(node, mean if mean is not None or module_stack(node) else weight, owners)
        if isinstance(mean, fx.Node) and mean.op == "get_attr":
            claimed.add(str(mean.target).rpartition(".")[0])
        training = arg(node, "training") if "training" in spec_of(node).params else False
        training_fixed = training is not False and not self._called_in_training_mode(node)
        stack = [cls for path, cls in module_stack(node) if self._path(path) == name]
        occurrence = Occurrence(name, f"F.batch_norm ({stack[-1]})" if stack else "F.batch_norm", x,
                                output or node, node)
        tensors = (mean, var, weight, bias)
        if mean is None or var is None:
            occurrence.refusal = op_missing_statistics(stack[-1] if stack else None)
        elif training is not False:
            occurrence.refusal = fixed_training() if training_fixed else TRAINING
        elif output is None:
            occurrence.refusal = "its batch statistics outputs are read as well"
        elif not all(self.constants.is_constant(t) for t in tensors):
            occurrence.refusal = "its statistics are computed at run time, not stored"
        if all(self.constants.is_constant(t) for t in tensors):
            values = [self._tensor(t) for t in tensors]
            occurrence.stats = dict(mean=values[0], var=values[1], weight=values[2], bias=values[3],
                                    eps=float(arg(node, "eps")), momentum=arg(node, "momentum"),
                                    training=training is not False, training_fixed=training_fixed)
            if occurrence.refusal is None:
                occurrence.scale, occurrence.shift = foldmath.bn_affine(
                    *(self._float64(v) for v in (values[2], values[3], values[0], values[1])),
                    float(arg(node, "eps")))
                occurrence.refusal = fold_refusal(occurrence.scale, occurrence.shift, self._float64(values[1]))
        return occurrence

    def _called_in_training_mode(self, node: fx.Node) -> bool:
        """Whether the module that called a BN op is in training mode, so that model.eval() would change the
        op. An exported graph's modules are bare holders of its tensors (as are a symbolic trace's for the
        modules it traced through), whose mode is no model's: their ops' training is fixed."""
        stack = module_stack(node)
        try:
            caller = self.module.get_submodule(stack[-1][0]) if stack else None
        except AttributeError:
            return False
        return caller is not None and type(caller) is not nn.Module and caller.training

    def _bn_output(self, node: fx.Node) -> fx.Node | None:
        """The node carrying the normalized tensor (item 0 of the tuple-returning aten variants)."""
        if not spec_of(node).tuple_output:
            return node
        normalized = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        others = [u for u in node.users if u not in normalized and u.users]
        return normalized[0] if len(normalized) == 1 and not others else None

    def _op_layer_name(self, node: fx.Node, mean: Any, owners: dict[str, str]) -> str:
        if isinstance(mean, fx.Node) and mean.op == "get_attr":
            owner, _, attribute = str(mean.target).rpartition(".")
            if owner:
                name = self._path(owner)
            else:  # statistics of the root itself: a BN module is "<root>", a functional BN its buffer's name
                name = self.prefix.rstrip(".") or ("<root>" if attribute == "running_mean" else self._path(attribute))
            if owners.setdefault(name, str(mean.target)) != str(mean.target):
                name = self._path(str(mean.target))  # two BN ops in one module: name them by their statistics
            return name
        stack = module_stack(node)
        return self._path(stack[-1][0] if stack else node.name)

    def _bn_module(self, node: fx.Node) -> Occurrence:
        """A BN module kept as one call (tracing leaves BN in training mode opaque)."""
        module = self.module.get_submodule(str(node.target))
        refusal = TRAINING if module.training else missing_statistics(module) or no_statistics()
        return Occurrence(self._path(str(node.target)), str(bn_kind(module)), node.args[0], node, node,
                          refusal=refusal)

    def _lookalike_paths(self, claimed: set[str]) -> list[str]:
        """Modules holding running_mean/running_var that no BN op reads: candidates for x * scale + shift."""
        targets = {str(n.target) for n in self.graph.nodes if n.op == "get_attr"}
        return [t.removesuffix(".running_mean") for t in targets if t.endswith(".running_mean")
                and t.replace(".running_mean", ".running_var") in targets
                and t.removesuffix(".running_mean") not in claimed]

    def _lookalike(self, path: str) -> Occurrence | None:
        region = [n for n in self.graph.nodes if n.op in ("call_function", "call_method", "call_module")
                  and any(p == path for p, _ in module_stack(n))]
        chain = [n for n in region if not self.constants.is_constant(n)]
        if not chain:
            return None
        self._claimed.update(chain)
        cls = next(c for p, c in module_stack(chain[0]) if p == path)
        occurrence = Occurrence(self._path(path), f"{cls} (look-alike)", chain[0], chain[-1], chain[0],
                                axis=None, stats=self._lookalike_stats(path))
        scale, shift, previous = np.ones(1), np.zeros(1), None
        for node in chain:
            step = self._affine_step(node, previous)
            if isinstance(step, str):
                occurrence.refusal = f"it computes more than x * scale + shift ({step})"
                return occurrence
            source, kind, constant, axis = step
            if previous is None:
                occurrence.input = source
            if axis is not None and occurrence.axis not in (None, axis):
                occurrence.refusal = "its scale and shift broadcast along different axes"
                return occurrence
            occurrence.axis = axis if axis is not None else occurrence.axis
            scale, shift = foldmath.compose_step(kind, source is arg(node, "input"), scale, shift, constant)
            previous = node
        occurrence.scale, occurrence.shift = scale, shift
        occurrence.refusal = fold_refusal(scale, shift)
        return occurrence

    def _affine_step(self, node: fx.Node, previous: fx.Node | None) -> tuple | str:
        spec = spec_of(node, self.module)
        if spec is None or spec.kind not in AFFINE_KINDS or arg(node, "alpha", spec) != 1:
            return f"`{target_name(node)}`"
        operands = [arg(node, "input", spec), arg(node, "other", spec)]
        dynamic = [v for v in operands if isinstance(v, fx.Node) and not self.constants.is_constant(v)]
        if len(dynamic) != 1 or (previous is not None and dynamic[0] is not previous):
            return "it combines run-time tensors"
        if previous is not None and value_users(previous) != [node]:
            return "an intermediate result is read elsewhere"
        if spec.kind == "div" and dynamic[0] is operands[1]:
            return "it divides by its input"
        source = dynamic[0]
        if shape_of(node) is not None and shape_of(node) != shape_of(source):
            return "its constants change the tensor's shape"
        constant = operands[1] if source is operands[0] else operands[0]
        values = self._float64(self._tensor(constant))
        axes = [i - values.ndim for i, size in enumerate(values.shape) if size != 1]
        if len(axes) > 1:
            return "its constants vary along more than one axis"
        return source, spec.kind, values.reshape(-1), (axes[0] if axes else None)

    def _lookalike_stats(self, path: str) -> dict[str, Any]:
        values = {}
        for key, attr in (("mean", "running_mean"), ("var", "running_var"), ("weight", "weight"), ("bias", "bias")):
            try:
                values[key] = fetch_attr(self.module, f"{path}.{attr}")
            except AttributeError:
                values[key] = None
        return dict(values, eps=None, momentum=None, training=False)

    # ---- planning ----------------------------------------------------------------------------------------

    def _plan(self, occurrences: list[Occurrence]) -> Fold | str:
        """The first fold of a layer when every one of its calls folds, else why not."""
        folds = []
        for occurrence in occurrences:
            outcome = occurrence.refusal or self._fold_for(occurrence)
            if isinstance(outcome, str):
                calls = len(occurrences)
                return outcome if calls == 1 else f"{outcome} (at one of its {calls} calls)"
            folds.append(outcome)
        return folds[0]

    def _fold_for(self, occurrence: Occurrence) -> Fold | str:
        backward = self._backward(occurrence)
        if isinstance(backward, Fold):
            return backward
        forward = self._forward(occurrence)
        if isinstance(forward, Fold):
            return forward
        sibling = self._sibling(occurrence)
        if isinstance(sibling, Fold):
            return sibling
        return "; ".join(reason for reason in (backward, forward, sibling) if reason is not None)

    def _backward(self, occurrence: Occurrence) -> Fold | str:
        """Into the producer, through layout ops and through constant affine ops (x * c + d, CASES E3)."""
        node, path, affine = occurrence.input, [], {}
        while len(value_users(node)) == 1 and node not in self._claimed:
            step = self._affine_step(node, None) if kind_of(node, self.module) in AFFINE_KINDS else None
            if isinstance(step, tuple):
                affine[node] = step
            elif not self._is_layout(node):
                break
            path.append(node)
            node = step[0] if isinstance(step, tuple) else node.all_input_nodes[0]
        if all(self._passes_through(p) for p in path):
            if kind_of(node, self.module) == "cat":
                return self._split(occurrence, node, path)
            if self._is_sum(node):
                return self._sum(occurrence, node, path)
        call = self._layer_call(node)
        if not isinstance(call, LayerCall):
            return call if isinstance(call, str) else self._not_a_producer(node)
        chain = [node, *reversed(path)]
        for reader, expected in zip(chain, [*reversed(path), occurrence.reader]):
            others = [u for u in value_users(reader) if u is not expected]
            if others:
                return f"{call.name}'s output also feeds {self._labels(others)}"
        channels = _out_channels(self._tensor(call.weight), call)
        axis, scale, shift = self._channel_axis(call, node), np.ones(1), np.zeros(1)
        for step in reversed(path):
            if step in affine:
                source, kind, constant, constant_axis = affine[step]
                if constant.size not in (1, channels) or (constant_axis is not None and (
                        axis is None or self._normalized(constant_axis, step) != axis)):
                    return f"`{target_name(step)}` between {call.name} and it does not act per channel"
                scale, shift = foldmath.compose_step(kind, source is arg(step, "input"), scale, shift, constant)
            else:
                axis = self._map_axis(step, axis)
        aligned = self._aligned(occurrence, axis, call)
        if aligned is not None:
            return aligned
        shared = self._sharers(call, occurrence, path)
        if isinstance(shared, str):
            return shared
        calls, occurrences = shared
        bn_scale, bn_shift = self._per_channel(occurrence, channels)
        if bn_scale is None:
            return f"it has {occurrence.scale.size} channels but {call.name} produces {channels}"
        update = self._producer_update(call, bn_scale * scale, bn_scale * shift + bn_shift)
        update.calls = calls
        bypass = [(step, affine[step][0]) for step in path if step in affine]
        return Fold(FoldDirection.INTO_PRODUCER, [call.name], [update], occurrences, bypass)

    def _split(self, occurrence: Occurrence, cat: fx.Node, path: list[fx.Node]) -> Fold | str:
        tensors = list(arg(cat, "tensors"))
        dim = self._normalized(arg(cat, "dim"), cat)
        reason = self._also_read(occurrence, cat, path, "concatenation") or self._aligned(occurrence, dim, None)
        if reason is not None:
            return reason
        calls = self._branches([(tensor, cat) for tensor in tensors], "concatenated")
        if isinstance(calls, str):
            return calls
        for call, tensor in zip(calls, tensors):
            if self._channel_axis(call, tensor) != dim:
                return f"cannot prove that {call.name}'s output channels lie on the concatenated axis"
        sizes = [_out_channels(self._tensor(c.weight), c) for c in calls]
        scale, shift = self._per_channel(occurrence, sum(sizes))
        if scale is None:
            return f"it has {occurrence.scale.size} channels but the concatenation has {sum(sizes)}"
        bounds = np.cumsum([0, *sizes])
        updates = [self._producer_update(c, scale[a:b], shift[a:b]) for c, a, b in zip(calls, bounds, bounds[1:])]
        return Fold(FoldDirection.SPLIT, [c.name for c in calls], updates, [occurrence])

    def _sum(self, occurrence: Occurrence, add: fx.Node, path: list[fx.Node]) -> Fold | str:
        """BN(a + b) = (s*a + t) + s*b: the scale into every summed layer, the shift into one of them."""
        reason = self._also_read(occurrence, add, path, "sum")
        if reason is not None:
            return reason
        terms = self._terms(add)
        calls = self._branches(terms, "summed")
        if isinstance(calls, str):
            return calls
        ranks = {self._rank(node) for node in [add, *(term for term, _ in terms)]} - {None}
        if len(ranks) > 1:
            return f"the sum broadcasts tensors of ranks {', '.join(map(str, sorted(ranks)))} against each other"
        for call, (term, _) in zip(calls, terms):
            aligned = self._aligned(occurrence, self._channel_axis(call, term), call)
            if aligned is not None:
                return aligned
        sizes = [_out_channels(self._tensor(c.weight), c) for c in calls]
        if len(set(sizes)) > 1:
            return f"the sum broadcasts over channels ({' + '.join(f'{n} from {c.name}' for c, n in zip(calls, sizes))})"
        scale, shift = self._per_channel(occurrence, sizes[0])
        if scale is None:
            return f"it has {occurrence.scale.size} channels but the sum has {sizes[0]}"
        carrier = next((c for c in calls if c.bias is not None), calls[0])  # spares the others a new bias
        updates = [self._producer_update(c, scale, shift if c is carrier else None) for c in calls]
        return Fold(FoldDirection.SUM, [c.name for c in calls], updates, [occurrence])

    def _is_sum(self, node: Any) -> bool:
        """An add of two run-time tensors (x + constant is an affine step, not a sum)."""
        operands = self._summands(node)
        return operands is not None and all(isinstance(v, fx.Node) and not self.constants.is_constant(v)
                                            for v in operands)

    def _summands(self, node: Any) -> tuple[Any, Any] | None:
        """The two operands of an add with alpha 1, or None for any other node. An exported program's
        in-place `out += x` (aten.add_) counts: the sum is the same, and the checks that only the sum reads
        its operands make the mutation harmless."""
        spec = spec_of(node, self.module) if isinstance(node, fx.Node) else None
        if spec is None and isinstance(node, fx.Node) and node.target is torch.ops.aten.add_.Tensor:
            spec = _INPLACE_ADD
        if spec is None or spec.kind != "add" or arg(node, "alpha", spec) != 1:
            return None
        return arg(node, "input", spec), arg(node, "other", spec)

    def _terms(self, add: fx.Node) -> list[tuple[Any, fx.Node]]:
        """(term, the add that reads it) of a chain of adds whose partial sums only the next add reads."""
        terms = []
        for operand in self._summands(add):
            if self._is_sum(operand) and value_users(operand) == [add]:
                terms += self._terms(operand)
            else:
                terms.append((operand, add))
        return terms

    def _also_read(self, occurrence: Occurrence, node: fx.Node, path: list[fx.Node], noun: str) -> str | None:
        """Why the BN is not the only reader of the concatenation or sum `node` it normalizes, if it is not."""
        expected = path[-1] if path else occurrence.reader
        others = [u for u in value_users(node) if u is not expected]
        return f"the {noun} it normalizes also feeds {self._labels(others)}" if others else None

    def _branches(self, inputs: list[tuple[Any, fx.Node]], verb: str) -> list[LayerCall] | str:
        """The conv/linear call behind each (input, reader) pair, when that reader alone reads its output
        and no other call reads its weight (each call takes its own share of the BN); else why not."""
        calls = []
        tensors = [tensor for tensor, _ in inputs]
        for tensor, reader in inputs:
            call = self._layer_call(tensor)
            if isinstance(call, str):
                return call
            if call is None:
                return f"one {verb} input is {self._label(tensor)}, not a conv or linear layer"
            if tensors.count(tensor) > 1:
                return f"{call.name} is {verb} more than once"
            shared = self._shared(call, tensor, reader)
            if shared is not None:
                return shared
            calls.append(call)
        return calls

    def _shared(self, call: LayerCall, tensor: fx.Node, reader: fx.Node) -> str | None:
        """Why changing the call's weights would change more than what `reader` reads of its output `tensor`
        (another op reads that output, or another call the weight), or None."""
        others = [u for u in value_users(tensor) if u is not reader]
        if others:
            return f"{call.name}'s output also feeds {self._labels(others)}"
        if self._readers(call.weight) != [call.node]:
            return f"{call.name} shares its weight with another layer"
        return None

    def _sibling(self, occurrence: Occurrence) -> Fold | str | None:
        """BN(x) + layer(x) = layer'(x), layer' with the BN in its centre tap; None when the BN's output
        reaches no sum in which a conv or linear layer reads x."""
        reached = self._summed(occurrence)
        if reached is None:
            return None
        term, add, scale, shift = reached
        siblings = [(call, tensor, reader) for tensor, reader in self._terms(self._whole_sum(add))
                    if tensor is not term for call in [self._reader_of(tensor, occurrence.input)] if call is not None]
        if not siblings or self._summands(add).count(term) > 1:  # x -> BN -> y + y: no other operand to keep
            return None
        others = [u for u in value_users(term) if u is not add]
        if others:
            return f"it feeds a sum beside {siblings[0][0].name} but also {self._labels(others)}"
        reasons = []
        for call, tensor, reader in siblings:
            reason = self._cannot_take(occurrence, call, tensor, reader)
            if reason is None:
                channels = self._tensor(call.weight).shape[0]
                scale, shift = np.broadcast_to(scale, channels).copy(), np.broadcast_to(shift, channels).copy()
                arithmetic = functools.partial(foldmath.fold_into_sibling, scale=scale, shift=shift,
                                               groups=call.groups)
                other = next(v for v in self._summands(add) if v is not term)
                return Fold(FoldDirection.INTO_SIBLING, [call.name], [Update([call], arithmetic)], [occurrence],
                            bypass=[(add, other)])
            reasons.append(reason)
        return f"the summed {'layer' if len(reasons) == 1 else 'layers'} reading its input cannot take it " \
               f"({', '.join(reasons)})"

    def _summed(self, occurrence: Occurrence) -> tuple[fx.Node, fx.Node, np.ndarray, np.ndarray] | None:
        """(term, the sum that reads it, scale, shift) when the BN's output reaches a sum through constant
        scalar steps only (MobileOne's `0 + identity_out`), with the BN and those steps composed."""
        node, scale, shift = occurrence.output, occurrence.scale, occurrence.shift
        while True:
            users = value_users(node)
            add = next((u for u in users if self._is_sum(u)), None)
            if add is not None:
                return node, add, scale, shift
            step = self._affine_step(users[0], node) if len(users) == 1 else None
            if not isinstance(step, tuple) or step[2].size != 1:
                return None
            scale, shift = foldmath.compose_step(step[1], node is arg(users[0], "input"), scale, shift, step[2])
            node = users[0]

    def _whole_sum(self, add: fx.Node) -> fx.Node:
        """The last add of the chain of adds that `add` is part of (its partial sums read by the next add only)."""
        while len(users := value_users(add)) == 1 and self._is_sum(users[0]):
            add = users[0]
        return add

    def _reader_of(self, tensor: Any, x: fx.Node) -> LayerCall | None:
        """The conv or linear call that makes `tensor` from `x` (directly, through a pad, or followed by a BN
        not folded yet), or None."""
        occurrence = self._at_output.get(tensor) if isinstance(tensor, fx.Node) else None
        call = self._layer_call(occurrence.input if occurrence is not None else tensor)
        if not isinstance(call, LayerCall):
            return None
        source = arg(call.node, "input")
        if isinstance(source, fx.Node) and kind_of(source, self.module) == "pad":
            source = arg(source, "input")
        return call if source is x else None

    def _cannot_take(self, occurrence: Occurrence, call: LayerCall, tensor: fx.Node, reader: fx.Node) -> str | None:
        """Why a summed layer reading the BN's input x cannot absorb BN(x), or None when it can."""
        if tensor is not call.node:
            return f"{call.name}'s output reaches the sum through {self._at_output[tensor].layer}"
        shared = self._shared(call, tensor, reader)
        if shared is not None:
            return shared
        if call.kind == "conv_transpose":
            return f"{call.name} is a transposed convolution"
        weight = self._tensor(call.weight)
        inputs, outputs = weight.shape[1] * call.groups, weight.shape[0]
        channels = occurrence.scale.size
        if inputs != outputs or channels not in (1, outputs):
            return f"{call.name} maps {inputs} channels to {outputs} (the BN has {channels})"
        aligned = self._aligned(occurrence, self._channel_axis(call, occurrence.input), call)
        if aligned is not None:
            return aligned
        return None if call.kind == "linear" else self._centre_tap(call)

    def _centre_tap(self, call: LayerCall) -> str | None:
        """Why the conv's centre tap does not read its input at the output's own position, or None."""
        kernel = tuple(self._tensor(call.weight).shape[2:])
        stride, dilation = (_per_axis(arg(call.node, name), len(kernel)) for name in ("stride", "dilation"))
        misfit = foldmath.centre_tap_misfit(kernel, stride, dilation, self._pads(call, kernel, dilation))
        return f"{call.name} {misfit}" if misfit else None

    def _pads(self, call: LayerCall, kernel: tuple[int, ...], dilation: list[int]) -> list[tuple[int, int]] | None:
        """(before, after) padding per spatial axis that the conv's window sees: its own and a pad op's."""
        padding = arg(call.node, "padding")
        if padding == "same":
            padding = [d * (k - 1) // 2 for d, k in zip(dilation, kernel)]  # symmetric: odd kernels only here
        elif padding == "valid":
            padding = 0
        total = [(p, p) for p in _per_axis(padding, len(kernel))]
        source = arg(call.node, "input")
        if kind_of(source, self.module) != "pad":
            return total
        amounts = arg(source, "pad")
        if not all(isinstance(a, int) and a >= 0 for a in amounts) or len(amounts) > 2 * len(kernel):
            return None
        for axis in range(len(amounts) // 2):  # (before, after) of the last axis first
            before, after = total[-1 - axis]
            total[-1 - axis] = (before + amounts[2 * axis], after + amounts[2 * axis + 1])
        return total

    def _forward(self, occurrence: Occurrence) -> Fold | str | None:
        """Fold into the next conv/linear; None when no single such consumer reads the BN output."""
        path, users = [], value_users(occurrence.output)
        while len(users) == 1 and self._is_layout(users[0]):
            path.append(users[0])
            users = value_users(users[0])
        pad = users[0] if len(users) == 1 and kind_of(users[0], self.module) == "pad" else None
        if pad is not None:
            users = value_users(pad)
        if len(users) != 1:
            return None
        call = self._layer_call(users[0])
        source = pad or (path[-1] if path else occurrence.output)
        if call is None or (isinstance(call, LayerCall) and arg(call.node, "input") is not source):
            return None
        if isinstance(call, str):
            return call
        if call.kind == "conv_transpose":
            return f"{call.name} is a transposed convolution, which spreads the BN shift unevenly over its output"
        axis = self._normalized(occurrence.axis, occurrence.output) if occurrence.axis is not None else None
        for step in path:
            axis = self._map_axis(step, axis) if axis is not None else None
        if occurrence.axis is not None and axis != self._channel_axis(call, source):
            return f"cannot prove that it normalizes {call.name}'s input channels"
        weight = self._tensor(call.weight)
        channels = weight.shape[1] * (call.groups if call.kind == "conv" else 1)
        scale, shift = self._per_channel(occurrence, channels)
        if scale is None:
            return f"it has {occurrence.scale.size} channels but {call.name} reads {channels}"
        padding = self._padding(call, pad)
        if padding == "constant" or (padding == "zeros" and np.any(shift != 0)):
            return (f"{call.name} pads its input with zeros, so the BN shift cannot move into its bias "
                    "(the padded border would not see it)")
        if self._readers(call.weight) != [call.node]:
            return f"{call.name} shares its weight with another layer"
        arithmetic = functools.partial(foldmath.fold_into_consumer, scale=scale, shift=shift, groups=call.groups)
        return Fold(FoldDirection.INTO_CONSUMER, [call.name], [Update([call], arithmetic)], [occurrence])

    def _padding(self, call: LayerCall, pad: fx.Node | None) -> str | None:
        """'zeros' or 'constant' (another value) when the consumer sees padded constants, else None."""
        if pad is not None and arg(pad, "mode") == "constant":
            return "zeros" if (arg(pad, "value") or 0) == 0 else "constant"
        padding = arg(call.node, "padding") if call.kind == "conv" else 0
        if isinstance(padding, str):
            kernel = self._tensor(call.weight).shape[2:]
            return "zeros" if padding == "same" and any(k > 1 for k in kernel) else None
        return "zeros" if any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding])) else None

    def _aligned(self, occurrence: Occurrence, axis: int | None, call: LayerCall | None) -> str | None:
        """None when the occurrence normalizes `axis` of its input (the producer's channels), else why not."""
        if occurrence.axis is None:
            return None
        bn_axis = self._normalized(occurrence.axis, occurrence.input)
        what = f"{call.name}'s output channels" if call else "the concatenated channels"
        if axis is None or bn_axis is None:
            return f"cannot prove that it normalizes {what} (their axis is not known; give an example input)"
        if axis != bn_axis:
            return f"it normalizes axis {bn_axis} of its input, but {what} lie on axis {axis}"
        return None

    def _per_channel(self, occurrence: Occurrence, channels: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        scale, shift = occurrence.scale, occurrence.shift
        if scale.size not in (1, channels) or shift.size not in (1, channels):
            return None, None
        return np.broadcast_to(scale, channels).copy(), np.broadcast_to(shift, channels).copy()

    def _sharers(self, call: LayerCall, occurrence: Occurrence,
                 path: list[fx.Node]) -> tuple[list[LayerCall], list[Occurrence]] | str:
        """All calls reading this weight, when every one is followed by the same BN; else why not."""
        readers = self._readers(call.weight)
        if readers == [call.node]:
            return [call], [occurrence]
        calls, occurrences = [], []
        for reader in readers:
            other = self._layer_call(reader)
            if not isinstance(other, LayerCall) or self._key(other.weight) != self._key(call.weight):
                return f"{call.name}'s weight is also read by {self._label(reader)}"
            follower = self._at_input.get(reader)
            same = (follower is not None and follower.layer == occurrence.layer and not path
                    and value_users(reader) == [follower.reader]
                    and np.array_equal(follower.scale, occurrence.scale)
                    and np.array_equal(follower.shift, occurrence.shift)
                    and self._key(other.bias) == self._key(call.bias))
            if not same:
                names = sorted({self._layer_call(r).name for r in readers} - {call.name})
                shared = f"shares its weight with {', '.join(names)}" if names else f"is called at {len(readers)} places"
                return f"{call.name} {shared}, and not every call is followed by {occurrence.layer}"
            calls.append(other)
            occurrences.append(follower)
        return calls, occurrences

    # ---- graph facts -------------------------------------------------------------------------------------

    def _layer_call(self, node: Any) -> LayerCall | str | None:
        """The conv/linear call at `node`; a reason when its weights are computed; None for other ops."""
        kind = kind_of(node, self.module) if isinstance(node, fx.Node) else None
        if kind not in LAYER_KINDS:
            return None
        weight, bias = arg(node, "weight"), arg(node, "bias")
        stack = module_stack(node)
        if not _stored(weight) or (bias is not None and not _stored(bias)):
            what, computed = ("weight", weight) if not _stored(weight) else ("bias", bias)
            name = self._path(stack[-1][0]) if stack else f"`{target_name(node)}`"  # no module: the op, not its node
            return (f"{name} computes its {what} at run time (from {self._label(computed)}), so there is no "
                    "stored weight to fold into")
        name = self._path(stack[-1][0] if stack else _owner(weight) or node.name)
        if kind == "convolution":
            kind = "conv_transpose" if conv_is_transposed(node) else "conv"
        groups = int(arg(node, "groups")) if kind != "linear" else 1
        return LayerCall(node, name, kind, weight, bias, groups)

    def _not_a_producer(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            where = f"of {self.prefix.rstrip('.')}" if self.prefix else f"`{node.target}` of the model"
            return f"it normalizes the input {where}: there is no layer before it to fold into"
        return f"it follows {self._label(node)}, not a conv or linear layer"

    def _label(self, node: Any) -> str:
        if not isinstance(node, fx.Node):
            return repr(node)
        call = self._layer_call(node)
        if isinstance(call, LayerCall):
            return call.name
        if node.op == "call_module":
            return self._path(str(node.target))
        if kind_of(node, self.module) == "batch_norm":
            return self._op_layer_name(node, arg(node, "running_mean"), {})
        stack = module_stack(node)
        where = f" in {self._path(stack[-1][0])}" if stack else ""
        return f"`{target_name(node)}`{where}"

    def _labels(self, nodes: list[fx.Node]) -> str:
        return ", ".join(dict.fromkeys(self._label(n) for n in nodes))

    def _producer_bias(self, occurrence: Occurrence) -> str | None:
        call = self._layer_call(occurrence.input)
        if not isinstance(call, LayerCall) or call.bias is None:
            return None
        classes = [cls for path, cls in module_stack(call.node) if self._path(path) == call.name]
        return f"{classes[-1] if classes else target_name(call.node)} {call.name}"

    def _is_layout(self, node: fx.Node) -> bool:
        return kind_of(node, self.module) in LAYOUT_KINDS or self._passes_through(node)

    def _passes_through(self, node: fx.Node) -> bool:
        """Whether `node` hands its input on unchanged: an identity, or a whole tensor in one piece."""
        return is_identity(node, self.module) or self._whole(node)

    def _whole(self, node: fx.Node) -> bool:
        """A chunk or split into one piece, that piece, or a cat of one tensor: the value passes through
        unchanged (ghost batch norm's virtual batches, when the batch fits in one)."""
        if node.op != "call_function":
            return False
        if node.target is operator.getitem:
            source = node.args[0]
            return (node.args[1] == 0 and isinstance(source, fx.Node) and target_name(source) in _SPLITS
                    and self._whole(source))
        if target_name(node) in _SPLITS:
            pieces = list(node.users)
            if len(pieces) != 1 or pieces[0].target is not operator.getitem or pieces[0].args[1] != 0:
                return False
            before, after = shape_of(node.args[0]), shape_of(pieces[0])
            if before is not None and after is not None:
                return before == after
            return target_name(node) == "chunk" and (node.args[1] if len(node.args) > 1 else None) == 1
        if kind_of(node, self.module) == "cat":
            tensors = arg(node, "tensors")
            return isinstance(tensors, (list, tuple)) and len(tensors) == 1
        return False

    def _rank(self, node: Any) -> int | None:
        """The rank of a node's tensor: from its shape, or provable from the ops that made it."""
        shape = shape_of(node)
        if shape is not None or not isinstance(node, fx.Node):
            return None if shape is None else len(shape)
        kind = kind_of(node, self.module)
        if kind in LAYER_KINDS and kind != "linear" and _stored(arg(node, "weight")):
            return self._tensor(arg(node, "weight")).dim()  # a batched conv: rank of the weight
        if kind == "flatten":
            start, end = self._flatten_dims(node)
            return start + 1 if end == -1 and start >= 0 else None
        if kind in ("linear", "batch_norm") or is_identity(node, self.module) or _elementwise(node, self.module):
            return self._rank(node.all_input_nodes[0]) if node.all_input_nodes else None
        if target_name(node) in _REDUCTIONS and len(node.args) >= 2 and isinstance(node.args[0], fx.Node):
            rank, dims = self._rank(node.args[0]), node.args[1]
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            return None if rank is None else rank if keep else rank - (len(dims) if isinstance(dims, (list, tuple)) else 1)
        return None

    def _channel_axis(self, call: LayerCall, tensor: fx.Node) -> int | None:
        """The channel axis of a conv/linear's input or output `tensor`: features are last for a linear;
        a conv's channels come after the batch axis, unless the conv runs unbatched."""
        if call.kind == "linear":
            return self._normalized(-1, tensor)
        unbatched = self._rank(tensor) == self._tensor(call.weight).dim() - 1
        return 0 if unbatched else 1

    def _normalized(self, axis: int | None, node: fx.Node) -> int | None:
        if axis is None or axis >= 0:
            return axis
        rank = self._rank(node)
        return axis + rank if rank is not None and axis + rank >= 0 else None

    def _map_axis(self, node: fx.Node, axis: int | None) -> int | None:
        """Where channel `axis` of a layout op's input lies in its output (None: not provable)."""
        if axis is None or self._passes_through(node):
            return axis
        kind, source = kind_of(node, self.module), node.all_input_nodes[0]
        rank = self._rank(source)
        if kind == "transpose" and rank is not None:
            first, second = (d % rank for d in (arg(node, "dim0"), arg(node, "dim1")))
            return {first: second, second: first}.get(axis, axis)
        if kind == "permute" and rank is not None:
            dims = node.args[1:] if node.op == "call_method" and not isinstance(node.args[1], (list, tuple)) \
                else arg(node, "dims")
            return [d % rank for d in dims].index(axis)
        before, after = shape_of(source), shape_of(node)
        if before is not None and after is not None:
            return _reshaped_axis(before, after, axis)
        if kind == "flatten":
            start, _ = self._flatten_dims(node)
            return axis if 0 <= axis < start else None
        return None

    def _flatten_dims(self, node: fx.Node) -> tuple[int, int]:
        if node.op == "call_module":
            module = self.module.get_submodule(str(node.target))
            return module.start_dim, module.end_dim
        return arg(node, "start_dim"), arg(node, "end_dim")

    def _tensor(self, node: Any) -> Any:
        return self.constants.value(node) if node is not None else None

    @staticmethod
    def _float64(value: Any) -> np.ndarray | None:
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", torch.float64).numpy()
        return np.asarray(value, dtype=np.float64)

    def _key(self, node: fx.Node | None) -> tuple | None:
        """Identity of a stored tensor (tied weights are one tensor under two names)."""
        if node is None:
            return None
        tensor = self._tensor(node)
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()))

    def _readers(self, stored: fx.Node) -> list[fx.Node]:
        """Every node that reads the values of a stored tensor, under any of its names."""
        key = self._key(stored)
        readers: list[fx.Node] = []
        for node in self.graph.nodes:
            if node.op == "get_attr" and self._key(node) == key:
                readers += [u for u in value_users(node) if u not in readers]
        return readers

    # ---- rewriting ---------------------------------------------------------------------------------------

    def _producer_update(self, call: LayerCall, scale: np.ndarray, shift: np.ndarray | None) -> Update:
        """Weight and bias after y = scale * layer(x) + shift. Without a shift (a summed layer that leaves
        it to another) a layer without bias stays without one."""
        offset = np.zeros_like(scale) if shift is None else shift
        if call.kind == "conv_transpose":
            arithmetic = functools.partial(foldmath.fold_into_conv_transpose, scale=scale, shift=offset,
                                           groups=call.groups)
        else:
            arithmetic = functools.partial(foldmath.fold_into_producer, scale=scale, shift=offset)
        return Update([call], arithmetic, biased=shift is not None or call.bias is not None)

    def _apply(self, fold: Fold) -> None:
        for update in fold.updates:
            self._store(update)
        for occurrence in fold.occurrences:
            output = occurrence.output
            output.replace_all_uses_with(occurrence.input)
            self._erase_dead([output])
        for node, source in fold.bypass:  # after the BN: its input may be one of them
            node.replace_all_uses_with(source)
            self._erase_dead([node])

    def _store(self, update: Update) -> None:
        first = update.calls[0]
        weight = self._tensor(first.weight)
        deferred = Deferred(update.arithmetic, weight, self._tensor(first.bias))
        self._deferred.append(deferred)
        deferred.results.append(self._stand_in(str(first.weight.target), weight.shape, weight))
        if not update.biased:
            return
        bias_shape = (_out_channels(weight, first),)
        nodes = [c.node for c in update.calls]
        if first.bias is not None and self._readers(first.bias) == nodes:
            deferred.results.append(self._stand_in(str(first.bias.target), bias_shape, weight))
            return
        target = _free_target(self.module, f"{str(first.weight.target).rpartition('.')[0]}.bias".lstrip("."))
        deferred.results.append(self._stand_in(target, bias_shape, weight))
        earliest = next(n for n in self.graph.nodes if n in nodes)
        with self.graph.inserting_before(earliest):
            bias_node = self.graph.get_attr(target)
        old = [c.bias for c in update.calls if c.bias is not None]
        for call in update.calls:
            set_arg(call.node, "bias", bias_node)
        self._erase_dead(old)

    def _stand_in(self, target: str, shape: tuple[int, ...], like: torch.Tensor) -> tuple[str, torch.Tensor]:
        """Put a tensor of `shape` and `like`'s dtype and device that holds one element under `target`."""
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return target, assign(self.module, target, zero.expand(shape), like)

    def _erase_dead(self, nodes: list[fx.Node]) -> None:
        """Erase nodes left without users by a fold, and then their inputs that are left without users."""
        work = list(nodes)
        while work:
            node = work.pop()
            if node.graph is not self.graph or node.op in ("placeholder", "output"):
                continue
            checks = [u for u in node.users if u.target is torch.ops.aten._assert_tensor_metadata.default]
            if len(checks) == len(node.users):  # export's dtype checks on a value nobody else reads
                for check in checks:
                    self.graph.erase_node(check)
            if node.users:
                continue
            inputs = node.all_input_nodes
            self.graph.erase_node(node)
            work += inputs


def _per_axis(value: Any, axes: int) -> list[int]:
    """A conv's stride, padding or dilation as one value per spatial axis."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values * axes if len(values) == 1 else values


def _reshaped_axis(before: tuple, after: tuple, axis: int) -> int | None:
    """The output axis that holds input axis `axis` unchanged through a reshape, if one provably does.

    Row-major reshapes keep flat indices: channel c at input axis a is flat (outer, c, inner). An output
    axis of the same size whose trailing dims have the same product holds exactly the same channel.
    """
    if axis >= len(before) or not all(isinstance(d, int) for d in before[axis:]):
        return None
    channels, inner = before[axis], math.prod(before[axis + 1:])
    for candidate, size in enumerate(after):
        tail = after[candidate + 1:]
        if size == channels and isinstance(size, int) and all(isinstance(d, int) for d in tail) \
                and math.prod(tail) == inner:
            return candidate
    return None


def _out_channels(weight: torch.Tensor, call: LayerCall) -> int:
    return weight.shape[1] * call.groups if call.kind == "conv_transpose" else weight.shape[0]


def _stored(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _owner(node: Any) -> str | None:
    return str(node.target).rpartition(".")[0] or None if _stored(node) else None


_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_ELEMENTWISE = {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu", "elu", "mish",
                "hardtanh", "hardsigmoid"}


def _elementwise(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))).__name__.lower() in _ELEMENTWISE
    return target_name(node).rstrip("_") in _ELEMENTWISE


def _values(tensor: torch.Tensor | None) -> np.ndarray | None:
    """A stored tensor's values for `foldmath`, which makes the one float64 copy itself: a view where
    numpy has the dtype (a float64 copy first would double what folding the largest layer costs)."""
    if tensor is None:
        return None
    tensor = tensor.detach().cpu()
    return (tensor.double() if tensor.dtype is torch.bfloat16 else tensor).numpy()


def _rounded(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """float64 results rounded once to `like`'s dtype, on its device; laid out in memory as `like` is when
    they replace it, so a channels_last model's folded conv weights stay channels_last."""
    if like.dtype is torch.bfloat16:
        rounded = torch.from_numpy(foldmath.bfloat16_bits(values).view(np.int16)).view(torch.bfloat16)
    else:
        dtype = str(like.dtype).removeprefix("torch.")
        rounded = torch.from_numpy(np.ascontiguousarray(foldmath.round_to(values, dtype)))
    if rounded.shape == like.shape:
        return torch.empty_like(like, requires_grad=False).copy_(rounded)
    return rounded.to(like.device)


def assign_rounded(root: nn.Module, target: str, values: np.ndarray, like: torch.Tensor) -> None:
    """Store float64 `values` rounded once to `like`'s dtype under `target` (see `assign`)."""
    assign(root, target, _rounded(values, like), like)


def assign(root: nn.Module, target: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Store `tensor` under `target` (replacing what is there): a buffer where a buffer was, else a
    parameter when `like` is one. Returns what is stored."""
    path, _, name = target.rpartition(".")
    owner = owner_at(root, path)
    if name in owner._buffers:
        owner._buffers[name] = tensor
    elif isinstance(like, nn.Parameter):
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=like.requires_grad)
    else:
        owner.register_buffer(name, tensor)
    return getattr(owner, name)


def _free_target(root: nn.Module, wanted: str) -> str:
    candidate, number = wanted, 0
    while True:
        try:
            fetch_attr(root, candidate)
        except AttributeError:
            return candidate
        number += 1
        candidate = f"{wanted}_folded{number if number > 1 else ''}"
