"""The `inspect` report: every BN layer, its statistics, fold status and findings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from bnfold.layers import BNLayer, Finding, FoldDecision, FoldStatus, Severity, summarize
from bnfold.reports.base import SEVERITY_STYLE, Report, finding_line, fmt_number, fmt_range


@dataclass
class ModelInfo:
    """Which file was read, and as what."""

    path: str
    format: str
    framework: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "format": self.format, "framework": self.framework}


@dataclass
class InspectReport(Report):
    """BN layers with findings; fails when a finding reaches `fail_on` (None: never fails)."""

    kind = "inspect"
    model: ModelInfo
    layers: list[BNLayer]
    findings: list[Finding]
    folds: dict[str, FoldDecision] | None = None  # None when fold analysis is not available
    fail_on: Severity | None = Severity.ERROR
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        if self.fail_on is None:
            return True
        return not any(f.severity.rank >= self.fail_on.rank for f in self.findings)

    def findings_for(self, layer: str) -> list[Finding]:
        return [f for f in self.findings if f.layer == layer]

    def counts(self) -> dict[str, int]:
        by_severity = {s.value: sum(f.severity is s for f in self.findings) for s in Severity}
        foldable = None if self.folds is None else sum(
            d.status is not FoldStatus.KEPT for d in self.folds.values())
        return {"layers": len(self.layers), "foldable": foldable, **by_severity}

    def body(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            entry = layer.to_dict()
            decision = self.folds.get(layer.name) if self.folds is not None else None
            entry["fold"] = decision.to_dict() if decision else None
            entry["findings"] = [f.to_dict() for f in self.findings_for(layer.name)]
            layers.append(entry)
        return {
            "model": self.model.to_dict(),
            "fail_on": self.fail_on.value if self.fail_on else "never",
            "summary": self.counts(),
            "layers": layers,
            "findings": [f.to_dict() for f in self.findings],
            "notes": self.notes,
        }

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        counts = self.counts()
        title = (f"{self.model.path} ({self.model.format}): {counts['layers']} BN layers"
                 + (f", {counts['foldable']} foldable" if counts["foldable"] is not None else ""))
        table = Table(title=title, title_justify="left", show_lines=False)
        for column, justify in (("layer", "left"), ("kind", "left"), ("ch", "right"), ("eps", "right"),
                                ("running mean", "right"), ("running var", "right"), ("gain", "right"),
                                ("fold", "left"), ("health", "left")):
            table.add_column(column, justify=justify, overflow="fold")
        for layer in self.layers:
            decision = self.folds.get(layer.name) if self.folds is not None else None
            table.add_row(layer.name, layer.kind, str(layer.channels), fmt_number(layer.eps, 2),
                          fmt_range(summarize(layer.running_mean)), fmt_range(summarize(layer.running_var)),
                          fmt_range(summarize(layer.effective_gain())),
                          decision.describe() if decision else "-", _health(self.findings_for(layer.name)))
        yield table
        for finding in self.findings:
            yield finding_line(finding)
        for note in self.notes:
            yield Text(note, style="dim")
        summary = ", ".join(f"{counts[s.value]} {s.value}s" for s in (Severity.ERROR, Severity.WARNING, Severity.INFO))
        yield Text(f"{summary}; " + ("passed" if self.passed else f"failed (--fail-on {self.fail_on.value})"),
                   style="green" if self.passed else "bold red")


def _health(findings: list[Finding]) -> Text:
    if not findings:
        return Text("ok", style="green")
    worst = max(findings, key=lambda f: f.severity.rank)
    codes = ", ".join(dict.fromkeys(f.code for f in findings))
    return Text(codes, style=SEVERITY_STYLE[worst.severity])
