"""`check`: the CI gate. Inspect the model (on data when given), then hold the result against a policy.

Outputs for CI: JUnit XML written atomically (`write_junit`), and under GitHub Actions
(GITHUB_ACTIONS=true) workflow-command annotations plus a Markdown table appended to
$GITHUB_STEP_SUMMARY (`publish_github`). Annotations go to stdout, where GitHub documents workflow
commands, except with `--json`: stdout then carries the JSON document alone and the annotations go to
stderr, which the Actions runner scans for workflow commands too (actions/runner,
src/Runner.Worker/Handlers/ScriptHandler.cs, feeds both streams through the same command parser).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from bnfold.data import DataOptions
from bnfold.errors import OutputError
from bnfold.inspection import inspect
from bnfold.layers import FoldStatus
from bnfold.output import atomic_write, check_output_path
from bnfold.policy import Policy, load_policy
from bnfold.reports.check import CheckReport, Failure, Outcome, PolicyResult
from bnfold.reports.inspect import InspectReport
from bnfold.verify import InputShapes


def check(source: object, data: object | None = None, *, policy: Policy | None = None,
          config: str | Path | None = None, data_options: DataOptions | None = None,
          allow_pickle: bool = False, model_factory: str | None = None, input_shape: InputShapes | None = None,
          strict_inputs: bool = False) -> CheckReport:
    """Gate a model: static findings, fold state and (with `data`) statistics drift against a policy.

    `policy` defaults to `load_policy(config)` (the nearest bnfold.toml / pyproject [tool.bnfold]).
    `data`, `data_options`, `input_shape` and `strict_inputs` are those of `inspect`. Returns a
    `CheckReport`, truthy when no policy failed.
    """
    policy = policy or load_policy(config)
    inspection = inspect(source, data, limits=policy.limits, fail_on=None, data_options=data_options,
                         allow_pickle=allow_pickle, model_factory=model_factory, input_shape=input_shape,
                         strict_inputs=strict_inputs)
    return CheckReport(inspection, policy, evaluate(inspection, policy))


def evaluate(inspection: InspectReport, policy: Policy) -> list[PolicyResult]:
    """One result per policy, in a fixed order: static findings, fold state, layer drift, output drift."""
    limits = policy.limits
    return [_fail_on(inspection, policy), _require_folded(inspection, policy),
            _layer_limit(inspection, "max-layer-kl", limits.max_layer_kl, lambda d: d.kl.mean),
            _layer_limit(inspection, "max-mean-shift", limits.max_mean_shift, lambda d: d.mean_shift.mean),
            _output_limit(inspection, "max-output-kl", limits.max_output_kl, "softmax KL", lambda o: o.softmax_kl),
            _output_limit(inspection, "max-output-l2", limits.max_output_l2, "relative L2 distance",
                          lambda o: o.relative_l2)]


def _fail_on(inspection: InspectReport, policy: Policy) -> PolicyResult:
    if policy.fail_on is None:
        return PolicyResult("fail-on", "never", Outcome.SKIPPED, "static findings never fail")
    rank = policy.fail_on.rank
    failing = [f for f in inspection.findings if f.severity.rank >= rank]
    failures = [Failure(f"{f.severity.value} {f.code}: {f.message}" + (f" (hint: {f.hint})" if f.hint else ""),
                        f.layer) for f in failing]
    detail = (f"{len(failing)} finding(s) at {policy.fail_on.value} or worse" if failing
              else f"no finding at {policy.fail_on.value} or worse")
    return PolicyResult("fail-on", policy.fail_on.value, Outcome.FAILED if failing else Outcome.PASSED,
                        detail, failures)


def _require_folded(inspection: InspectReport, policy: Policy) -> PolicyResult:
    if not policy.require_folded:
        return PolicyResult("require-folded", False, Outcome.SKIPPED, "not required")
    if inspection.fold_error is not None:  # a gate that cannot tell must not pass
        return PolicyResult("require-folded", True, Outcome.FAILED, "fold analysis not available", [Failure(
            f"bnfold cannot analyse the model ({inspection.fold_error}), so foldable BN may remain")])
    foldable = [d for d in (inspection.folds or {}).values() if d.status is not FoldStatus.KEPT]
    failures = [Failure(f"BN still in the model, {d.describe()}: run bnfold fold", d.layer) for d in foldable]
    kept = len(inspection.layers) - len(foldable)
    detail = (f"{len(foldable)} foldable BN layer(s) remain" if foldable
              else f"no foldable BN left ({kept} kept, not exactly foldable)" if kept else "no BN left")
    return PolicyResult("require-folded", True, Outcome.FAILED if foldable else Outcome.PASSED, detail, failures)


def _layer_limit(inspection: InspectReport, name: str, limit: float, measure: Callable) -> PolicyResult:
    if inspection.discrepancy is None:
        return PolicyResult(name, limit, Outcome.SKIPPED, "needs --data")
    values = {layer: measure(drift) for layer, drift in inspection.discrepancy.items()}
    if not values:
        return PolicyResult(name, limit, Outcome.SKIPPED, "no BN layer with running statistics")
    over = {layer: value for layer, value in values.items() if not value <= limit}  # NaN is over
    worst = max(values, key=lambda layer: _sortable(values[layer]))
    failures = [Failure(f"{_fmt(value)} > {limit:g}: statistics drifted, run bnfold recalibrate", layer)
                for layer, value in sorted(over.items(), key=lambda item: -_sortable(item[1]))]
    detail = f"worst {worst}: {_fmt(values[worst])}" + (f"; {len(over)} layer(s) over" if over else "")
    return PolicyResult(name, limit, Outcome.FAILED if over else Outcome.PASSED, detail, failures)


def _output_limit(inspection: InspectReport, name: str, limit: float, label: str, measure: Callable) -> PolicyResult:
    outputs = inspection.model_discrepancy
    if outputs is None:
        reason = ("needs --data" if inspection.data is None else "no BN layer with running statistics"
                  if not inspection.discrepancy else "not measured: see the notes")
        return PolicyResult(name, limit, Outcome.SKIPPED, reason)
    value = measure(outputs)
    if value is None:
        return PolicyResult(name, limit, Outcome.SKIPPED, "outputs are not classifier logits")
    if value <= limit:
        return PolicyResult(name, limit, Outcome.PASSED, _fmt(value))
    return PolicyResult(name, limit, Outcome.FAILED, f"{_fmt(value)} > {limit:g}", [Failure(
        f"{label} {_fmt(value)} > {limit:g} between the outputs with running statistics and with the data's own: "
        "statistics drifted, run bnfold recalibrate")])


def _sortable(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "non-finite"


def write_junit(report: CheckReport, path: str | Path) -> None:
    """Write the JUnit XML atomically; an existing report at `path` is replaced (CI reruns overwrite)."""
    path = Path(path)
    check_output_path(path, None, force=True)
    atomic_write(path, lambda temp: temp.write_text(report.junit_xml(), encoding="utf-8"))


def publish_github(report: CheckReport, stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Under GitHub Actions: annotations to `stream` and the Markdown summary appended to
    $GITHUB_STEP_SUMMARY. Returns whether GitHub Actions was detected."""
    environ = os.environ if environ is None else environ
    if environ.get("GITHUB_ACTIONS") != "true":
        return False
    for line in report.github_annotations():
        stream.write(line + "\n")
    stream.flush()
    summary = environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(report.markdown() + "\n")
        except OSError as error:
            raise OutputError(f"cannot append to $GITHUB_STEP_SUMMARY ({summary}): {error.strerror or error}") from None
    return True


__all__ = ["check", "evaluate", "publish_github", "write_junit"]
