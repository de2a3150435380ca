"""The PyTorch engine: capture a graph, fold it, hand back the folded model in the input's format.

Output formats (the folded model always loads with torch alone, never needing bnfold):

- `.pt2` in, `.pt2` out: the folded graph is exported again with the input program's dynamic shapes.
- pickled module in, pickled module out: an `fx.GraphModule` (pickled as generated Python code plus its
  tensors), streamlined for eager calls (`bnfold.pytorch.streamline`). Leaf modules that stay opaque
  (e.g. a BN kept in training mode) keep their own classes.
- TorchScript in, TorchScript out: the archive is converted with torch.export's TorchScript converter,
  folded at aten level and traced back with `torch.jit.trace` on the example input, so the output
  follows the control-flow path of that input (the converter specializes Python constants anyway). The
  trace is run at other batch sizes and spatial sizes, and a note names each input size it is fixed to
  where the TorchScript model runs at others.
- state_dict + factory in: the factory's architecture still holds its BN modules, so no state_dict can
  say "this BN is gone". The folded model is written as a torch.export program (also when nothing
  folds, so the output is always one format; `bnfold.folding` refuses an output not named `.pt2`) or,
  when the folded graph cannot be exported, as a pickled GraphModule; the report's notes say which.

A model that no capture takes whole (it branches on tensor values) is folded module by module
(`bnfold.pytorch.modulewise`): the output is a copy of the model itself, with folded parts replaced by
GraphModules, so its pickle needs the model's own classes just like the input did.

A model inside nn.DataParallel, DistributedDataParallel or torch.compile's wrapper is captured, folded and
run as the model the wrapper holds (`inner_model`), its layers named by their paths in the wrapper
(`module.1`, `_orig_mod.1`). The folded model comes back in a copy of a DataParallel wrapper, and bare from
DistributedDataParallel and torch.compile (the notes say why: wrapping is a call every rank must make, and a
model is compiled where it runs).
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from bnfold.errors import UsageError, first_line
from bnfold.layers import FoldDecision, FoldStatus
from bnfold.model import Model, ModelFormat
from bnfold.plan import FoldOptions, FoldPlan
from bnfold.pytorch.capture import (MODULEWISE, RENAMED, SIZE_ARITHMETIC, Capture, CaptureFailed, capture_module,
                                    capture_program, capture_script, integral, private_copy, quiet,
                                    widened)
from bnfold.pytorch.fold import NO_STATS, GraphFolder
from bnfold.pytorch.modulewise import fold_by_module
from bnfold.pytorch.model import (ExportedProgramModel, ModuleModel, TorchScriptModel, inner_model, like_input,
                                  program_module, wrapper_notes)
from bnfold.pytorch.ops import may_write
from bnfold.pytorch.quantization import disable_observers, holds_quantizers, observers_frozen
from bnfold.pytorch.state import buffers_kept
from bnfold.pytorch.streamline import streamline
from bnfold.verify import random_batches

Batch = dict[str, np.ndarray]
NOT_FOUND = ("not found in the captured computation: the forward never calls it, or computes it in a way "
             "bnfold does not recognise")


class TorchEngine:
    """Plan, apply and run for ExportedProgram, TorchScript and eager (pickled or factory-built) models."""

    modes = ("PyTorch eager",)

    def __init__(self) -> None:
        self._programs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def plan(self, model: Model, options: FoldOptions = FoldOptions()) -> FoldPlan:
        layers = model.bn_layers()
        try:
            capture = self._capture(model, options.example_batch)
            folder = GraphFolder(capture.module, _held_at(model))
            found = folder.fold_all()
            build = folder.folded  # the folded weights are computed only when applied
        except CaptureFailed as failure:
            if not isinstance(model, ModuleModel):
                reason = "not analysed (see above)"  # the failure is the model's, reported once for all layers
                # a BN without running statistics never folds, analysed or not: it says so as in eager models
                return FoldPlan([FoldDecision(layer.name, FoldStatus.KEPT,
                                              reason=reason if layer.track_running_stats else NO_STATS)
                                 for layer in layers], failure=str(failure))
            capture, found = _fold_by_module(model, options.example_batch, failure)
            build = functools.partial(private_copy, capture.module)
        decisions = [found.pop(layer.name, None) or FoldDecision(layer.name, FoldStatus.KEPT, reason=NOT_FOUND)
                     for layer in layers]
        notes = [capture.note] if capture.note else []
        if any(decision.status is FoldStatus.FOLDABLE for decision in decisions):
            notes += _renaming_note(capture.module)
        return FoldPlan(decisions + list(found.values()), actions=[capture, build], notes=notes)

    def apply(self, model: Model, plan: FoldPlan, into: ModelFormat | None = None) -> Model:
        if not plan.foldable and model.format is not ModelFormat.STATE_DICT:
            return model  # nothing folds: the model as it is, in its own format (a state_dict's is not kept)
        capture, build = plan.actions
        with quiet():
            folded = build()
        if isinstance(model, ExportedProgramModel):
            return ExportedProgramModel(model.path, _reexport(folded, model.program, capture.example))
        if isinstance(model, TorchScriptModel):
            with quiet(), torch.no_grad(), buffers_kept(folded):  # the trace shares them: its runs move them too
                traced, notes = _traced_back(folded, capture.example, model.module)
            plan.notes.extend(notes)
            return TorchScriptModel(model.path, traced)
        assert isinstance(model, ModuleModel)
        folded, _ = inner_model(folded)  # module by module, a wrapper was folded with its model
        streamline(folded)  # eager outputs run the folded graph's Python code on every call
        if model.format is ModelFormat.PICKLE:
            plan.notes.extend(wrapper_notes(model.module))
            return ModuleModel(model.path, like_input(model.module, folded), ModelFormat.PICKLE)
        return _state_dict_output(model, folded, capture, plan, into)

    def folded_format(self, model: Model, output: Path | None = None) -> ModelFormat:
        # a state_dict cannot drop the BN modules of the factory's class: it is written as a program, or
        # as a pickled module where the output is named so (.pt, .pth)
        if model.format is not ModelFormat.STATE_DICT:
            return model.format
        pickled = output is not None and output.suffix in (".pt", ".pth")
        return ModelFormat.PICKLE if pickled else ModelFormat.EXPORTED_PROGRAM

    def run(self, model: Model, batch: Batch) -> list[np.ndarray]:
        inputs, function = _inputs(model, batch), self._callable(model)
        # a QAT model's observers would learn from the batch, a BN fixed in training mode move its statistics
        with torch.no_grad(), observers_frozen(function), buffers_kept(function):
            outputs = function(*inputs)
        return [_numpy(t) for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]

    def outputs(self, model: Model, batches: Sequence[Batch]) -> list[list[np.ndarray]]:
        return [self.run(model, batch) for batch in batches]

    def prepare(self, model: Model, batch: Batch, mode: str = modes[0]) -> Callable[[], object]:
        inputs, function = _inputs(model, batch), self._callable(model)
        # timed thousands of times: too often to freeze quantizers and restore buffers around each call
        quantized = holds_quantizers(function)
        if quantized or _writes_buffers(function, inputs):
            with quiet():  # deepcopy of a program's module warns of torch's own pytree deprecation
                function = private_copy(function)
        if quantized:
            disable_observers(function)

        def forward() -> object:
            with torch.inference_mode():
                return function(*inputs)

        return forward

    def _capture(self, model: Model, batch: Batch | None) -> Capture:
        if isinstance(model, ExportedProgramModel):
            capture = capture_program(model.program)
            batch = batch or random_batches(model.input_specs(), None, count=1)[0]
            capture.example = _inputs(model, batch)
            return capture
        example = _inputs(model, batch) if batch is not None else None
        if isinstance(model, TorchScriptModel):
            return capture_script(model.module, example)
        assert isinstance(model, ModuleModel)
        return capture_module(inner_model(model.module)[0], example, model.owned)

    def _callable(self, model: Model) -> Callable:
        if isinstance(model, ExportedProgramModel):
            if model.program not in self._programs:
                self._programs[model.program] = _runnable(model.program)
            return self._programs[model.program]
        return inner_model(model.module)[0]  # type: ignore[attr-defined]


def _writes_buffers(function: Callable, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether one forward of `function` writes into its buffers (which are then put back)."""
    with torch.inference_mode(), observers_frozen(function), buffers_kept(function) as changed:
        function(*inputs)
    return bool(changed)


def _runnable(program: torch.export.ExportedProgram) -> nn.Module:
    """`program.module()` with private copies of the buffers its graph writes (a BN exported in training
    mode updates its statistics): the unlifted module shares the program's tensors, so running it would
    change the caller's program, and the folded program made from it, whose file would keep the change."""
    module = program_module(program)
    buffers = {name for name, _ in module.named_buffers(remove_duplicate=False)}
    written = {str(source.target) for node in module.graph.nodes if may_write(node)
               for source in node.all_input_nodes if source.op == "get_attr" and str(source.target) in buffers}
    for name in written:
        owner, _, attribute = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        holder._buffers[attribute] = holder._buffers[attribute].clone()
    return module


def _held_at(model: Model) -> str:
    """Where the captured model is in `model`: its path in wrappers (`module`, `_orig_mod`), else ''."""
    return inner_model(model.module)[1] if isinstance(model, ModuleModel) else ""


def _renaming_note(captured: nn.Module) -> list[str]:
    """What the folded graph calls the model's attributes that a GraphModule's own names hide."""
    renamed = captured.meta.get(RENAMED) if isinstance(captured, fx.GraphModule) else None
    if not renamed:
        return []
    names = ", ".join(f"{name} as {new}" for new, name in renamed.items())
    return [f"the folded model holds {names} (a torch.fx GraphModule uses those names itself), so its "
            "state_dict keys start with the new names"]


def _fold_by_module(model: ModuleModel, batch: Batch | None, failure: CaptureFailed) -> tuple[Capture, dict]:
    """The fallback for models no capture takes whole: fold each part that traces on its own."""
    why = ("neither symbolic tracing nor torch.export captures the model whole" if batch is not None
           else "the model does not trace symbolically (an example input would let torch.export try)")
    folded, found = fold_by_module(model.module, why)
    example = _inputs(model, batch) if batch is not None else None
    return Capture(folded, MODULEWISE, example, note=f"{failure}: folded module by module instead"), found


def _inputs(model: Model, batch: Batch) -> tuple[torch.Tensor, ...]:
    """A batch as tensors, floating inputs in the dtype the model expects."""
    if isinstance(model, ExportedProgramModel):
        dtypes = [getattr(torch, spec.dtype, None) for spec in model.input_specs()]
    else:
        dtype = next((t.dtype for t in [*model.module.parameters(), *model.module.buffers()]  # type: ignore
                      if t.is_floating_point() and t.dim()), None)  # 0-dim: a traced Python number (float64)
        dtypes = [dtype] * len(batch)
    tensors = []
    for array, dtype in zip(batch.values(), dtypes + [None] * len(batch)):
        # a copy: a model may write its input in place (x.mul_(2)), and the same batch runs through the
        # folded model next (the data layer hands out read-only views of the user's arrays)
        tensor = torch.from_numpy(np.array(array))
        if dtype is not None and tensor.is_floating_point() and dtype.is_floating_point:
            tensor = tensor.to(dtype)
        tensors.append(tensor)
    return tuple(tensors)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype is torch.bfloat16 else tensor).numpy()


aten = torch.ops.aten
# The Python bindings of the size queries torch.export's TorchScript converter writes as aten ops.
_SIZE_BINDINGS = {aten.sym_size.int: torch.Tensor.size, aten.sym_numel.default: torch.Tensor.numel}
# A traced TorchScript model computes on sizes as 0-dim tensors (`h - 2`, `c // 2`): the converter writes
# that as scalar_tensor, aten arithmetic (on lifted 0-dim constants), _to_copy to an integer type and
# _local_scalar_dense. Capture computes most such chains as ints before export (`capture._size_tensors_as_ints`);
# in what export still holds of one, the first, third and fourth only move a size between int and tensor,
# and the arithmetic is written back as the Python operators on the sizes themselves.
_SIZE_ROUND_TRIP = {aten.scalar_tensor.default, aten._to_copy.default, aten._local_scalar_dense.default}
# The run-time checks export adds on the sizes the converter made up: a trace would run them once, on the
# example, and record nothing.
_SIZE_CHECKS = {aten._assert_scalar.default, aten.sym_constrain_range.default,
                aten.sym_constrain_range_for_size.default}


def _slice(tensor: torch.Tensor, dim: int = 0, start: int | None = None, end: int | None = None,
           step: int = 1) -> torch.Tensor:
    """`aten.slice.Tensor` as Python indexing, which the tracer records with its bounds (no binding has the name)."""
    return tensor[(slice(None),) * (dim % tensor.dim()) + (slice(start, end, step),)]


_OWN_BINDINGS = {aten.slice.Tensor: _slice}


def _traced_back(module: fx.GraphModule, example: tuple[torch.Tensor, ...],
                 original: torch.jit.ScriptModule) -> tuple[torch.jit.ScriptModule, list[str]]:
    """The folded graph as TorchScript again, traced on `example`, and notes naming each input size it runs
    at alone where the `original` runs at others. The shape arithmetic is made traceable first
    (`_sizes_traceable`); each op given a Python binding keeps it only where the binding computes what the
    op did (one with other arguments goes back to the op). The trace is then run at other sizes against
    the graph (`_size_checks`) and against the `original` (twice plus one): what still records a size as a
    constant, a size the converter made constant, or a branch on a size shows there and is said rather
    than handed back unnoticed."""
    groups = _size_groups(module, example)
    traceable = fx.GraphModule(module, copy.deepcopy(module.graph))  # the rewrite's own graph, the same tensors
    rewritten = _sizes_traceable(traceable)
    symbolic = [axis for axes, dynamic in groups if dynamic for axis in axes]
    rows = [axis for axis in symbolic if axis[1] == 0]  # the batch, where the graph holds it as a symbol
    checks = _size_checks(example, symbolic, rows)
    try:
        expected = [_checked_bindings(traceable, rewritten, inputs) for inputs in checks]  # the graph's outputs
    except Exception:  # the graph does not take other sizes: check the bindings where it runs
        expected = None
        try:
            _checked_bindings(traceable, rewritten, example)
        except Exception:  # an op without a binding takes no Python number: the graph as the converter wrote
            traceable = module  # it is traced, which fixes sizes, and the checks below say which
    _numbers_unregistered(traceable, original)
    traced = torch.jit.trace(traceable, example, check_trace=False)
    generalizes = bool(checks) and expected is not None and all(  # at every size the graph holds as a symbol
        _differs(traced, inputs, outputs, _same, "the folded graph") is None
        for inputs, outputs in zip(checks, expected))
    fixed: dict[str, list[tuple[list[Axis], str]]] = {"trace": [], "converter": []}
    for axes, dynamic in groups:
        if dynamic and generalizes:
            continue
        found = _unlike(traced, module, _resized(example, axes), original, dynamic)
        if found is not None:
            cause, problem = found
            fixed[cause].append((axes, problem))
    notes = [f"the folded TorchScript model runs at the --input-shape {_fixed_sizes(example, fixed['trace'])}: "
             "torch.jit.trace wrote the example's sizes into shape arithmetic bnfold cannot trace"] \
        if fixed["trace"] else []
    if fixed["converter"]:
        notes.append(f"the folded TorchScript model is made for the --input-shape "
                     f"{_fixed_sizes(example, fixed['converter'])}, where the TorchScript model also runs at "
                     "others: torch.export's TorchScript converter fixed those sizes in the graph bnfold folds; "
                     "fold at the sizes the model is to run at")
    said = [axes for found in fixed.values() for axes, _ in found]  # sizes a note names already
    unsaid = [(axes, dynamic) for axes, dynamic in groups if axes not in said]
    bases = [_first_rows(example, rows), example] if generalizes and rows else [example]
    if branched := _odd_size_branches(traced, bases, unsaid, original):
        notes.append(f"the folded TorchScript model takes the model's branch for the --input-shape "
                     f"{_fixed_sizes(example, branched, odd=True)}: the model branches on that size (on its parity, "
                     "say), and a trace keeps the example's branch; fold at the sizes the model is to run at")
    return traced, notes


def _size_checks(example: tuple[torch.Tensor, ...], symbolic: list[Axis],
                 rows: list[Axis]) -> list[tuple[torch.Tensor, ...]]:
    """The inputs to check the trace at against the graph, for the `symbolic` axes: one more batch row
    (`rows`) at the example's other sizes, and twice every other size at one batch row. A forward at twice
    every size costs four times the example's per row; run at the example's batch plus one, as one check
    with the batch's, it was most of a ResNet-50 fold's size checks. The batch is checked at more rows
    than the example's, not at one: a fixed `x[:2]` in the trace clamps to one row and computes alike."""
    sizes = [axis for axis in symbolic if axis[1]]
    return [_resized(base, axes) for base, axes in ((example, rows), (_first_rows(example, rows), sizes)) if axes]


def _first_rows(example: tuple[torch.Tensor, ...], rows: list[Axis]) -> tuple[torch.Tensor, ...]:
    """`example` with each input whose axis 0 is among `rows` cut to its first batch row."""
    return tuple(tensor[:1] if (index, 0) in rows else tensor for index, tensor in enumerate(example))


def _odd_size_branches(traced: torch.jit.ScriptModule, bases: list[tuple[torch.Tensor, ...]],
                       groups: list[tuple[list[Axis], bool]],
                       original: torch.jit.ScriptModule) -> list[tuple[list[Axis], str]]:
    """The sizes (other than the batch) the graph holds as symbols at whose odd values (twice plus one) the
    trace computes otherwise than the `original`, with what goes wrong. A branch on a size's parity
    (`if w % 2 == 1: pad`) is a guard torch.export records and the trace drops; twice a size is even, so
    the checks at twice every size never take the other branch. The sizes are made odd in the first of
    the example inputs `bases` at which the original runs there (one batch row where the batch is free, a
    quarter of the cost at a batch of 4; the example's, where the original takes no other)."""
    spatial = [axes for axes, dynamic in groups if dynamic and all(axis for _, axis in axes)]

    def problem(groups_: list[list[Axis]]) -> str | None:
        for base in bases:
            inputs = _resized(base, [axis for axes in groups_ for axis in axes], odd=True)
            expected = _outputs(original, inputs)
            if expected is not None:
                return _differs(traced, inputs, expected[0], _close, "the TorchScript model")
        return None

    if not spatial or problem(spatial) is None:
        return []
    return [(axes, found) for axes in spatial if (found := problem([axes])) is not None]


def _numbers_unregistered(module: fx.GraphModule, original: torch.jit.ScriptModule) -> None:
    """Hold the 0-dim buffers of `module`'s top level that the `original` does not hold as plain attributes:
    they are the converter's lifted Python numbers (the 0.5 a traced `x * 0.5` recorded), which torch.fx
    registers as buffers. torch.jit.trace records a plain attribute as a constant of the graph; a buffer
    stayed one, and the folded model's state_dict and parameter count held the number."""
    held = set(original.state_dict())
    for name, tensor in list(module._buffers.items()):
        if tensor is not None and tensor.dim() == 0 and name not in held:
            del module._buffers[name]
            setattr(module, name, tensor)


Axis = tuple[int, int]  # (input, axis)


def _size_groups(module: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> list[tuple[list[Axis], bool]]:
    """The input axes that share one size in the graph (the batch of every input), each group with whether
    the graph holds that size as a symbol (torch.export's placeholder metadata) rather than a constant."""
    groups: dict[object, list[Axis]] = {}
    placeholders = [node for node in module.graph.nodes if node.op == "placeholder"]
    for index, (tensor, node) in enumerate(zip(example, placeholders)):
        shape = getattr(node.meta.get("val"), "shape", None)
        for axis in range(tensor.dim()):
            size = shape[axis] if shape is not None and len(shape) == tensor.dim() else None
            symbol = size.node.expr if isinstance(size, torch.SymInt) and not size.node.expr.is_number else None
            groups.setdefault(symbol if symbol is not None else (index, axis), []).append((index, axis))
    return [(axes, not isinstance(key, tuple)) for key, axes in groups.items()]


def _resized(example: tuple[torch.Tensor, ...], axes: list[Axis], odd: bool = False) -> tuple[torch.Tensor, ...]:
    """`example` one batch row longer on axis 0 and twice as long on each other axis of `axes` (a stride or
    a pooling window divides twice a size it divides), or, `odd`, twice plus one."""
    resized = list(example)
    for index, axis in axes:
        tensor = resized[index]
        parts = [tensor, tensor[:1]] if axis == 0 else [tensor, tensor] + ([tensor.narrow(axis, 0, 1)] if odd else [])
        resized[index] = torch.cat(parts, dim=axis)
    return tuple(resized)


def _unlike(traced: torch.jit.ScriptModule, module: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
            original: torch.jit.ScriptModule, symbolic: bool) -> tuple[str, str] | None:
    """Why the folded model may not compute at `inputs` what the model does, where the sizes changed are
    `symbolic` in the graph or constants of it: the trace's fault ("trace", and what goes wrong: it computes
    otherwise than the graph), or the converter's ("converter": the graph fails, or holds the size as a
    constant, and what goes wrong if anything: the trace computes otherwise than the `original`, within
    folding's rounding); None where it computes alike, or where the original does not run either (a
    channel count)."""
    if symbolic:
        try:
            expected = module(*inputs)
        except Exception as error:
            return ("converter", first_line(error)) if _outputs(original, inputs) is not None else None
        problem = _differs(traced, inputs, expected, _same, "the folded graph")
        return None if problem is None else ("trace", problem)
    expected = _outputs(original, inputs)
    if expected is None:
        return None
    return "converter", _differs(traced, inputs, expected[0], _close, "the TorchScript model") or ""


def _outputs(original: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...]) -> tuple[object] | None:
    """The original's outputs at `inputs` (its buffers left as they were), or None where it fails."""
    try:
        with buffers_kept(original):
            return (original(*inputs),)
    except Exception:  # the model itself takes only the example's size here
        return None


def _differs(traced: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...], expected: object,
             alike: Callable[[object, object], bool], source: str) -> str | None:
    """What goes wrong running `traced` at `inputs` (its error, or other outputs than `expected`, which
    `source` computed), else None."""
    try:
        outputs = traced(*inputs)
    except Exception as error:
        return first_line(error)
    return None if alike(outputs, expected) else f"other outputs than {source}"


def _close(actual: object, expected: object) -> bool:
    """Equal leaves, tensors of equal dtype and shape whose values differ by no more than folding rounds."""
    leaves, wanted = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    return len(leaves) == len(wanted) and all(
        a.dtype == b.dtype and a.shape == b.shape and _near(a.double(), b.double())
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else type(a) is type(b) and a == b
        for a, b in zip(leaves, wanted))


def _near(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return torch.allclose(a, b, rtol=1e-3, atol=1e-3 * scale, equal_nan=True)


def _fixed_sizes(example: tuple[torch.Tensor, ...], fixed: list[tuple[list[Axis], str]], odd: bool = False) -> str:
    """'batch size (2) alone (at 3: why)': each group's size in `example`, and what goes wrong at others
    (`odd`: at twice plus one, and the sizes not said to be the only ones)."""
    several = sum(tensor.dim() > 0 for tensor in example) > 1
    sizes, failures = [], []
    for axes, problem in fixed:
        index, axis = axes[0]
        size = example[index].shape[axis]
        where = f" of input {index + 1}" if several and axis else ""
        sizes.append(f"batch size ({size})" if axis == 0 else f"size of axis {axis}{where} ({size})")
        failure = f"at {size + 1 if axis == 0 else 2 * size + odd}: {problem}"
        if problem and failure not in failures:  # the sizes of one view fail alike
            failures.append(failure)
    return " and ".join(sizes) + ("" if odd else " alone") + (f" ({'; '.join(failures)})" if failures else "")


def _sizes_traceable(module: fx.GraphModule) -> dict[fx.Node, torch._ops.OpOverload]:
    """Rewrite `module` (the fold's own copy) so that torch.jit.trace records its shape arithmetic; returns
    the nodes whose aten op was given a Python binding, each with its op.

    The tracer follows a size through the Python bindings alone (`x.size(0)`, `x.view(n, -1)`): through
    `aten.sym_size.int` and an aten call such as `aten.view.default` it writes the example's numbers, and a
    folded ShuffleNet (`x.view(batchsize, groups, ...)`), YOLO head or `x.view(x.size(0), -1)` then ran at
    the batch size of `--input-shape` alone. Size queries and arithmetic on them are rewritten to Python,
    and the aten ops that take sizes to their bindings; an op with no binding stays as it is.
    """
    sizes: set[fx.Node] = set()
    inlined: set[str] = set()
    rewritten: dict[fx.Node, torch._ops.OpOverload] = {}
    for node in list(module.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _SIZE_CHECKS:
            module.graph.erase_node(node)
        elif node.target in _SIZE_BINDINGS:
            node.target = _SIZE_BINDINGS[node.target]
            sizes.add(node)
        elif not sizes.intersection(node.all_input_nodes):
            continue
        elif not isinstance(node.target, torch._ops.OpOverload):
            sizes.add(node)  # Python arithmetic on sizes: traced as such
        elif node.target in _SIZE_ROUND_TRIP and node.args[0] in sizes and integral(node):
            node.replace_all_uses_with(node.args[0])
            module.graph.erase_node(node)
        elif node.target in SIZE_ARITHMETIC and not node.kwargs:
            node.target = SIZE_ARITHMETIC[node.target]
            node.args = tuple(_number(module, arg, inlined) for arg in node.args)
            sizes.add(node)
        elif (binding := _binding(node.target)) is not None:
            rewritten[node] = node.target
            node.target = binding
    module.graph.eliminate_dead_code()
    read = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name in inlined - read:
        delattr(module, name)
    module.recompile()
    return rewritten


def _number(module: fx.GraphModule, arg: object, inlined: set[str]) -> object:
    """`arg`, or the Python number a lifted 0-dim constant of the converter holds."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and "." not in str(arg.target):
        value = getattr(module, str(arg.target))
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            inlined.add(str(arg.target))
            return value.item()
    return arg


def _binding(op: torch._ops.OpOverload) -> Callable | None:
    """The Python function or method of an aten op's name, which the tracer records with its size arguments."""
    name = op.overloadpacket.__name__
    return _OWN_BINDINGS.get(op) or next((getattr(space, name) for space in (torch.Tensor, torch, torch._C._nn)
                                          if hasattr(space, name)), None)


class _BindingCheck(fx.Interpreter):
    """Runs a graph with the ops `rewritten` maps, noting each node whose binding computes otherwise or fails."""

    def __init__(self, module: fx.GraphModule, rewritten: dict[fx.Node, torch._ops.OpOverload]) -> None:
        super().__init__(module)
        self.rewritten = rewritten
        self.failed: list[fx.Node] = []

    def run_node(self, node: fx.Node) -> object:
        if node not in self.rewritten:
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        expected = self.rewritten[node](*args, **kwargs)
        try:
            agrees = _same(node.target(*args, **kwargs), expected)
        except Exception:  # e.g. a binding that takes other arguments (TypeError)
            agrees = False
        if not agrees:
            self.failed.append(node)
        return expected


def _checked_bindings(module: fx.GraphModule, rewritten: dict[fx.Node, torch._ops.OpOverload],
                      inputs: tuple[torch.Tensor, ...]) -> object:
    """Run `module` on `inputs`, give each binding that does not compute as its op the op back; the outputs."""
    check = _BindingCheck(module, rewritten)
    outputs = check.run(*inputs)
    for node in check.failed:
        node.target = rewritten[node]
    module.recompile()
    return outputs


def _same(actual: object, expected: object) -> bool:
    """Equal leaves, tensors of equal dtype, shape and values (NaN equal to NaN)."""
    leaves, wanted = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    return len(leaves) == len(wanted) and all(
        torch.equal(a, b) or (a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, 0, 0, equal_nan=True))
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else type(a) is type(b) and a == b
        for a, b in zip(leaves, wanted))


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], dynamic) -> torch.export.ExportedProgram:
    with quiet():
        return torch.export.export(module, widened(example, dynamic), dynamic_shapes=dynamic, strict=False)


def _reexport(module: nn.Module, program: torch.export.ExportedProgram,
              example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """Export the folded graph with the same dynamic dimensions (and ranges) as the input program."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        value = node.meta.get("val")
        spec = {}
        for axis, size in enumerate(getattr(value, "shape", ())):
            if isinstance(size, torch.SymInt):
                spec[axis] = _dim(size, program, dims)
        shapes.append(spec)
    return _export(module, example, tuple(shapes))


def _dim(size: torch.SymInt, program: torch.export.ExportedProgram, dims: dict[str, torch.export.Dim]):
    expr = size.node.expr
    bounds = program.range_constraints.get(expr)
    if not getattr(expr, "is_Symbol", False) or bounds is None:
        return torch.export.Dim.AUTO
    if str(expr) not in dims:
        try:
            upper = int(bounds.upper)
        except (TypeError, ValueError, AttributeError):
            upper = None
        limits = {"min": int(bounds.lower), **({"max": upper} if upper is not None else {})}
        dims[str(expr)] = torch.export.Dim(str(expr), **limits)
    return dims[str(expr)]


def _state_dict_output(model: ModuleModel, folded: nn.Module, capture: Capture, plan: FoldPlan,
                       into: ModelFormat | None) -> Model:
    """A state_dict cannot say a BN is gone: the folded module as a .pt2 program (`into` None: one if
    torch.export can capture it), or as a module to pickle (`into` PICKLE)."""
    pickled = ModuleModel(model.path, folded, ModelFormat.PICKLE)
    if into is ModelFormat.PICKLE:
        plan.notes.append(f"the folded model is written as a pickled {type(folded).__name__} (load it with "
                          "torch.load(..., weights_only=False), with the factory's package importable)")
        return pickled
    if capture.example is None:
        raise UsageError("folding a state_dict model needs an example input to write the folded program",
                         "pass --input-shape (e.g. 1,3,224,224)")
    batch = torch.export.Dim("batch", min=1)
    try:
        program = _export(folded, capture.example, tuple({0: batch} if t.dim() else {} for t in capture.example))
    except Exception as error:  # e.g. control flow export cannot capture
        reason = first_line(error)
        if into is ModelFormat.EXPORTED_PROGRAM:
            raise UsageError(f"torch.export cannot capture the folded model, so it cannot be written as a "
                             f".pt2 program ({reason})", "name the output .pt to write it as a pickled module "
                             "(torch.load(..., weights_only=False))") from None
        plan.notes.append(f"the folded model stays an eager module: torch.export cannot capture it ({reason})")
        return pickled
    plan.notes.append("the folded model is written as a torch.export program (load with torch.export.load): "
                      "the factory's architecture still has its BN modules, which a state_dict cannot remove")
    return ExportedProgramModel(model.path, program)
