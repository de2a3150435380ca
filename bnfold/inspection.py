"""`inspect`: list every BN layer with its statistics, health findings and fold status.

With data, also how far each layer's running statistics are from what it sees at inference: one
eval-mode pass with the current statistics everywhere (so each layer is measured on the inputs it
really gets in deployment, upstream drift included). The whole-model comparison runs the data through
the model as it is and through a copy whose statistics are the data's own population statistics
(`recalibrate --method fast`: BN layers normalize by batch statistics, dropout off). Population rather
than per-batch statistics, because per-batch outputs carry batch-size noise: on the sample mlp, clean
data in batches of 16 gave a softmax KL (0.104) as large as sensor-shifted data in batches of 64 (0.099).
"""

from __future__ import annotations

from dataclasses import replace

from bnfold.data import DataOptions, open_data
from bnfold.discrepancy import DriftLimits, OutputComparison, compare_layer
from bnfold.engine import engine_for
from bnfold.formats import as_model
from bnfold.health import check_layers
from bnfold.layers import Severity
from bnfold.model import LoadOptions, Model
from bnfold.plan import FoldOptions
from bnfold.reports.inspect import InspectReport, ModelInfo
from bnfold.verify import InputShapes, example_batch, parse_input_shapes


def inspect(source: object, data: object | None = None, *, fail_on: str | Severity | None = Severity.ERROR,
            allow_pickle: bool = False, model_factory: str | None = None, limits: DriftLimits = DriftLimits(),
            data_options: DataOptions | None = None, input_shape: InputShapes | None = None,
            strict_inputs: bool = False) -> InspectReport:
    """Audit a model's BN layers, and with `data` measure how far their statistics have drifted.

    `source` is a path (any supported format), an `onnx.ModelProto` or a torch module/program; `data`
    anything `bnfold.data.open_data` takes. Returns an `InspectReport`: `layers`, `findings`, `folds` (the
    decision `fold` would make per layer) and, with data, `discrepancy` per layer and `model_discrepancy`
    judged against `limits`; it is falsy when a finding reaches `fail_on` ("error", "warning", or None).
    `input_shape` (e.g. "1,3,224,224" or (1, 3, 224, 224)) lets the fold analysis of formats that record
    no input shape (eager modules, TorchScript) prove what depends on shapes, as `fold --input-shape` does, and
    `strict_inputs` keeps ONNX BN whose parameters are also graph inputs, as `fold --strict-inputs` does.
    """
    model = as_model(source, LoadOptions(allow_pickle=allow_pickle, model_factory=model_factory))
    layers = model.bn_layers()
    example = example_batch(model.input_specs(), parse_input_shapes(input_shape))
    plan = engine_for(model).plan(model, FoldOptions(strict_inputs=strict_inputs, example_batch=example))
    folds = plan.by_layer() if plan.failure is None else None  # unanalysed: no layer is known to be kept
    for layer in layers:  # the fold analysis knows the producer; health checks use it
        decision = folds.get(layer.name) if folds is not None else None
        if decision is not None and decision.producer_bias:
            layer.extra.setdefault("producer_bias", decision.producer_bias)
    notes = [] if layers else ["no BatchNorm layers found"]
    if plan.failure is not None:
        notes.append(f"fold analysis not available: {plan.failure}")
    report = InspectReport(
        model=ModelInfo(str(model.path), model.format.value, model.framework),
        layers=layers,
        findings=check_layers(layers),
        folds=folds,
        fold_error=plan.failure,
        fail_on=_severity(fail_on),
        notes=notes,
        limits=limits,
    )
    if data is not None:
        _measure_drift(report, model, data, data_options or DataOptions())
    return report


# The reference statistics come from BN layers normalizing by batch statistics, which must mean something:
# on the sample mlp the clean-data output distance is 0.072 with exact statistics, 0.075 from batches of 32,
# 0.153 from batches of 4, and meaningless from batches of 1.
MIN_REFERENCE_BATCH = 4


def _measure_drift(report: InspectReport, model: Model, data: object, options: DataOptions) -> None:
    """Fill in the report's discrepancy per layer and for the outputs (see the module docstring)."""
    from bnfold.recalibration import Method, recalibrate, statistics_runner

    runner = statistics_runner(model)
    stream = open_data(data, runner.inputs(), replace(options, min_batch=max(options.min_batch, MIN_REFERENCE_BATCH)))
    report.data = stream.description
    report.notes.extend(stream.notes)
    layers = runner.layers()
    report.discrepancy = {}
    if not layers:
        report.notes.append("no BN layer with running statistics: nothing to compare with the data")
        return
    observed = runner.run_pass(stream.batches(), [layer.name for layer in layers], batch_statistics=False)
    for layer in layers:
        drift = compare_layer(layer, observed[layer.name], report.limits) if layer.name in observed else None
        if drift is not None:
            report.discrepancy[layer.name] = drift
    reference = recalibrate(model, stream, method=Method.FAST).result
    engine = engine_for(model)
    outputs = OutputComparison(report.limits)
    smallest = None
    for batch in stream.batches():
        rows = len(next(iter(batch.values())))
        smallest = rows if smallest is None else min(smallest, rows)
        outputs.add(engine.run(model, batch), engine.run(reference, batch))
    if smallest is not None and smallest < MIN_REFERENCE_BATCH:
        report.notes.append(f"batches of {smallest} samples are too small for batch statistics: the whole-model "
                            f"comparison was skipped (use batches of {MIN_REFERENCE_BATCH} or more)")
        return
    report.model_discrepancy = outputs


def _severity(fail_on: str | Severity | None) -> Severity | None:
    if fail_on is None or fail_on == "never":
        return None
    return Severity(fail_on)


__all__ = ["inspect"]
