"""The `check` report: one result per policy, the failures behind it, and the CI renderings.

Besides Rich and JSON the report renders itself as JUnit XML (one test case per policy and per BN
layer, so CI dashboards list them), GitHub workflow commands (annotations) and a Markdown summary.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from bnfold.layers import Finding, Severity
from bnfold.policy import Policy
from bnfold.reports.base import Report
from bnfold.reports.inspect import InspectReport


class Outcome(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"  # the policy is off, or cannot apply (no data, no classifier output)


@dataclass(frozen=True)
class Failure:
    """One reason a policy failed, attributed to a BN layer when it is about one."""

    message: str
    layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "message": self.message}


@dataclass
class PolicyResult:
    """The outcome of one policy; `detail` is a one-line summary such as the worst value against the limit."""

    policy: str
    limit: Any
    outcome: Outcome
    detail: str
    failures: list[Failure] = field(default_factory=list)

    @property
    def limit_text(self) -> str:
        if isinstance(self.limit, bool):
            return "on" if self.limit else "off"
        return f"{self.limit:g}" if isinstance(self.limit, float) else str(self.limit)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "limit": self.limit, "outcome": self.outcome.value, "detail": self.detail,
                "failures": [f.to_dict() for f in self.failures]}


@dataclass
class CheckReport(Report):
    """Passed when no policy failed; skipped policies do not fail."""

    kind = "check"
    inspection: InspectReport
    policy: Policy
    results: list[PolicyResult]

    @property
    def passed(self) -> bool:
        return all(r.outcome is not Outcome.FAILED for r in self.results)

    @property
    def failed(self) -> list[PolicyResult]:
        return [r for r in self.results if r.outcome is Outcome.FAILED]

    def layer_failures(self, layer: str) -> list[tuple[str, Failure]]:
        return [(r.policy, f) for r in self.results for f in r.failures if f.layer == layer]

    def notices(self) -> list[Finding]:
        """Warnings that do not fail the gate but deserve a look (static findings below --fail-on)."""
        fail_on = self.policy.fail_on
        return [f for f in self.inspection.findings
                if f.severity is Severity.WARNING and (fail_on is None or f.severity.rank < fail_on.rank)]

    def body(self) -> dict[str, Any]:
        inspection = self.inspection
        layers = []
        for layer in inspection.layers:
            drift = inspection.discrepancy.get(layer.name) if inspection.discrepancy else None
            failures = self.layer_failures(layer.name)
            layers.append({"name": layer.name, "passed": not failures,
                           "failures": [{"policy": p, **f.to_dict()} for p, f in failures],
                           "discrepancy": drift.to_dict() if drift else None})
        return {
            "model": inspection.model.to_dict(),
            "data": inspection.data,
            "policy": self.policy.to_dict(),
            "policies": [r.to_dict() for r in self.results],
            "layers": layers,
            "model_discrepancy": inspection.model_discrepancy.to_dict() if inspection.model_discrepancy else None,
            "findings": [f.to_dict() for f in inspection.findings],
            "notes": inspection.notes,
        }

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        model = self.inspection.model
        # the title above the table, not in it: a table title wraps at the table's width
        yield Text(f"bnfold check {model.path} ({model.format})"
                   + (f" on {self.inspection.data}" if self.inspection.data else ""), style="bold")
        table = Table()
        for column in ("policy", "limit", "result", "detail"):
            table.add_column(column, overflow="fold")
        for result in self.results:
            table.add_row(result.policy, result.limit_text, Text(result.outcome.value, style=_STYLE[result.outcome]),
                          result.detail)
        yield table
        for result in self.failed:
            for failure in result.failures:
                yield Text.assemble((f"{result.policy}: ", "bold red"), (f"{failure.layer}: " if failure.layer else ""),
                                    failure.message)
        for note in self.inspection.notes:
            yield Text(note, style="dim")
        yield Text("check passed" if self.passed else
                   f"check failed: {', '.join(r.policy for r in self.failed)}",
                   style="green" if self.passed else "bold red")

    def junit_xml(self) -> str:
        """JUnit XML: a test case per policy (classname bnfold.policy) and per layer (bnfold.layer)."""
        cases: list[ET.Element] = []
        for result in self.results:
            case = ET.Element("testcase", classname="bnfold.policy", name=result.policy, time="0")
            if result.outcome is Outcome.FAILED:
                failure = ET.SubElement(case, "failure", message=result.detail, type=result.policy)
                failure.text = "\n".join(_line(f) for f in result.failures)
            elif result.outcome is Outcome.SKIPPED:
                ET.SubElement(case, "skipped", message=result.detail)
            cases.append(case)
        for layer in self.inspection.layers:
            case = ET.Element("testcase", classname="bnfold.layer", name=layer.name, time="0")
            failures = self.layer_failures(layer.name)
            if failures:
                failure = ET.SubElement(case, "failure", message=f"{len(failures)} policy failure(s)",
                                        type=", ".join(dict.fromkeys(p for p, _ in failures)))
                failure.text = "\n".join(f"{p}: {f.message}" for p, f in failures)
            cases.append(case)
        counts = {"tests": str(len(cases)), "failures": str(sum(c.find("failure") is not None for c in cases)),
                  "errors": "0", "skipped": str(sum(c.find("skipped") is not None for c in cases)), "time": "0"}
        suites = ET.Element("testsuites", name="bnfold check", **counts)
        suite = ET.SubElement(suites, "testsuite", name=f"bnfold check {self.inspection.model.path}", **counts)
        properties = ET.SubElement(suite, "properties")
        for name, value in (("model", self.inspection.model.path), ("data", self.inspection.data or ""),
                            ("policy sources", ", ".join(self.policy.sources))):
            ET.SubElement(properties, "property", name=name, value=value)
        suite.extend(cases)
        ET.indent(suites)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"

    def github_annotations(self) -> list[str]:
        """`::error::` per policy failure and `::warning::` per non-failing warning finding."""
        path = self.inspection.model.path
        lines = [_command("error", f"bnfold check: {r.policy}", path, _line(f))
                 for r in self.failed for f in r.failures]
        lines += [_command("warning", f"bnfold: {f.code}", path, _line(Failure(f.message, f.layer)))
                  for f in self.notices()]
        return lines

    def markdown(self) -> str:
        """A Markdown summary for $GITHUB_STEP_SUMMARY: the policies, then the drift of each layer."""
        model = self.inspection.model
        verdict = "passed ✅" if self.passed else "failed ❌"
        lines = [f"### bnfold check `{model.path}`: {verdict}", ""]
        if self.inspection.data:
            lines += [f"Data: `{self.inspection.data}`", ""]
        lines += ["| policy | limit | result | detail |", "|---|---|---|---|"]
        lines += [f"| {r.policy} | {r.limit_text} | {r.outcome.value} | {_cell(r.detail)} |" for r in self.results]
        drift = self.inspection.discrepancy
        if drift:
            lines += ["", "| BN layer | KL (mean / max) | mean shift (mean / max) | verdict |", "|---|---|---|---|"]
            for item in sorted(drift.values(), key=lambda d: -d.severity):
                lines.append(f"| {_cell(item.layer)} | {item.kl.mean:.3g} / {item.kl.max:.3g} | "
                             f"{item.mean_shift.mean:.3g} / {item.mean_shift.max:.3g} | {item.verdict} |")
        return "\n".join(lines) + "\n"


_STYLE = {Outcome.PASSED: "green", Outcome.FAILED: "bold red", Outcome.SKIPPED: "dim"}


def _line(failure: Failure) -> str:
    return f"{failure.layer}: {failure.message}" if failure.layer else failure.message


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _command(level: str, title: str, path: str, message: str) -> str:
    """A GitHub workflow command, escaped as the runner expects (properties also escape ':' and ',')."""
    def data(text: str) -> str:
        return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    def prop(text: str) -> str:
        return data(text).replace(":", "%3A").replace(",", "%2C")

    return f"::{level} file={prop(path)},title={prop(title)}::{data(message)}"
