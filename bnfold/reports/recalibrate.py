"""The `recalibrate` report: per BN layer, the statistics before and after, and how well they are known."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from bnfold.discrepancy import shift_and_ratio
from bnfold.layers import Finding, summarize
from bnfold.model import Model
from bnfold.reports.base import Report, finding_line, fmt_number
from bnfold.reports.inspect import ModelInfo


@dataclass
class LayerRecalibration:
    """One recalibrated BN layer: old and new statistics (float64, as stored) and their uncertainty."""

    name: str
    kind: str
    channels: int
    eps: float
    pass_number: int  # the forward pass (1-based) that measured this layer's input
    samples: int  # samples (batch rows) that reached the layer
    values_per_channel: int  # samples times spatial positions
    batches: int
    old_mean: np.ndarray | None
    old_var: np.ndarray | None
    new_mean: np.ndarray
    new_var: np.ndarray
    standard_error: np.ndarray  # of new_mean, per channel, from the spread of per-sample (or batch) means

    def drift(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per channel, how far the input moved: the mean shift in old standard deviations and the variance
        ratio new/old (the gain changes by its inverse square root), as `inspect --data` measures drift."""
        if self.old_mean is None or self.old_var is None:
            return None, None
        return shift_and_ratio(self.new_mean, self.new_var, self.old_mean, self.old_var, self.eps)

    def relative_error(self) -> np.ndarray:
        """Standard error of the new mean in units of the new standard deviation (0.05 = known to 5%)."""
        return self.standard_error / np.sqrt(self.new_var + self.eps)

    def to_dict(self) -> dict[str, Any]:
        shift, ratio = self.drift()
        return {
            "name": self.name,
            "kind": self.kind,
            "channels": self.channels,
            "pass": self.pass_number,
            "samples": self.samples,
            "values_per_channel": self.values_per_channel,
            "batches": self.batches,
            "old_mean": summarize(self.old_mean),
            "new_mean": summarize(self.new_mean),
            "old_var": summarize(self.old_var),
            "new_var": summarize(self.new_var),
            "mean_shift_in_old_std": summarize(shift),
            "variance_ratio": summarize(ratio),
            "standard_error": summarize(self.standard_error),
            "relative_standard_error": summarize(self.relative_error()),
        }


@dataclass(frozen=True)
class SkippedLayer:
    """A BN layer left as it was, and why."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass
class RecalibrateReport(Report):
    """The recalibrated layers, the forward passes it took, and where the result was written."""

    kind = "recalibrate"
    model: ModelInfo
    method: str
    data: str
    samples: int
    passes: int
    layers: list[LayerRecalibration]
    skipped: list[SkippedLayer] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    # The recalibrated model, in memory (also when nothing was written); not part of the JSON.
    result: Model | None = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return bool(self.layers)

    def body(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "method": self.method,
            "data": self.data,
            "samples": self.samples,
            "forward_passes": self.passes,
            "output": self.output,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": [layer.to_dict() for layer in self.skipped],
            "findings": [finding.to_dict() for finding in self.findings],
            "notes": self.notes,
        }

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        title = (f"{self.model.path} ({self.model.format}): {len(self.layers)} BN layers recalibrated "
                 f"({self.method}) on {self.samples} samples of {self.data}")
        yield Text(title, style="bold")  # above the table, not in it: a table title wraps at its width
        table = Table()
        for column, justify in (("layer", "left"), ("pass", "right"), ("samples", "right"),
                                ("mean old → new", "right"), ("var old → new", "right"),
                                ("max shift (σ)", "right"), ("var ratio", "right"), ("max rel. SE", "right")):
            table.add_column(column, justify=justify, overflow="fold")
        for layer in self.layers:
            shift, ratio = layer.drift()
            table.add_row(
                layer.name, str(layer.pass_number), str(layer.samples),
                f"{_over_channels(layer.old_mean, np.mean)} → {_over_channels(layer.new_mean, np.mean)}",
                f"{_over_channels(layer.old_var, np.mean)} → {_over_channels(layer.new_var, np.mean)}",
                _over_channels(shift),
                "-" if ratio is None else f"{_over_channels(ratio, np.min)}..{_over_channels(ratio)}",
                _over_channels(layer.relative_error()))
        yield table
        for layer in self.skipped:
            yield Text(f"skipped {layer.name}: {layer.reason}", style="yellow")
        for finding in self.findings:
            yield finding_line(finding)
        for note in self.notes:
            yield Text(note, style="dim")
        where = f"written to {self.output}" if self.output else "not written (no output given)"
        yield Text(f"{self.passes} forward pass{'es' if self.passes != 1 else ''} over the data; {where}",
                   style="green" if self.passed else "bold red")


def _over_channels(values: np.ndarray | None, reduce=np.max) -> str:
    """One number for a per-channel array (its max, mean, ...), over the finite channels."""
    finite = np.zeros(0) if values is None else np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return fmt_number(float(reduce(finite))) if finite.size else "?"
