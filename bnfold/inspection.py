"""`inspect`: list every BN layer with its statistics, health findings and fold status."""

from __future__ import annotations

from bnfold.engine import engine_for
from bnfold.formats import as_model
from bnfold.health import check_layers
from bnfold.layers import Severity
from bnfold.model import LoadOptions
from bnfold.reports.inspect import InspectReport, ModelInfo


def inspect(source: object, *, fail_on: str | Severity | None = Severity.ERROR, allow_pickle: bool = False,
            model_factory: str | None = None) -> InspectReport:
    """Audit a model's BN layers.

    `source` is a path (any supported format), an `onnx.ModelProto` or a torch module/program.
    Returns an `InspectReport`: `layers`, `findings`, `folds` (the decision `fold` would make per layer);
    it is falsy when a finding reaches `fail_on` ("error", "warning", or None for never).
    """
    model = as_model(source, LoadOptions(allow_pickle=allow_pickle, model_factory=model_factory))
    layers = model.bn_layers()
    plan = engine_for(model).plan(model)
    folds = plan.by_layer()
    for layer in layers:  # the fold analysis knows the producer; health checks use it
        decision = folds.get(layer.name)
        if decision is not None and decision.producer_bias:
            layer.extra.setdefault("producer_bias", decision.producer_bias)
    notes = [] if layers else ["no BatchNorm layers found"]
    return InspectReport(
        model=ModelInfo(str(model.path), model.format.value, model.framework),
        layers=layers,
        findings=check_layers(layers),
        folds=folds,
        fail_on=_severity(fail_on),
        notes=notes,
    )


def _severity(fail_on: str | Severity | None) -> Severity | None:
    if fail_on is None or fail_on == "never":
        return None
    return Severity(fail_on)


__all__ = ["inspect"]
