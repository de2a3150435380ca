"""The `inspect` report: every BN layer, its statistics, fold status and findings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from bnfold.discrepancy import DriftLimits, LayerDiscrepancy, OutputComparison
from bnfold.layers import BNLayer, Finding, FoldDecision, FoldStatus, Severity, summarize
from bnfold.reports.base import SEVERITY_STYLE, Report, finding_line, fmt_channels, fmt_eps, fmt_number, fmt_range


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
    fold_error: str | None = None  # why the fold analysis could not run (folds is None; the notes say it too)
    fail_on: Severity | None = Severity.ERROR
    notes: list[str] = field(default_factory=list)
    # With data (`inspect --data`): what it was, and how far the running statistics are from it.
    data: str | None = None
    discrepancy: dict[str, LayerDiscrepancy] | None = None
    model_discrepancy: OutputComparison | None = None
    limits: DriftLimits = field(default_factory=DriftLimits)

    RECALIBRATE = "statistics drifted: run bnfold recalibrate"

    @property
    def passed(self) -> bool:
        if self.fail_on is None:
            return True
        return not any(f.severity.rank >= self.fail_on.rank for f in self.findings)

    @property
    def drifted(self) -> bool:
        layers = any(d.drifted for d in (self.discrepancy or {}).values())
        return layers or bool(self.model_discrepancy and self.model_discrepancy.drifted)

    @property
    def recommendation(self) -> str | None:
        return self.RECALIBRATE if self.drifted else None

    def by_drift(self) -> list[BNLayer]:
        """Layers worst-drifted first when data was given (unmeasured last), else in model order."""
        if not self.discrepancy:
            return list(self.layers)
        drift = self.discrepancy
        return sorted(self.layers, key=lambda layer: -drift[layer.name].severity if layer.name in drift else 1)

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
            drift = self.discrepancy.get(layer.name) if self.discrepancy is not None else None
            entry["discrepancy"] = drift.to_dict() if drift else None
            layers.append(entry)
        return {
            "model": self.model.to_dict(),
            "fail_on": self.fail_on.value if self.fail_on else "never",
            "summary": self.counts(),
            "layers": layers,
            "findings": [f.to_dict() for f in self.findings],
            "fold_error": self.fold_error,
            "notes": self.notes,
            "data": self.data,
            "limits": self.limits.to_dict() if self.data else None,
            "model_discrepancy": self.model_discrepancy.to_dict() if self.model_discrepancy else None,
            "recommendation": self.recommendation,
        }

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        counts = self.counts()
        # Columns every layer shares (kind, eps) move into the title to leave room for names.
        kinds = {layer.kind for layer in self.layers}
        epsilons = {fmt_eps(layer) for layer in self.layers}
        shared = [f"all {next(iter(kinds))}"] if len(kinds) == 1 else []
        shared += [f"eps {next(iter(epsilons))}"] if len(epsilons) == 1 else []
        title = (f"{self.model.path} ({self.model.format}): {counts['layers']} BN layers"
                 + (f", {counts['foldable']} foldable" if counts["foldable"] is not None else "")
                 + (f" ({', '.join(shared)})" if shared else ""))
        yield Text(title, style="bold")
        table = Table(show_lines=False)
        columns = [("layer", "left", True), ("kind", "left", True), ("ch", "right", False), ("eps", "right", False),
                   ("running mean", "right", False), ("running var", "right", False), ("gain", "right", False),
                   ("fold", "left", True), ("health", "left", True)]
        hidden = {"kind"} if len(kinds) == 1 else set()
        hidden |= {"eps"} if len(epsilons) == 1 else set()
        for column, justify, wrap in columns:
            if column not in hidden:
                table.add_column(column, justify=justify, overflow="fold", no_wrap=not wrap)
        if self.discrepancy is not None:
            table.add_column("drift (KL, shift)", overflow="fold")
        for layer in self.by_drift():
            decision = self.folds.get(layer.name) if self.folds is not None else None
            drift = [] if self.discrepancy is None else [_drift(self.discrepancy.get(layer.name))]
            cells = {"layer": layer.name, "kind": layer.kind, "ch": fmt_channels(layer),
                     "eps": fmt_eps(layer), "running mean": fmt_range(summarize(layer.running_mean)),
                     "running var": fmt_range(summarize(layer.running_var)),
                     "gain": fmt_range(summarize(layer.effective_gain())), "fold": _fold_cell(decision),
                     "health": _health(self.findings_for(layer.name))}
            table.add_row(*(cells[column] for column, _, _ in columns if column not in hidden), *drift)
        yield table
        for decision in (self.folds or {}).values():
            if decision.status is FoldStatus.KEPT:
                yield Text.assemble(("kept    ", "red"), (f"{decision.layer}: ", "bold"), decision.reason or "")
        if self.data is not None:
            yield _model_drift(self.data, self.model_discrepancy)
        if self.recommendation:
            yield Text(self.recommendation, style="bold yellow")
        for finding in self.findings:
            yield finding_line(finding)
        for note in self.notes:
            yield Text(note, style="dim")
        summary = ", ".join(f"{counts[s.value]} {s.value}s" for s in (Severity.ERROR, Severity.WARNING, Severity.INFO))
        yield Text(f"{summary}; " + ("passed" if self.passed else f"failed (--fail-on {self.fail_on.value})"),
                   style="green" if self.passed else "bold red")


def _fold_cell(decision: FoldDecision | None) -> Text:
    """Short fold status for the table; reasons for kept layers are listed below it."""
    if decision is None:
        return Text("-", style="dim")
    if decision.status is FoldStatus.KEPT:
        return Text("kept", style="red")
    return Text(decision.destination(), style="green")


def _health(findings: list[Finding]) -> Text:
    if not findings:
        return Text("ok", style="green")
    worst = max(findings, key=lambda f: f.severity.rank)
    codes = ", ".join(dict.fromkeys(f.code for f in findings))
    return Text(codes, style=SEVERITY_STYLE[worst.severity])


def _drift(drift: LayerDiscrepancy | None) -> Text:
    if drift is None:
        return Text("-", style="dim")
    return Text(f"{drift.verdict} ({fmt_number(drift.kl.mean)}, {fmt_number(drift.mean_shift.mean)})",
                style="yellow" if drift.drifted else "green")


def _model_drift(data: str, outputs: OutputComparison | None) -> Text:
    if outputs is None:
        return Text(f"data: {data}", style="dim")
    line = Text(f"outputs on {data} ({outputs.samples} samples), running vs data statistics: "
                f"relative L2 {fmt_number(outputs.relative_l2)}")
    if outputs.classifier:
        line.append(f", softmax KL {fmt_number(outputs.softmax_kl)}, top-1 agreement {outputs.top1_agreement:.1%}")
    return line
