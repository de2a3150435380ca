"""`fold`: plan, rewrite, verify numerically, then write atomically (only when verified)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import numpy as np

from bnfold import memory
from bnfold.data import DataOptions, open_data
from bnfold.engine import Batch, Engine, engine_for
from bnfold.errors import first_line
from bnfold.formats import as_model
from bnfold.layers import FoldStatus
from bnfold.model import LoadOptions, Model
from bnfold.output import atomic_write, check_output_name, check_output_path
from bnfold.plan import FoldOptions
from bnfold.reports.fold import FoldReport
from bnfold.reports.inspect import ModelInfo
from bnfold.verify import InputShapes, OutputDifference, default_tolerance, parse_input_shapes, random_batches


def fold(source: object, output: str | Path | None = None, *, tolerance: float | None = None,
         input_shape: InputShapes | None = None, data: object | None = None, data_options: DataOptions | None = None,
         batches: Sequence[Batch] | None = None, verify: bool = True, strict_inputs: bool = False,
         force: bool = False, in_place: bool = False, allow_pickle: bool = False, model_factory: str | None = None,
         seed: int = 0) -> FoldReport:
    """Fold every exactly-foldable BN layer and prove the result computes the same function.

    Verification runs original and folded model on `batches`, on the first batches of `data` (anything
    `bnfold.data.open_data` takes) or on deterministic random inputs of the model's input shape
    (`input_shape` when the file does not record one) and compares outputs. Returns a `FoldReport`
    (truthy when verified within `tolerance`, relative; by default that of the least precise float type
    among BN parameters and outputs); `output` is written only then. The folded model itself is
    `report.folded_model` (in memory, also when nothing is written).
    """
    output_path = Path(output) if output is not None else None
    source_path = Path(source) if isinstance(source, (str, Path)) else None
    if output_path is not None:
        check_output_path(output_path, source_path, force=force, in_place=in_place)
    model = as_model(source, LoadOptions(allow_pickle=allow_pickle, model_factory=model_factory))
    engine = engine_for(model)
    written = None  # the format the folded model is written in
    if output_path is not None:
        written = engine.folded_format(model, output_path)
        check_output_name(output_path, model, "fold", written)
    inputs_label = "random" if batches is None and data is None else "data"
    if batches is None and data is not None:  # before planning: some captures need an example
        batches = _data_batches(model, data, data_options)
    elif batches is None and (verify or input_shape):
        batches = random_batches(model.input_specs(), parse_input_shapes(input_shape), seed=seed)
    options = FoldOptions(strict_inputs=strict_inputs, example_batch=batches[0] if batches else None)
    plan = engine.plan(model, options)
    dtypes = {layer.dtype for layer in model.bn_layers()}
    info = ModelInfo(str(model.path), model.format.value, model.framework)
    params_before = model.parameter_count()

    expected, difference, verify_error = None, None, None
    if not verify:
        inputs_label = "skipped"
    elif plan.failure is None:  # a model that could not be analysed fails whatever it computes: no run
        # the original runs first and alone: one runtime (one more copy of the weights) at a time
        try:
            expected = outputs(engine, model, batches, "original")
        except VerificationUnavailable as error:
            verify_error = str(error)
    folded_model = engine.apply(model, plan, written)
    if source_path is not None:
        del model  # loaded here, needed no more: the folded model runs without the original in memory
    memory.release()
    if expected is not None:
        try:
            difference = differences(expected, outputs(engine, folded_model, batches, "folded"))
            dtypes |= difference.dtypes
            if not difference.compared:
                verify_error = ("nothing was compared: both models output only NaN or Inf on these inputs (a BN "
                                "with bad statistics? see bnfold inspect; else pass real inputs with --data)")
        except VerificationUnavailable as error:
            verify_error = str(error)
    tolerance = default_tolerance(dtypes) if tolerance is None else tolerance
    report = FoldReport(
        model=info, plan=plan, tolerance=tolerance, difference=difference,
        verification_inputs=inputs_label, verify_error=verify_error,
        params_before=params_before, params_after=folded_model.parameter_count(),
        size_before=source_path.stat().st_size if source_path and source_path.exists() else None,
        notes=list(plan.notes), folded_model=folded_model,
    )
    if report.passed:
        for decision in plan.decisions:
            if decision.status is FoldStatus.FOLDABLE:
                decision.status = FoldStatus.FOLDED
        if output_path is not None:
            report.size_after = atomic_write(output_path, folded_model.save, replace=force or in_place)
            report.output = str(output_path)
    return report


# Real-data verification compares this many batches: enough to cover varied inputs, cheap to run twice.
VERIFY_BATCHES = 4


def _data_batches(model: Model, data: object, options: DataOptions | None) -> list[Batch]:
    from bnfold.recalibration import data_inputs

    stream = open_data(data, data_inputs(model), options)
    return list(islice(stream.batches(), VERIFY_BATCHES))


class VerificationUnavailable(Exception):
    """The model could not be run, so the fold cannot be proven (reported, never treated as success)."""


def compare(engine: Engine, reference: Model, candidate: Model, batches: Sequence[Batch]) -> OutputDifference:
    """Run the reference on every batch, then the candidate, and accumulate the output difference."""
    expected = outputs(engine, reference, batches, "original")
    return differences(expected, outputs(engine, candidate, batches, "folded"))


def outputs(engine: Engine, model: Model, batches: Sequence[Batch], role: str) -> list[list[np.ndarray]]:
    """The `role` ("original" or "folded") model's outputs per batch; VerificationUnavailable when it
    does not run (an original that does not run proves nothing either)."""
    try:
        return engine.outputs(model, batches)
    except Exception as error:
        raise VerificationUnavailable(f"the {role} model does not run: {first_line(error)}") from None


def differences(expected: Sequence[list[np.ndarray]], actual: Sequence[list[np.ndarray]]) -> OutputDifference:
    difference = OutputDifference()
    for reference, candidate in zip(expected, actual, strict=True):
        difference.add(reference, candidate)
    return difference
