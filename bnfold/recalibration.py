"""`recalibrate`: re-estimate every BN layer's running statistics, exactly, on the user's data.

Two methods, neither an exponential moving average nor `model.train()`:

- `exact` (default): each BN gets the statistics of the inputs it sees at inference once the BN layers
  upstream of it carry their new statistics; everything runs in eval mode (dropout off). Layers are
  grouped by dependency depth: one forward pass per depth, new statistics written in between, so a
  chain of L dependent layers costs L passes and independent layers share them.
- `fast`: one pass in which only the BN layers normalize by the batch's own statistics (as in
  training; everything else, dropout included, stays in eval mode), while the population statistics of
  every BN's input are accumulated.

Statistics are exact population moments in float64 (`bnfold.stats`), independent of the batch size.
The framework decides how the variance is stored: PyTorch keeps the unbiased estimate M2/(n-1) (what
its running_var estimates), ONNX the population variance M2/n (what its BatchNormalization divides by).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bnfold.data import DataOptions, DataSource, ImageOptions, open_data
from bnfold.distributed import World, joined
from bnfold.engine import Batch
from bnfold.errors import DataError, NoBatchNormError, UsageError
from bnfold.formats import as_model
from bnfold.layers import BNLayer, Finding, Severity
from bnfold.model import InputSpec, LoadOptions, Model
from bnfold.output import atomic_write, check_output_name, check_output_path
from bnfold.reports.inspect import ModelInfo
from bnfold.reports.recalibrate import LayerRecalibration, RecalibrateReport, SkippedLayer
from bnfold.stats import ChannelStatistics

# Fewer samples than this give means and variances too noisy to be worth storing.
MIN_SAMPLES = 16
# A new mean whose standard error exceeds this fraction of the channel's standard deviation is flagged.
MAX_RELATIVE_ERROR = 0.1


class Method(str, Enum):
    EXACT = "exact"
    FAST = "fast"


class StatisticsRunner(Protocol):
    """What recalibration needs from a framework: passes that observe BN inputs, and a place to write."""

    variance_ddof: int  # 1: store the unbiased variance (PyTorch); 0: the population variance (ONNX)
    notes: list[str]

    def inputs(self) -> list[InputSpec | str]:
        """The model's inputs, as specs where the format records them, else by name."""

    def layers(self) -> list[BNLayer]:
        """The BN layers that can be recalibrated, in graph order, with their current statistics."""

    def skipped(self) -> dict[str, str]:
        """BN layers that cannot be recalibrated, with the reason."""

    def upstream(self, batches: Iterable[Batch]) -> dict[str, set[str]]:
        """For each layer, every BN layer its input depends on (a runner without a graph runs `batches`)."""

    def run_pass(self, batches: Iterable[Batch], observe: Sequence[str],
                 batch_statistics: bool) -> dict[str, ChannelStatistics]:
        """One pass over `batches`, accumulating the input statistics of the `observe` layers.

        With `batch_statistics`, every BN layer normalizes by the batch's statistics (the fast method).
        """

    def set_statistics(self, layer: str, mean: np.ndarray, var: np.ndarray, batches: int) -> None:
        """Store new running statistics (float64, rounded once to the model's dtype) for later passes."""

    def result(self) -> Model:
        """The recalibrated model."""


def recalibrate(source: object, data: object, *, method: str | Method = Method.EXACT,
                output: str | Path | None = None, force: bool = False, in_place: bool = False,
                batch_size: int = 32, max_samples: int | None = None, seed: int | None = None,
                images: ImageOptions | None = None, device: str = "cpu", allow_pickle: bool = False,
                model_factory: str | None = None, min_samples: int = MIN_SAMPLES,
                progress: bool = False, distributed: bool | None = None) -> RecalibrateReport:
    """Re-estimate the running statistics of every BN layer of `source` on `data`; returns a
    `RecalibrateReport` (per layer: old and new statistics, how far they moved, standard errors, passes).

    `source` is a model path or object (as for `inspect`); `data` anything `bnfold.data.open_data`
    takes (.npy/.npz path, image directory, arrays, a function returning batches). The model is
    copied, never changed; the result is written to `output` (or over the input with `in_place`), and
    is always available as `report.result`. `progress` shows a bar on stderr when it is a terminal.

    Launched by torchrun (WORLD_SIZE > 1), every rank reads its share of `data`, the ranks' statistics
    are merged exactly, every rank returns the same statistics and model, and rank 0 alone writes `output`
    (`bnfold.distributed`). `distributed=False` runs alone all the same (say, on one rank of a job).
    """
    method = Method(method)
    source_path = Path(source) if isinstance(source, (str, Path)) else None
    target = _target(source_path, output, in_place)
    with joined(device, distributed) as world:
        with world.agree_on_failure():  # a rank can fail here alone: its data, its device, its disk
            if target is not None and world.root:
                check_output_path(target, source_path, force=force, in_place=in_place)
            model = as_model(source, LoadOptions(allow_pickle=allow_pickle, model_factory=model_factory))
            if target is not None and not in_place:  # in place, the file keeps its format and its name
                check_output_name(target, model, "recalibrate")
            runner = statistics_runner(model, device=world.device(device), copy=source_path is None)
            layers, skipped = _recalibratable(runner, model)
            stream = open_data(data, runner.inputs(), DataOptions(
                batch_size=batch_size, max_samples=max_samples, seed=seed, images=images or ImageOptions(),
                min_batch=2 if method is Method.FAST else 1, rank=world.rank, world_size=world.size))
        if stream.num_samples is not None and (available := world.total(stream.num_samples)) < min_samples:
            raise _too_few(available, min_samples)

        levels: list[list[str]] | None = [[layer.name for layer in layers]]
        if method is Method.EXACT:
            with world.agree_on_failure():  # rank 0 plans: without a graph, the plan depends on its data
                levels = dependency_levels(levels[0], runner.upstream(_nonempty(stream))) if world.root else None
            levels = world.broadcast(levels)
        results, samples = _run_passes(runner, stream, levels, layers, skipped, world,
                                       batch_statistics=method is Method.FAST, min_samples=min_samples,
                                       progress=progress and world.root)
        notes = [*stream.notes, *runner.notes]
        if world.size > 1:
            notes.append(f"{world.size} processes (torch.distributed) each read their share of the data; "
                         "their statistics were merged exactly")
        report = RecalibrateReport(
            model=ModelInfo(str(model.path), model.format.value, model.framework),
            method=method.value, data=stream.description, samples=samples, passes=len(levels),
            layers=results, skipped=skipped, findings=_findings(results), notes=notes)
        report.result = runner.result()
        if target is not None:
            with world.agree_on_failure():  # every rank learns whether rank 0's write worked
                if world.root:
                    atomic_write(target, report.result.save, replace=force or in_place)
            report.output = str(target)
    return report


def _recalibratable(runner: StatisticsRunner, model: Model) -> tuple[list[BNLayer], list[SkippedLayer]]:
    """The layers to recalibrate and those left alone; none at all is an error."""
    layers = runner.layers()
    skipped = [SkippedLayer(name, reason) for name, reason in runner.skipped().items()]
    if not layers:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped)
        raise NoBatchNormError(f"{model.path} has no BN layer that can be recalibrated"
                               + (f" ({reasons})" if reasons else ""))
    return layers, skipped


def _run_passes(runner: StatisticsRunner, stream: DataSource, levels: list[list[str]], layers: list[BNLayer],
                skipped: list[SkippedLayer], world: World, *, batch_statistics: bool, min_samples: int,
                progress: bool) -> tuple[list[LayerRecalibration], int]:
    """One pass per level, storing each level's new statistics (of every rank's data) before the next."""
    by_name = {layer.name: layer for layer in layers}
    results: list[LayerRecalibration] = []
    samples = 0
    with _progress(progress) as bar:
        for number, level in enumerate(levels, start=1):
            counter = _RowCounter(stream.batches())
            label = f"pass {number}/{len(levels)} ({len(level)} BN layer{'s' if len(level) > 1 else ''})"
            with world.agree_on_failure():  # a rank's data can fail mid-pass
                observed = runner.run_pass(_tracked(counter, bar, label, stream.num_batches), level,
                                           batch_statistics)
                _check_channels(observed, by_name)
            observed = world.all_reduce_statistics(observed, {name: by_name[name].channels for name in level})
            rows = world.total(counter.rows)
            samples = max(samples, rows)
            if rows < min_samples:
                raise _too_few(rows, min_samples)
            for name in level:
                statistics = observed.get(name)
                if statistics is None or statistics.samples == 0:
                    skipped.append(SkippedLayer(name, "the data never reached it (not called in forward)"))
                else:
                    results.append(_store(runner, by_name[name], statistics, number))
    if not results:
        raise NoBatchNormError("no BN layer was reached by the data", "check the model's forward")
    return sorted(results, key=lambda result: list(by_name).index(result.name)), samples


def statistics_runner(model: Model, *, device: str = "cpu", copy: bool = True) -> StatisticsRunner:
    """The framework's runner; `copy` protects a caller's in-memory model from the passes' writes."""
    if model.framework == "onnx":
        from bnfold.onnx.recalibrate import OnnxStatisticsRunner

        return OnnxStatisticsRunner(model, device=device, copy=copy)  # type: ignore[arg-type]
    from bnfold.pytorch.recalibrate import torch_statistics_runner

    return torch_statistics_runner(model, device=device, copy=copy)


def data_inputs(model: Model) -> list[InputSpec | str]:
    """The inputs data must provide, in the order the model takes them (what its runner's `inputs` says),
    without building a runner, which puts a module it does not copy in eval mode."""
    if model.framework == "onnx":
        return list(model.input_specs(sized=False))  # type: ignore[call-arg]
    from bnfold.pytorch.recalibrate import torch_inputs

    return torch_inputs(model)


def _target(source: Path | None, output: str | Path | None, in_place: bool) -> Path | None:
    if in_place and source is None:
        raise UsageError("--in-place needs a model file, not an in-memory model")
    if in_place and output is not None and Path(output) != source:
        raise UsageError("--in-place and --output name different files; pass one of them")
    return source if in_place else (Path(output) if output is not None else None)


def _check_channels(observed: Mapping[str, ChannelStatistics], layers: Mapping[str, BNLayer]) -> None:
    for name, statistics in observed.items():
        if statistics.mean.size != layers[name].channels:
            raise DataError(f"{name} has {layers[name].channels} channels but its input has "
                            f"{statistics.mean.size} on axis 1", "is the data laid out channels-first?")


def _store(runner: StatisticsRunner, layer: BNLayer, statistics: ChannelStatistics,
           pass_number: int) -> LayerRecalibration:
    if statistics.count < 2:
        raise DataError(f"{layer.name} saw only {statistics.count} value(s) per channel; "
                        "a variance needs more", "use more samples")
    mean, var = statistics.mean, statistics.variance(runner.variance_ddof)
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    if bad.any():  # the data layer refuses non-finite data, so the model itself made these
        raise DataError(f"{layer.name}'s input holds NaN/Inf in {int(bad.sum())} of {bad.size} channels although "
                        "the data is finite: the model produces them; no statistics were stored",
                        "check the weights before this layer (bnfold inspect lists non-finite parameters)")
    largest = float(np.max(np.maximum(np.abs(mean), var), initial=0.0))
    if largest > _largest_finite(layer.dtype):  # float16 buffers hold up to 65,504: the rest would be Inf
        raise DataError(f"{layer.name}'s new statistics reach {largest:.4g}, beyond what its {layer.dtype} "
                        "running statistics can hold; no statistics were stored",
                        "keep the BN layers in float32 (a float16 model can run float32 BN layers)")
    runner.set_statistics(layer.name, mean, var, statistics.batches)
    return LayerRecalibration(
        name=layer.name, kind=layer.kind, channels=layer.channels, eps=layer.eps, pass_number=pass_number,
        samples=statistics.samples, values_per_channel=statistics.count, batches=statistics.batches,
        old_mean=layer.running_mean, old_var=layer.running_var, new_mean=mean, new_var=var,
        standard_error=statistics.standard_error())


def _largest_finite(dtype: str) -> float:
    """The largest finite value of a float dtype's name (bfloat16 has float32's range)."""
    try:
        return float(np.finfo("float32" if dtype == "bfloat16" else dtype).max)
    except (TypeError, ValueError):  # a dtype numpy does not know: nothing to check against
        return np.inf


def _findings(results: list[LayerRecalibration]) -> list[Finding]:
    findings = []
    for result in results:
        worst = float(np.nanmax(result.relative_error())) if result.channels else 0.0
        if worst > MAX_RELATIVE_ERROR:
            findings.append(Finding(
                "few-samples", Severity.WARNING,
                f"the new mean is uncertain by up to {worst:.2f} standard deviations "
                f"({result.samples} samples)", result.name, "recalibrate on more samples"))
    return findings


def _too_few(samples: int, minimum: int) -> DataError:
    return DataError(f"only {samples} samples; at least {minimum} are needed for stable statistics",
                     "provide more data (or raise --max-samples)")


def _nonempty(stream: DataSource) -> Iterator[Batch]:
    """The stream's batches, the first one read already: a stream without any is an error here."""
    batches = iter(stream.batches())
    first = next(batches, None)
    if first is None:
        raise DataError(f"{stream.description} holds no batches")
    return itertools.chain([first], batches)


class _RowCounter:
    """Passes batches through, counting samples."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        self.batches = batches
        self.rows = 0

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            self.rows += next(iter(batch.values())).shape[0]
            yield batch


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A Rich progress display on stderr, only when asked for and stderr is a terminal."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        yield progress


def _tracked(batches: Iterable[Batch], bar: Any, label: str, total: int | None) -> Iterator[Batch]:
    if bar is None:
        yield from batches
        return
    task = bar.add_task(label, total=total)
    for batch in batches:
        yield batch
        bar.advance(task)


GraphStep = tuple[Iterable[Hashable], Iterable[Hashable], "str | None"]


def upstream_layers(steps: Iterable[GraphStep]) -> dict[str, set[str]]:
    """For each BN layer, the BN layers its input depends on, from a graph's data flow.

    Each step is (values read, values written, the BN layer the step is, or None). Steps may come in any
    order; they are visited producers first. A layer called at several places collects all of them.
    """
    steps = list(steps)
    producer = {value: position for position, (_, outputs, _) in enumerate(steps) for value in outputs}
    above: dict[Hashable, frozenset[str]] = {}
    upstream: dict[str, set[str]] = {}
    for position in _producers_first(steps, producer):
        inputs, outputs, layer = steps[position]
        seen = frozenset().union(*(above.get(value, frozenset()) for value in inputs))
        if layer is not None:
            upstream.setdefault(layer, set()).update(seen)
            seen = seen | {layer}
        for value in outputs:
            above[value] = seen
    return upstream


def _producers_first(steps: list[GraphStep], producer: Mapping[Hashable, int]) -> list[int]:
    order: list[int] = []
    state: dict[int, bool] = {}  # False: being visited, True: done
    for root in range(len(steps)):
        if root in state:
            continue
        state[root] = False
        stack = [(root, iter(steps[root][0]))]
        while stack:
            position, pending = stack[-1]
            for value in pending:
                before = producer.get(value)
                if before is not None and before not in state:
                    state[before] = False
                    stack.append((before, iter(steps[before][0])))
                    break
            else:
                stack.pop()
                state[position] = True
                order.append(position)
    return order


def dependency_levels(layers: Sequence[str], upstream: Mapping[str, set[str]]) -> list[list[str]]:
    """Group layers into passes: a layer's pass comes after the passes of every layer upstream of it.

    `upstream` must be transitive (as `upstream_layers` returns). A layer upstream of itself (a BN
    module called twice in a chain) has no layer-consistent statistics.
    """
    looped = [name for name in layers if name in upstream.get(name, ())]
    if looped:
        raise UsageError(f"{', '.join(looped)} feeds its own input (the module is called more than once "
                         "in a chain), so --method exact has no consistent answer", "use --method fast")
    depth: dict[str, int] = {}
    for name in sorted(layers, key=lambda n: len(upstream.get(n, ()))):  # ancestors have fewer ancestors
        depth[name] = 1 + max((depth[u] for u in upstream.get(name, ()) if u in depth), default=-1)
    levels: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for name in layers:
        levels[depth[name]].append(name)
    return levels


__all__ = ["MIN_SAMPLES", "Method", "StatisticsRunner", "dependency_levels", "recalibrate", "statistics_runner",
           "upstream_layers"]
