"""`bench`: time a model before and after folding, on the same inputs, in the runtimes it deploys to.

Timings are interleaved (original, folded, folded, original, ...: the order flips every round) so that a
shared, noisy machine slows both sides alike; each sample averages enough calls to last
`SAMPLE_SECONDS`, so microsecond models are not measured at the clock's resolution. Reports give the
median with its min-max spread, never a mean that one hiccup can move.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from bnfold.engine import Batch, engine_for
from bnfold.errors import InputError, UsageError
from bnfold.folding import VerificationUnavailable, compare, fold
from bnfold.formats import as_model
from bnfold.model import InputSpec, LoadOptions, Model
from bnfold.reports.bench import BenchReport, BenchRow, Timing
from bnfold.reports.inspect import ModelInfo
from bnfold.verify import InputShapes, default_tolerance, parse_input_shapes, random_batches

SAMPLE_SECONDS = 0.02  # one timing sample lasts at least this long (calls are repeated to fill it)


def time_interleaved(calls: Mapping[str, Callable[[], object]], runs: int, warmup: int = 3,
                     sample_seconds: float = SAMPLE_SECONDS) -> dict[str, Timing]:
    """Time each call `runs` times, round by round, reversing the order every other round.

    Warm-up calls come first (caches, lazy initialisation, allocator); the fastest of them sets how many
    calls one sample repeats, the same count for every call so that their samples are comparable.
    """
    if runs < 1:
        raise UsageError(f"--runs must be at least 1, got {runs}")
    fastest = math.inf
    for call in calls.values():
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            call()
            fastest = min(fastest, time.perf_counter() - start)
    repeat = max(1, math.ceil(sample_seconds / max(fastest, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for round_number in range(runs):
        for name in order if round_number % 2 == 0 else reversed(order):
            call = calls[name]
            start = time.perf_counter()
            for _ in range(repeat):
                call()
            samples[name].append((time.perf_counter() - start) / repeat)
    return {name: Timing(tuple(values), repeat) for name, values in samples.items()}


def bench(source: object, folded: object | None = None, *, batch_size: int | None = None, runs: int = 20,
          warmup: int = 3, input_shape: InputShapes | None = None, seed: int = 0, allow_pickle: bool = False,
          model_factory: str | None = None) -> BenchReport:
    """Time `source` and its folded version (`folded`, or folded in memory) on one random batch.

    Each of the framework's modes is timed (PyTorch eager; onnxruntime with graph optimizations off and
    on). `batch_size` replaces the batch dimension of the inputs (default: 1, or `input_shape`'s).
    The report also compares both models' outputs on that batch: it passes when they agree within the
    fold tolerance, so a speed-up is never reported for a model that computes something else. A model
    bnfold cannot analyse is not timed at all (it would be timed against itself): the report fails and
    gives the reason as `analysis_error`.
    """
    options = LoadOptions(allow_pickle=allow_pickle, model_factory=model_factory)
    model = as_model(source, options)
    shapes = parse_input_shapes(input_shape)
    batch = _batch(model.input_specs(), shapes, batch_size, seed)
    analysis_error = None
    if folded is None:
        result = fold(model, batches=[_fold_example(model.input_specs(), shapes, batch, seed)], verify=False)
        folded_model, folded_from = result.folded_model, "in memory"
        folded_layers, analysis_error = len(result.folded), result.analysis_error
    else:
        folded_model, folded_from, folded_layers = as_model(folded, options), str(folded), None
        if folded_model.framework != model.framework:
            raise UsageError(f"--folded is a {folded_model.framework} model but {model.path} is {model.framework}",
                             "compare a model with its own folded output (bnfold fold MODEL -o OUT)")
    engine = engine_for(model)
    difference, rows = None, []
    if analysis_error is None:
        try:
            difference = compare(engine, model, folded_model, [batch])
        except VerificationUnavailable as error:
            shapes_text = ", ".join(f"{name} {tuple(array.shape)}" for name, array in batch.items())
            raise InputError(f"cannot time the model on inputs {shapes_text}: {error}",
                             "pass --input-shape with the shape the model takes") from None
        rows = [_time_mode(engine, mode, model, folded_model, batch, runs, warmup) for mode in engine.modes]
    dtypes = {layer.dtype for layer in model.bn_layers()} | (difference.dtypes if difference else set())
    return BenchReport(
        model=ModelInfo(str(model.path), model.format.value, model.framework),
        folded_from=folded_from, inputs={name: list(array.shape) for name, array in batch.items()},
        rows=rows, runs=runs, warmup=warmup, bn_layers=len(model.bn_layers()), folded_layers=folded_layers,
        difference=difference, tolerance=default_tolerance(dtypes), analysis_error=analysis_error)


def _time_mode(engine, mode: str, model: Model, folded: Model, batch: Batch, runs: int, warmup: int) -> BenchRow:
    setup, calls = {}, {}
    for side, candidate in (("original", model), ("folded", folded)):
        start = time.perf_counter()
        calls[side] = engine.prepare(candidate, batch, mode)
        setup[side] = time.perf_counter() - start
    timings = time_interleaved(calls, runs, warmup)
    return BenchRow(mode, timings["original"], timings["folded"], setup["original"], setup["folded"])


def _batch(specs: list[InputSpec], shapes: list[tuple[int, ...]] | None, batch_size: int | None,
           seed: int) -> Batch:
    """One random batch: the recorded (or given) input shapes with `batch_size` samples."""
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if shapes is not None:
        if batch_size is not None:
            shapes = [(batch_size, *shape[1:]) if shape else shape for shape in shapes]
        return random_batches(specs, shapes, count=1, seed=seed)[0]
    sized = []
    for spec in specs:
        if spec.shape and spec.shape[0] is None:
            spec = replace(spec, shape=(batch_size or 1, *spec.shape[1:]))
        elif spec.shape and batch_size is not None and spec.shape[0] != batch_size:
            raise UsageError(f"input {spec.name!r} has a fixed batch of {spec.shape[0]}, not {batch_size}",
                             f"pass --batch-size {spec.shape[0]}, or export the model with a dynamic batch")
        sized.append(spec)
    return random_batches(sized, None, count=1, seed=seed)[0]


def _fold_example(specs: list[InputSpec], shapes: list[tuple[int, ...]] | None, batch: Batch, seed: int) -> Batch:
    """torch.export specializes a dimension of size 1, so folding with a batch of one would give a model
    that takes one sample only: capture with two samples where the batch may vary."""
    if all(array.shape[:1] != (1,) for array in batch.values()):
        return batch
    try:
        return _batch(specs, shapes, 2, seed)
    except UsageError:  # a fixed batch of one
        return batch
