"""The report protocol shared by every command, and small rendering helpers."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from bnfold.layers import BNLayer, Finding, Severity

SCHEMA_VERSION = 1

SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


class Report(ABC):
    """A command's result. Truthy when it passed; `to_dict` is the JSON contract (with `schema_version`)."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def passed(self) -> bool:
        """Whether the command succeeded; the CLI maps this to the exit code."""

    @abstractmethod
    def body(self) -> dict[str, Any]:
        """The report's own fields, JSON-ready."""

    @abstractmethod
    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The human rendering."""

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        from bnfold import __version__

        return {"schema_version": SCHEMA_VERSION, "kind": self.kind, "bnfold_version": __version__,
                "passed": self.passed, **self.body()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(json_safe(self.to_dict()), indent=indent, allow_nan=False)


def json_safe(value: Any) -> Any:
    """Replace NaN/Inf by None and numpy scalars by Python numbers, so the JSON is strict."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fmt_number(value: float | None, digits: int = 3) -> str:
    """Compact number for tables; '?' when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    return f"{value:.{digits}g}"


def fmt_channels(layer: BNLayer) -> str:
    """A layer's channel count, or its activation count when it keeps statistics per activation (ONNX
    spatial=0 on feature maps); '?' when nothing in the model says (never 0, which reads as a count)."""
    if layer.channels is None:
        return "?"
    return f"{layer.channels} activations" if layer.extra.get("per_activation") else str(layer.channels)


def fmt_eps(layer: BNLayer) -> str:
    """A layer's eps in full (two layers with eps 1e-5 and 1.02e-5 differ), as the user wrote it; '?' when unknown."""
    eps = layer.shown_eps()
    return "?" if math.isnan(eps) else repr(eps)


def fmt_range(summary: dict[str, Any] | None) -> str:
    """'min..max' of a `summarize()` dict, flagging non-finite entries."""
    if summary is None:
        return "-"
    text = "?" if summary["min"] is None else f"{fmt_number(summary['min'])}..{fmt_number(summary['max'])}"
    return text + (f" ({summary['non_finite']} NaN/Inf)" if summary["non_finite"] else "")


def finding_line(finding: Finding) -> Text:
    """One finding as a styled line: severity, layer, message, hint."""
    line = Text()
    line.append(f"{finding.severity.value:<7} ", style=SEVERITY_STYLE[finding.severity])
    if finding.layer:
        line.append(f"{finding.layer}: ", style="bold")
    line.append(finding.message)
    if finding.hint:
        line.append(f" → {finding.hint}", style="dim")
    return line
