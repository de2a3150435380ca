"""Observe BN inputs and write new running statistics in ONNX models (see `bnfold.recalibration`).

Each pass runs a copy of the graph with a small probe in front of every observed BatchNormalization:
its input is reshaped to (N, C, L), and each sample's mean and mean square over its L positions are
reduced in the input's precision (float32 at least), then cast to double and combined into the batch's
per-channel mean, population variance and variance of the sample means. Those and the shape come out
as the graph's outputs, so only C-sized vectors leave onnxruntime, never the activations, and only the
nodes those outputs need stay in the pass's graph (onnxruntime runs every node, whatever a run fetches:
a pass ends at its last layer). For the fast
method the BN node reads the probe's mean and variance instead of its stored ones, so it normalizes by
the batch's statistics (any opset, no training-mode kernel needed). For the exact method each pass runs
with the statistics written by the passes before.

A variance taken as mean square minus squared mean loses the input's relative precision times
mean square / variance to cancellation. The probe also reports that ratio's excess over
`CANCELLATION_RATIO`; a layer whose input exceeds it (an input offset far beyond its spread, a constant
channel) gets a careful probe from then on, which reduces squared deviations from each sample's mean
(two more passes over the input), and the batch is run again. Cheap probes are the rule: conv outputs
are rarely offset by more than a few standard deviations.

ONNX stores the population variance M2/n: BatchNormalization divides by sqrt(var + eps), and the
population variance is what normalizes the calibration data exactly (ONNX's own training mode also
updates running_var with the population variance). This module never imports torch.
"""

from __future__ import annotations

import copy

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.engine import Batch
from bnfold.errors import InputError, UsageError, first_line
from bnfold.foldmath import round_to
from bnfold.health import fixed_training
from bnfold.layers import BNLayer
from bnfold.model import InputSpec
from bnfold.onnx.discover import discover, training_fixed_by
from bnfold.onnx.graph import (BN_OP, DEFAULT_DOMAINS, GraphIndex, delete_where, needed_nodes,
                               node_label, opset_version)
from bnfold.onnx.model import OnnxModel
from bnfold.onnx.runtime import session
from bnfold.onnx.shapes import infer_facts, traced_dtype, traced_rank
from bnfold.recalibration import GraphStep, data_inputs, upstream_layers
from bnfold.stats import ChannelStatistics, Moments, beyond_float32_means, pooled_columns

_PREFIX = "bnfold_recalibrate"
# Above this mean square / variance ratio, cancellation would cost a variance more than about 2e-6 of
# its value (onnxruntime's float32 means are good to about 3e-7 for a few thousand positions).
CANCELLATION_RATIO = 6.0
# Probe outputs of this many bytes wait to be merged in one vectorized step (bounded, whatever the data).
_PENDING_BYTES = 4 << 20


def _cannot_run(error: Exception) -> InputError:
    return InputError(f"onnxruntime cannot run the model ({first_line(error)})")


class OnnxStatisticsRunner:
    """Recalibration passes over an ONNX model with onnxruntime."""

    variance_ddof = 0  # ONNX stores the population variance

    def __init__(self, model: OnnxModel, *, device: str = "cpu", copy: bool = True) -> None:
        if device != "cpu":
            raise UsageError(f"--device {device}: ONNX models are recalibrated with onnxruntime on the CPU",
                             "use --device cpu")
        self.model = model
        self.proto = _copy(model.proto) if copy else model.proto
        self.opset = opset_version(self.proto)
        self.index = GraphIndex(self.proto.graph)
        self.notes: list[str] = []
        self._skipped: dict[str, str] = {}
        self.nodes: dict[str, onnx.NodeProto] = {}
        self.careful: set[str] = set()  # layers whose inputs a mean-square probe would cancel
        self._input_types = None
        self._dtypes: dict[str, np.dtype] = {}
        self._ranks: dict[str, int | None] = {}  # traced so far (see `traced_rank`)
        self._discovered = discover(self.proto, self.opset)
        self._per_activation = {layer.name for layer in self._discovered if layer.extra.get("per_activation")}
        for node in self.proto.graph.node:
            if node.op_type == BN_OP and node.domain in DEFAULT_DOMAINS:
                reason = self._unusable(node)
                if reason:
                    self._skipped[node_label(node)] = reason
                else:
                    self.nodes[node_label(node)] = node
        for layer in self._discovered:
            if layer.name not in self.nodes and layer.name not in self._skipped:
                self._skipped[layer.name] = "inside a subgraph (If/Loop/Scan), which bnfold cannot observe"

    def _unusable(self, node: onnx.NodeProto) -> str | None:
        if len(node.input) < 5 or any(self._constant_source(name) is None for name in node.input[3:5]):
            return "its running statistics are not constants in the file (computed or fed at run time)"
        if fixed_by := training_fixed_by(node, self.opset, self.index):
            return fixed_training(fixed_by)
        if node_label(node) in self._per_activation:  # as discovery, inspect and fold judge it
            return "spatial=0: it keeps statistics per activation, and bnfold recalibrates per-channel statistics"
        return None

    def inputs(self) -> list[InputSpec | str]:
        return data_inputs(self.model)  # as declared: real data brings its own sizes

    def _constant(self, name: str) -> np.ndarray | None:
        """A constant, also behind Identity nodes (the TorchScript exporter shares equal tensors so)."""
        source = self._constant_source(name)
        return None if source is None else self.index.constant(source)

    def _constant_source(self, name: str) -> str | None:
        """The initializer or Constant output whose value `name` has, following Identity nodes."""
        while not self.index.is_constant(name):
            producer = self.index.producers.get(name)
            if producer is None or producer.op_type != "Identity":
                return None
            name = producer.input[0]
        return name

    def _dtype(self, name: str) -> np.dtype:
        """A constant's element type (the passes rewrite values, never types)."""
        if name not in self._dtypes:
            self._dtypes[name] = self._constant(name).dtype
        return self._dtypes[name]

    def layers(self) -> list[BNLayer]:
        layers = [copy.copy(layer) for layer in self._discovered if layer.name in self.nodes]
        for layer in layers:  # discovery does not look through Identity nodes
            node = self.nodes[layer.name]
            layer.running_mean, layer.running_var = (
                np.asarray(self._constant(name), np.float64).ravel() for name in node.input[3:5])
            layer.channels, layer.track_running_stats = layer.running_mean.size, True
        return layers

    def skipped(self) -> dict[str, str]:
        return dict(self._skipped)

    def upstream(self, batches: Iterable[Batch]) -> dict[str, set[str]]:
        reads: dict[int, list[str]] = {}
        for value, consumers in self.index.consumers.items():  # includes values captured by subgraphs
            for consumer in consumers:
                reads.setdefault(id(consumer), []).append(value)
        layer_of = {id(node): name for name, node in self.nodes.items()}

        def steps() -> Iterator[GraphStep]:
            for node in self.proto.graph.node:
                yield reads.get(id(node), []), [o for o in node.output if o], layer_of.get(id(node))

        return upstream_layers(steps())

    def run_pass(self, batches: Iterable[Batch], observe: Sequence[str],
                 batch_statistics: bool) -> dict[str, ChannelStatistics]:
        runnable, readout = self._session(set(observe), batch_statistics)
        # the fast pass's units are batches: per-sample means would take another read of every BN input
        # in onnxruntime (5% of a MobileNet's pass), where training-mode BN gives batch means for nothing
        statistics = {layer: ChannelStatistics(batch_units=batch_statistics) for layer in readout.layers}
        pending: list[_Reading] = []  # batches not merged yet
        for batch in batches:
            reading = readout.read(self._run(runnable, readout.outputs, batch))
            cancelled = readout.cancelled(reading)
            if cancelled:  # probe those layers carefully from now on, and this batch again
                _merge(statistics, readout, pending)
                self.careful |= cancelled
                runnable, readout = self._session(set(observe), batch_statistics)
                reading = readout.read(self._run(runnable, readout.outputs, batch))
            pending.append(reading)
            if len(pending) * reading.nbytes > _PENDING_BYTES:
                _merge(statistics, readout, pending)
        _merge(statistics, readout, pending)
        if batch_statistics:
            self.notes.append("standard errors of the new means come from the spread of the batch means "
                              "(the fast method on onnxruntime reads no per-sample means)")
        return {layer: found for layer, found in statistics.items() if found.batches}  # a rank may see none

    def _session(self, observe: set[str], batch_statistics: bool) -> tuple[Any, _Readout]:
        proto, readout = self._instrumented(observe, batch_statistics)
        try:
            return session(proto), readout
        except InputError:  # says why already
            raise
        except Exception as error:  # onnxruntime has many error types; all mean "cannot run this model"
            raise _cannot_run(error) from None

    @staticmethod
    def _run(runnable: Any, outputs: list[str], batch: Batch) -> list[np.ndarray]:
        try:
            return runnable.run(outputs, batch)
        except Exception as error:  # some models fail only on real shapes (a bias that does not broadcast)
            raise _cannot_run(error) from None

    def _instrumented(self, observe: set[str], batch_statistics: bool) -> tuple[onnx.ModelProto, _Readout]:
        """A copy of the model with probes (and, for the fast method, batch-statistics BN) in place."""
        proto = _copy(self.proto)
        graph = proto.graph
        builder = _ProbeBuilder(graph, self.opset)
        probes: dict[str, _Probe] = {}
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            layer = node_label(node) if node.op_type == BN_OP else None
            if layer in self.nodes and (layer in observe or batch_statistics):
                rank = traced_rank(self.index, node.input[0], self._ranks)
                if batch_statistics and self._trains(node):
                    probe: _Probe = builder.training_mode(node, len(nodes), rank, self._constant(node.input[3]))
                else:
                    probe = builder.moments(node.input[0], len(nodes), rank, self._reduces_in_place(node),
                                            careful=layer in self.careful)
                    if batch_statistics:
                        builder.normalize_by(node, probe, self._dtype(node.input[3]))
                nodes.extend(builder.nodes)
                if layer in observe:
                    probes[layer] = probe
            nodes.append(node)
        builder.nodes = []
        readout = _Readout(probes, builder, spread=not batch_statistics)
        nodes.extend(builder.nodes)
        kept, read = needed_nodes(nodes, set(readout.outputs))  # what comes after the last probe would run for nothing
        graph.ClearField("node")
        graph.node.extend(kept)
        graph.ClearField("output")
        graph.output.extend(helper.ValueInfoProto(name=name) for name in readout.outputs)
        inputs = self.index.input_names  # a property that builds its set on every call
        delete_where(graph.initializer, lambda init: init.name not in read and init.name not in inputs)
        return proto, readout

    def _trains(self, node: onnx.NodeProto) -> bool:
        """Whether the fast method can switch `node` itself to training mode (opset 14+, float32 or
        double input and statistics: onnxruntime then reduces in two passes, in the input's precision),
        rather than probe it carefully (an input offset far beyond its spread, see `beyond_float32_means`)."""
        return (self.opset >= 14 and node_label(node) not in self.careful and self._reduces_in_place(node)
                and self._dtype(node.input[3]) in (np.float32, np.float64))

    def _reduces_in_place(self, node: onnx.NodeProto) -> bool:
        """Whether a BN's input is float32 or double, precise enough to reduce without a cast.

        Before opset 15 the input has the scale's type; from 15 on they may differ, and the ops before
        it or shape inference tell (a value of unknown type is cast, which is always safe).
        """
        if self.opset < 15:
            dtype = self._dtype(node.input[1])
        elif (dtype := traced_dtype(self.index, node.input[0])) is None:
            if self._input_types is None:
                self._input_types = infer_facts(self.proto)
            dtype = self._input_types.dtype(node.input[0])
        return dtype in (np.float32, np.float64)

    def set_statistics(self, layer: str, mean: np.ndarray, var: np.ndarray, batches: int) -> None:
        node = self.nodes[layer]
        for position, values in ((3, mean), (4, var)):
            name = node.input[position]
            current = self._constant(name)
            stored = round_to(values, current.dtype).reshape(current.shape)
            if self._exclusive_initializer(name, node):
                self.index.initializers[name].CopyFrom(numpy_helper.from_array(stored, name))
            else:  # shared with another node, or behind a Constant/Identity node: give this BN its own tensor
                fresh = f"{name}.{_PREFIX}.{layer}"
                self.proto.graph.initializer.append(numpy_helper.from_array(stored, fresh))
                node.input[position] = fresh

    def _exclusive_initializer(self, name: str, node: onnx.NodeProto) -> bool:
        return (name in self.index.initializers and name not in self.index.output_names
                and all(consumer is node for consumer in self.index.consumers.get(name, [])))

    def result(self) -> OnnxModel:
        return OnnxModel(self.model.path, self.proto, external_data=self.model.external_data)


def _merge(statistics: dict[str, ChannelStatistics], readout: _Readout, pending: list[_Reading]) -> None:
    """Merge the `pending` batches into `statistics`: every layer's batches in one vectorized step over all
    channels of all layers (layer by layer, numpy's per-call overhead was 4% of the zoo ResNet's fast
    pass). The units are the batches, or in an exact pass (which reads the spread) the samples."""
    if not pending or not readout.layers:
        pending.clear()
        return
    rows, widths, positions = readout.sizes(pending)  # (batches, layers)
    widths = widths[0]
    counts = rows * positions  # values per channel
    means = np.stack([reading.means for reading in pending])  # (batches, every layer's channels)
    _, value_mean, value_m2 = pooled_columns(np.repeat(counts, widths, axis=1), means,
                                             np.stack([reading.variances for reading in pending]))
    spread = 0.0 if pending[0].spread is None else np.stack([reading.spread for reading in pending])
    _, unit_mean, unit_m2 = pooled_columns(np.repeat(rows, widths, axis=1), means, spread)
    start = 0
    for number, (layer, width) in enumerate(zip(readout.layers, widths)):
        part = slice(start, start + width)
        statistics[layer].add(Moments(int(counts[:, number].sum()), value_mean[part], value_m2[part]),
                              Moments(int(rows[:, number].sum()), unit_mean[part], unit_m2[part]),
                              batches=len(pending))
        start += width
    pending.clear()


def _spread(probe: _Probe) -> str:
    """The per-sample means' spread, which only reducing probes (every probe of an exact pass) read out."""
    assert isinstance(probe, _ReducingProbe)
    return probe.spread


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(proto)
    return copied


class _Probe:
    """One layer's probe: the names of the values that give each batch's per-channel `mean` and population
    `var` (in `dtype`), and the `shape` of the BN input they were reduced over, (N, C, positions...) or
    (N, C, L) flattened, of `rank` (None: not known before the run)."""

    mean: str
    var: str
    shape: str
    rank: int | None
    dtype: np.dtype


class _ReducingProbe(_Probe):
    """Reduction nodes in front of the BN: mean, variance and spread of sample means come out in double."""

    def __init__(self, prefix: str, careful: bool, rank: int) -> None:
        self.mean = f"{prefix}/mean"
        self.var = f"{prefix}/var"
        self.spread = f"{prefix}/spread"  # the population variance of the sample means
        self.shape = f"{prefix}/shape"
        # how far the input's mean square exceeds CANCELLATION_RATIO variances (a careful probe cannot cancel)
        self.excess = None if careful else f"{prefix}/cancellation_excess"
        self.prefix = prefix
        self.rank = rank
        self.dtype = np.dtype(np.float64)


class _TrainingModeProbe(_Probe):
    """The BN in training mode with momentum 0: its running-statistics outputs are the batch's mean and
    population variance (in the `dtype` of its `channels` statistics), and a Shape node beside it gives
    the count."""

    def __init__(self, prefix: str, rank: int | None, statistics: np.ndarray) -> None:
        self.mean = f"{prefix}/mean"
        self.var = f"{prefix}/var"
        self.shape = f"{prefix}/shape"
        self.rank = rank
        self.dtype = statistics.dtype
        self.channels = statistics.size


class _Reading(NamedTuple):
    """One batch's probe outputs, every observed layer's channels side by side (`_Readout.layers` order):
    means and population variances in double, the spread of the sample means (None where a pass's units
    are batches), the shapes of the BN inputs (`_Readout.sizes`) and the cancellation excess of the layers
    that report one (`_Readout.cancelled`)."""

    means: np.ndarray
    variances: np.ndarray
    spread: np.ndarray | None
    shapes: tuple[np.ndarray, ...]  # one vector of all layers', or each layer's
    excess: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return self.means.nbytes * (2 if self.spread is None else 3) + sum(shape.nbytes for shape in self.shapes)


class _Readout:
    """The outputs one pass fetches, and what a batch's outputs say.

    The probes' outputs are concatenated in the graph, one vector per kind (and dtype) for all layers:
    onnxruntime hands each fetched output over as a new array, and screening and merging them layer by
    layer took more Python per batch (about 0.1 ms on the zoo ResNet, of 1.4 ms of inference) than the
    concatenation costs in the graph. Training-mode probes come first, float32 before double, so the
    columns the cancellation screen reads are a prefix. Shapes are concatenated (with a 1 at the end, the
    positions of a rank-2 input) where every rank is known.
    """

    def __init__(self, probes: dict[str, _Probe], builder: _ProbeBuilder, spread: bool) -> None:
        self.layers = sorted(probes, key=lambda layer: (isinstance(probes[layer], _ReducingProbe),
                                                        probes[layer].dtype != np.float32))
        ordered = [probes[layer] for layer in self.layers]
        self.outputs: list[str] = []
        # the screened columns: training-mode probes' channels (onnxruntime checks they match the input's)
        self._trained = sum(probe.channels for probe in ordered if isinstance(probe, _TrainingModeProbe))
        self._columns = []  # (mean, variance) outputs of each dtype, in column order
        for dtype in dict.fromkeys(probe.dtype for probe in ordered):
            group = [probe for probe in ordered if probe.dtype == dtype]
            self._columns.append(tuple(self._fetch(builder.concat([getattr(probe, kind) for probe in group],
                                                                  f"{_PREFIX}/{dtype.name}_{kind}"))
                                       for kind in ("mean", "var")))
        self._spread = None
        if spread:  # only reducing probes read it out, and an exact pass has no other
            self._spread = self._fetch(builder.concat([_spread(probe) for probe in ordered], f"{_PREFIX}/spread"))
        reporting = [(layer, probe.excess) for layer, probe in zip(self.layers, ordered)
                     if isinstance(probe, _ReducingProbe) and probe.excess]
        self._excess_layers = [layer for layer, _ in reporting]
        self._excess = self._fetch(builder.concat([excess for _, excess in reporting], f"{_PREFIX}/excess")
                                   ) if reporting else None
        ranks = [probe.rank for probe in ordered]
        if None in ranks or not ordered:  # each layer's Shape output
            self._shapes = [self._fetch(probe.shape) for probe in ordered]
            self._rows_at = None
        else:  # one vector, and where each layer's rows and positions lie in it
            one = builder.constant("one", np.ones(1, np.int64))
            self._shapes = [self._fetch(builder.concat([probe.shape for probe in ordered] + [one], f"{_PREFIX}/shape"))]
            self._rows_at = np.cumsum([0, *ranks[:-1]])
            width, one_at = max(max(ranks) - 2, 1), sum(ranks)  # rank-2 inputs have no positions: the 1
            self._positions_at = np.array([[start + 2 + axis if axis < rank - 2 else one_at for axis in range(width)]
                                           for start, rank in zip(self._rows_at, ranks)], dtype=np.intp)

    def _fetch(self, name: str) -> int:
        self.outputs.append(name)
        return len(self.outputs) - 1

    def read(self, outputs: list[np.ndarray]) -> _Reading:
        columns = self._columns
        means = np.concatenate([outputs[mean] for mean, _ in columns], dtype=np.float64)
        variances = np.concatenate([outputs[var] for _, var in columns], dtype=np.float64)
        shapes = tuple(outputs[index] for index in self._shapes)
        return _Reading(means, variances, None if self._spread is None else outputs[self._spread], shapes,
                        None if self._excess is None else outputs[self._excess])

    def cancelled(self, reading: _Reading) -> set[str]:
        """The layers whose batch lost precision: a reducing probe's mean square beyond CANCELLATION_RATIO
        variances, or a training-mode probe's mean beyond float32's reach (`beyond_float32_means`),
        screened for all of them in one vectorized step."""
        layers = set() if reading.excess is None else {
            layer for layer, excess in zip(self._excess_layers, reading.excess) if excess > 0}
        beyond = beyond_float32_means(reading.means[:self._trained], reading.variances[:self._trained])
        if beyond.any():
            _, widths, _ = self.sizes([reading])
            ends = np.cumsum(widths[0])
            layers.update(self.layers[number] for number in np.searchsorted(ends, np.flatnonzero(beyond), side="right"))
        return layers

    def sizes(self, readings: Sequence[_Reading]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each batch's and layer's rows, channels and positions per channel, as (batches, layers) arrays."""
        if self._rows_at is not None:
            shapes = np.stack([reading.shapes[0] for reading in readings])
            return (shapes[:, self._rows_at], shapes[:, self._rows_at + 1],
                    shapes[:, self._positions_at].prod(axis=2))
        rows, widths, positions = (np.array([[part(shape) for shape in reading.shapes] for reading in readings],
                                            dtype=np.int64)
                                   for part in (lambda shape: shape[0], lambda shape: shape[1],
                                                lambda shape: np.prod(shape[2:], dtype=np.int64)))
        return rows, widths, positions


class _ProbeBuilder:
    """Emits the probe and batch-statistics nodes for the model's opset."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self._constants: set[str] = set()
        self.constant("flat", np.array([0, 0, -1], np.int64))

    def constant(self, name: str, value: np.ndarray) -> str:
        full = f"{_PREFIX}/{name}"
        if full not in self._constants:
            self._constants.add(full)
            self.graph.initializer.append(numpy_helper.from_array(value, full))
        return full

    def _add(self, op: str, inputs: list[str], output: str, **attributes: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def _mean(self, value: str, axes: list[int], keepdims: int, output: str) -> str:
        if self.opset >= 18:  # axes became an input in opset 18
            axes_name = self.constant("axes_" + "_".join(map(str, axes)), np.array(axes, np.int64))
            return self._add("ReduceMean", [value, axes_name], output, keepdims=keepdims)
        return self._add("ReduceMean", [value], output, axes=axes, keepdims=keepdims)

    def _samples(self, value: str, rank: int | None, prefix: str) -> tuple[str, list[int]]:
        """`value` as a probe reduces it, and the axes of each sample's positions: the value itself where
        its rank is known, else reshaped to (N, C, L). Reading a reshaped BN input cost 11% of a batch's
        time on a MobileNet at 128x128 (onnxruntime 1.2x); tracing ranks costs nothing per batch."""
        if rank is not None and rank >= 3:
            return value, list(range(2, rank))
        return self._add("Reshape", [value, f"{_PREFIX}/flat"], f"{prefix}/flat"), [2]

    def moments(self, value: str, number: int, rank: int | None, in_place: bool, careful: bool) -> _ReducingProbe:
        """The batch's mean and population variance per channel of `value` (N, C, ...), in double.

        Samples all have the same number of positions, so the channel mean is the mean of the sample
        means, and the variance the mean of the sample variances plus the variance of the sample means.
        A sample's variance is its mean square minus its squared mean, or, `careful`, the mean of its
        squared deviations from its mean (whose own mean corrects the rounded sample mean).
        `in_place`: reduce in the value's own type (float32 or double) rather than a float32 cast; `rank`:
        the value's, if known. The new nodes are left in `self.nodes`.
        """
        self.nodes = []
        samples, positions = self._samples(value, rank, p := f"{_PREFIX}/{number}")
        probe = _ReducingProbe(p, careful, rank=len(positions) + 2)
        work = samples if in_place else self._add("Cast", [samples], f"{p}/float", to=TensorProto.FLOAT)
        if careful:
            sample_mean = self._mean(work, positions, 1, f"{p}/sample_mean")
            deviations = self._add("Sub", [work, sample_mean], f"{p}/deviations")
            squares = self._add("Mul", [deviations, deviations], f"{p}/squares")
            rounded, correction, mean_square = (
                self._double(self._mean(value, positions, 0, f"{p}/{name}"))
                for value, name in ((sample_mean, "rounded_mean"), (deviations, "correction"), (squares, "mean_square")))
            sample_means = self._add("Add", [rounded, correction], f"{p}/sample_means")
            offset = correction
        else:
            squares = self._add("Mul", [work, work], f"{p}/squares")
            sample_means, mean_square = (self._double(self._mean(value, positions, 0, f"{p}/{name}"))
                                         for value, name in ((work, "sample_means"), (squares, "mean_square")))
            offset = sample_means
        # (N, C) in double from here on
        sample_var = self._add("Sub", [mean_square, self._add("Mul", [offset, offset], f"{p}/offset_squared")],
                               f"{p}/sample_var")
        self._mean(sample_means, [0], 0, probe.mean)
        between = self._add("Sub", [sample_means, probe.mean], f"{p}/between")
        within = self._mean(sample_var, [0], 0, f"{p}/within")
        self._mean(self._add("Mul", [between, between], f"{p}/between_squares"), [0], 0, probe.spread)
        self._add("Add", [within, probe.spread], probe.var)
        self._add("Shape", [samples], probe.shape)
        if probe.excess:
            limit = self._add("Mul", [probe.var, self.constant("cancellation_ratio", np.array(CANCELLATION_RATIO))],
                              f"{p}/cancellation_limit")
            excess = self._add("Sub", [self._mean(mean_square, [0], 0, f"{p}/channel_mean_square"), limit],
                               f"{p}/channel_excess")
            self._add("ReduceMax", [excess], probe.excess, keepdims=1)  # one value, to concatenate
        return probe

    def concat(self, values: list[str], output: str) -> str:
        """One vector of the 1-D `values` (of one dtype), end to end."""
        return self._add("Concat", values, output, axis=0)

    def _double(self, value: str) -> str:
        return self._add("Cast", [value], f"{value}_double", to=TensorProto.DOUBLE)

    def normalize_by(self, node: onnx.NodeProto, probe: _ReducingProbe, dtype: np.dtype) -> None:
        """Make BN `node` normalize by the probe's batch statistics (stored as `dtype`); adds to `self.nodes`."""
        for position, value in ((3, probe.mean), (4, probe.var)):
            node.input[position] = self._add("Cast", [value], f"{probe.prefix}/batch_{position}",
                                             to=helper.np_dtype_to_tensor_dtype(dtype))

    def training_mode(self, node: onnx.NodeProto, number: int, rank: int | None,
                      statistics: np.ndarray) -> _TrainingModeProbe:
        """Switch BN `node` (opset 14+, running `statistics` like these, input of `rank` if known) to
        training mode, reading out its batch statistics and the shape of the input they were reduced over.

        The node gets running statistics of its own (zeros, which momentum 0 ignores): onnxruntime writes
        the new ones over them in place, and two BN nodes sharing their statistics, as exporters share equal
        tensors, then gave the same output buffer to both layers' statistics."""
        self.nodes = []
        probe = _TrainingModeProbe(f"{_PREFIX}/{number}", rank, statistics)
        for position, name in ((3, "mean"), (4, "var")):
            node.input[position] = self.constant(f"{number}/running_{name}", np.zeros_like(statistics))
        kept = [a for a in node.attribute if a.name not in ("momentum", "training_mode")]
        node.ClearField("attribute")
        node.attribute.extend([*kept, helper.make_attribute("momentum", 0.0), helper.make_attribute("training_mode", 1)])
        del node.output[1:]
        node.output.extend([probe.mean, probe.var])
        self._add("Shape", [node.input[0]], probe.shape)
        return probe
