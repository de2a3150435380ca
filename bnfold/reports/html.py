"""A self-contained HTML rendering of an `inspect` or `check` report, for people and CI artifacts.

One file, nothing fetched: inline CSS, inline SVG charts, no script (a Content-Security-Policy forbids
any), so it opens from a CI artifact download without a server. Every string is escaped: layer names
come from untrusted model files. The markup is also well-formed XML, so tests can parse it strictly.

Per BN layer, worst first (by drift with data, else by the worst finding): the per-channel running
mean, variance and effective gain (one bar per channel up to `CHANNEL_BARS` channels, a histogram
beyond; log scale when positive values span more than `LOG_SPAN`), the drift against the limits, the
fold decision and the findings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from html import escape
from pathlib import Path

import numpy as np

from bnfold.discrepancy import LayerDiscrepancy
from bnfold.layers import BNLayer, Finding, FoldDecision, FoldStatus, Severity
from bnfold.output import atomic_write, check_output_path
from bnfold.reports.base import fmt_channels, fmt_eps, fmt_number
from bnfold.reports.check import CheckReport, Outcome
from bnfold.reports.inspect import InspectReport

CHANNEL_BARS = 64  # up to this many channels one bar each; beyond, a histogram
HISTOGRAM_BINS = 32
LOG_SPAN = 100.0  # positive values spanning more than this factor are drawn on a log scale


def write_html(report: InspectReport | CheckReport, path: str | Path, *, force: bool = False) -> int:
    """Write `render_html(report)` atomically to `path`; an existing file is replaced only with `force`.

    Returns the bytes written."""
    path = Path(path)
    check_output_path(path, None, force=force)
    return atomic_write(path, lambda temp: temp.write_text(render_html(report), encoding="utf-8"))


def render_html(report: InspectReport | CheckReport) -> str:
    """The whole report as one HTML document (a string; pure, deterministic)."""
    check = report if isinstance(report, CheckReport) else None
    inspection = check.inspection if check is not None else report
    layers = _worst_first(inspection)
    body = [_header(report, inspection)]
    if check is not None:
        body.append(_policies(check))
    if inspection.data is not None:
        body.append(_model_drift(inspection))
    body.append(_overview(inspection, layers, check))
    body += [_layer_card(inspection, layer, index, check) for index, layer in enumerate(layers, 1)]
    body.append(_model_findings(inspection))
    title = f"bnfold {report.kind}: {inspection.model.path}"
    return _PAGE.format(title=_e(title), css=_CSS, body="\n".join(part for part in body if part))


def _worst_first(inspection: InspectReport) -> list[BNLayer]:
    """By drift when data was measured; else by the worst finding, model order among equals."""
    if inspection.discrepancy:
        return inspection.by_drift()
    return sorted(inspection.layers, key=lambda layer: -_worst_rank(inspection.findings_for(layer.name)))


def _worst_rank(findings: list[Finding]) -> int:
    return max((f.severity.rank for f in findings), default=-1)


# ---- sections -----------------------------------------------------------------------------------------

def _header(report: InspectReport | CheckReport, inspection: InspectReport) -> str:
    from bnfold import __version__

    counts = inspection.counts()
    if isinstance(report, CheckReport):
        verdict = "passed" if report.passed else "failed: " + ", ".join(r.policy for r in report.failed)
    else:
        verdict = "passed" if report.passed else f"failed (--fail-on {inspection.fail_on.value})"
    model = inspection.model
    facts = [("model", model.path), ("format", f"{model.format} ({model.framework})")]
    if inspection.data is not None:
        facts.append(("data", inspection.data))
    facts.append(("bnfold", __version__))
    kept = None if inspection.folds is None else sum(d.status is FoldStatus.KEPT for d in inspection.folds.values())
    drifted = None if inspection.discrepancy is None else sum(d.drifted for d in inspection.discrepancy.values())
    tiles = [("BN layers", counts["layers"], ""), ("foldable", counts["foldable"], ""), ("kept", kept, ""),
             ("drifted", drifted, "bad" if drifted else ""), ("errors", counts["error"], "bad" if counts["error"] else ""),
             ("warnings", counts["warning"], "warn" if counts["warning"] else ""), ("infos", counts["info"], "")]
    return (f'<header class="top"><div class="title"><h1>bnfold {_e(report.kind)}</h1>'
            f'<span class="verdict {"pass" if report.passed else "fail"}">{_e(verdict)}</span></div>'
            '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"
            '<div class="tiles">' + "".join(f'<div class="tile {cls}"><b>{_e(value)}</b><span>{_e(label)}</span></div>'
                                            for label, value, cls in tiles if value is not None) + "</div>"
            + (f'<p class="advice">{_e(inspection.recommendation)}</p>' if inspection.recommendation else "")
            + "</header>")


def _policies(check: CheckReport) -> str:
    rows = []
    for result in check.results:
        failures = "".join(f"<li>{_layer_prefix(f.layer)}{_e(f.message)}</li>" for f in result.failures)
        rows.append(f'<tr><td class="mono">{_e(result.policy)}</td><td>{_e(result.limit_text)}</td>'
                    f'<td>{_pill(result.outcome.value, _OUTCOME_CLASS[result.outcome])}</td>'
                    f'<td>{_e(result.detail)}' + (f'<ul class="failures">{failures}</ul>' if failures else "")
                    + "</td></tr>")
    return _section("Policies", '<table class="grid"><thead><tr><th>policy</th><th>limit</th><th>result</th>'
                                "<th>detail</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _model_drift(inspection: InspectReport) -> str:
    """The whole-model comparison: outputs with running statistics vs with the data's own."""
    outputs, limits = inspection.model_discrepancy, inspection.limits
    if outputs is None:
        return _section("Outputs on the data", '<p class="muted">not measured: '
                        + _e("; ".join(inspection.notes) or "no BN layer with running statistics") + "</p>")
    rows = [_measure_row("relative L2", outputs.relative_l2, limits.max_output_l2, _scale([outputs.relative_l2],
                                                                                         limits.max_output_l2))]
    if outputs.softmax_kl is not None:
        rows.append(_measure_row("softmax KL", outputs.softmax_kl, limits.max_output_kl,
                                 _scale([outputs.softmax_kl], limits.max_output_kl)))
    if outputs.top1_agreement is not None:
        agreement = outputs.top1_agreement
        rows.append(f'<tr><th>top-1 agreement</th><td class="bar">{_bar(agreement, 1.0, None, outputs.drifted)}</td>'
                    f'<td class="num">{agreement:.1%}</td><td class="muted">of {outputs.samples:,} samples</td></tr>')
    verdict = _pill("drifted", "bad") if outputs.drifted else _pill("ok", "good")
    return _section("Outputs on the data", f'<p>{verdict} outputs computed with the running statistics vs with the '
                    f"data's own statistics, {outputs.samples:,} samples of {_e(inspection.data)}</p>"
                    f'<table class="measures">{"".join(rows)}</table>')


def _overview(inspection: InspectReport, layers: list[BNLayer], check: CheckReport | None) -> str:
    drift = inspection.discrepancy
    head = ["#", "layer", "ch", "fold", "health"]
    if drift is not None:
        kl_scale, shift_scale = _drift_scales(inspection)
        head += [f"KL (limit {fmt_number(inspection.limits.max_layer_kl)})",
                 f"mean shift (limit {fmt_number(inspection.limits.max_mean_shift)})"]
    if check is not None:
        head.append("gate")
    rows = []
    for index, layer in enumerate(layers, 1):
        cells = [str(index), f'<a class="mono" href="#layer-{index}">{_e(layer.name)}</a>', fmt_channels(layer),
                 _fold_pill(_decision(inspection, layer)), _health_pills(inspection.findings_for(layer.name))]
        if drift is not None:
            item = drift.get(layer.name)
            cells += ([_drift_cell(item.kl.mean, inspection.limits.max_layer_kl, kl_scale),
                       _drift_cell(item.mean_shift.mean, inspection.limits.max_mean_shift, shift_scale)]
                      if item else ['<span class="muted">not measured</span>'] * 2)
        if check is not None:
            policies = dict.fromkeys(p for p, _ in check.layer_failures(layer.name))
            cells.append("".join(_pill(p, "bad") for p in policies) or _pill("passed", "good"))
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    if not layers:
        return _section("BN layers", '<p class="muted">no BatchNorm layers found</p>')
    order = "worst drift first" if drift else "worst finding first"
    legend = ('<p class="muted">bars: the channel mean of each measure; the black line marks the limit</p>'
              if drift is not None else "")
    return _section(f"BN layers ({order})", legend + '<table class="grid overview"><thead><tr>'
                    + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>" + "".join(rows)
                    + "</tbody></table>")


def _layer_card(inspection: InspectReport, layer: BNLayer, index: int, check: CheckReport | None) -> str:
    findings = inspection.findings_for(layer.name)
    drift = (inspection.discrepancy or {}).get(layer.name)
    failures = check.layer_failures(layer.name) if check is not None else []
    decision = _decision(inspection, layer)
    rank = _worst_rank(findings)
    tone = ("bad" if failures or rank == Severity.ERROR.rank
            else "warn" if rank == Severity.WARNING.rank or (drift and drift.drifted) else "good")
    channels = ("channels unknown" if layer.channels is None
                else f"{layer.channels} channel{'s' if layer.channels != 1 else ''}")
    facts = [layer.kind, channels, f"eps {fmt_eps(layer)}"]
    facts += [f"momentum {fmt_number(layer.momentum, 2)}"] if layer.momentum is not None else []
    facts += [layer.dtype] + ([] if layer.affine else ["no affine"]) + (["training mode"] if layer.training else [])
    facts += [f"{layer.num_batches_tracked:,} batches tracked"] if layer.num_batches_tracked is not None else []
    parts = [f'<article class="layer {tone}" id="layer-{index}"><header><span class="index">#{index}</span>'
             f'<h3 class="mono">{_e(layer.name)}</h3>{_fold_pill(decision)}{_health_pills(findings)}'
             + (_pill(drift.verdict, "bad" if drift.drifted else "good") if drift else "")
             + f'</header><p class="muted">{_e(" · ".join(facts))}</p>',
             '<div class="charts">'
             + _channel_chart("running mean", layer.running_mean, "mean", log=False)
             + _channel_chart("running variance", layer.running_var, "var", log=True)
             + _channel_chart("effective gain γ/√(var+ε)", layer.effective_gain(), "gain", log=True) + "</div>"]
    if drift:
        parts.append(_layer_drift(inspection, drift))
    parts.append(f'<p class="fold"><b>fold</b> {_e(_fold_text(decision))}</p>')
    if failures:
        parts.append('<ul class="findings">' + "".join(f'<li class="sev-error"><b>{_e(policy)}</b> {_e(f.message)}</li>'
                                                      for policy, f in failures) + "</ul>")
    if findings:
        parts.append('<ul class="findings">' + "".join(_finding(f, with_layer=False) for f in findings) + "</ul>")
    return "".join(parts) + "</article>"


def _layer_drift(inspection: InspectReport, drift: LayerDiscrepancy) -> str:
    """The layer's drift measures (channel mean as the bar, channel max in the text) against the limits."""
    limits = inspection.limits
    kl_scale, shift_scale = _drift_scales(inspection)
    rows = [_measure_row("KL", drift.kl.mean, limits.max_layer_kl, kl_scale, drift.kl.max),
            _measure_row("mean shift", drift.mean_shift.mean, limits.max_mean_shift, shift_scale, drift.mean_shift.max),
            f'<tr><th>|log var ratio|</th><td></td><td class="num">{_e(fmt_number(drift.var_log_ratio.mean))}</td>'
            f'<td class="muted">channel max {_e(fmt_number(drift.var_log_ratio.max))}</td></tr>']
    return (f'<table class="measures">{"".join(rows)}</table><p class="muted">channel means; '
            f"{drift.fraction_beyond:.0%} of channels beyond a limit; {drift.samples:,} values per channel</p>")


def _drift_scales(inspection: InspectReport) -> tuple[float, float]:
    """Full bar widths for KL and mean shift, shared by every layer so their bars compare."""
    measured = inspection.discrepancy.values()
    return (_scale((d.kl.mean for d in measured), inspection.limits.max_layer_kl),
            _scale((d.mean_shift.mean for d in measured), inspection.limits.max_mean_shift))


def _model_findings(inspection: InspectReport) -> str:
    names = {layer.name for layer in inspection.layers}
    loose = [f for f in inspection.findings if f.layer not in names]
    parts = ['<ul class="findings">' + "".join(_finding(f) for f in loose) + "</ul>"] if loose else []
    parts += [f'<p class="muted">{_e(note)}</p>' for note in inspection.notes]
    return _section("Model", "".join(parts)) if parts else ""


# ---- pieces ------------------------------------------------------------------------------------------

def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _section(title: str, content: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{content}</section>"


def _pill(text: str, tone: str) -> str:
    return f'<span class="pill {tone}">{_e(text)}</span>'


_OUTCOME_CLASS = {Outcome.PASSED: "good", Outcome.FAILED: "bad", Outcome.SKIPPED: "muted"}
_SEVERITY_CLASS = {Severity.ERROR: "bad", Severity.WARNING: "warn", Severity.INFO: "info"}


def _layer_prefix(name: str | None) -> str:
    return f'<span class="mono">{_e(name)}</span>: ' if name else ""


def _decision(inspection: InspectReport, layer: BNLayer) -> FoldDecision | None:
    return inspection.folds.get(layer.name) if inspection.folds is not None else None


def _fold_pill(decision: FoldDecision | None) -> str:
    if decision is None:
        return _pill("fold unknown", "muted")
    if decision.status is FoldStatus.KEPT:
        return _pill("kept", "warn")
    return _pill(decision.destination(), "good wrap")


def _fold_text(decision: FoldDecision | None) -> str:
    return decision.describe() if decision is not None else "fold analysis not available for this model"


def _health_pills(findings: list[Finding]) -> str:
    """One pill per finding code, coloured by its worst severity; "ok" without findings."""
    worst: dict[str, Severity] = {}
    for finding in findings:
        if finding.code not in worst or finding.severity.rank > worst[finding.code].rank:
            worst[finding.code] = finding.severity
    return "".join(_pill(code, _SEVERITY_CLASS[severity]) for code, severity in worst.items()) or _pill("ok", "good")


def _finding(finding: Finding, *, with_layer: bool = True) -> str:
    hint = f' <span class="hint">→ {_e(finding.hint)}</span>' if finding.hint else ""
    return (f'<li class="sev-{finding.severity.value}">{_pill(finding.severity.value, _SEVERITY_CLASS[finding.severity])}'
            f' <b class="mono">{_e(finding.code)}</b> {_layer_prefix(finding.layer if with_layer else None)}{_e(finding.message)}{hint}</li>')


def _scale(values: Iterable[float], limit: float) -> float:
    """A bar chart's full width: the largest finite value or 1.5x the limit, so the limit line always shows."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max([limit * 1.5, *finite]) * 1.05


def _bar(value: float, scale: float, limit: float | None, bad: bool) -> str:
    """A horizontal bar (stretches to its cell) with an optional limit line; non-finite values fill it."""
    fraction = 1.0 if not math.isfinite(value) else min(max(value / scale, 0.0), 1.0)
    line = ("" if limit is None else
            f'<line x1="{limit / scale * 100:.2f}" y1="0" x2="{limit / scale * 100:.2f}" y2="10" class="limit" />')
    return (f'<svg class="hbar" viewBox="0 0 100 10" preserveAspectRatio="none" width="100%" height="12">'
            f'<rect x="0" y="1" width="100" height="8" class="track" />'
            f'<rect x="0" y="1" width="{fraction * 100:.2f}" height="8" class="{"fill-bad" if bad else "fill-good"}" />'
            f"{line}</svg>")


def _drift_cell(value: float, limit: float, scale: float) -> str:
    over = not value <= limit
    return (f'<div class="cellbar">{_bar(value, scale, limit, over)}'
            f'<span class="num {"bad-text" if over else ""}">{_e(fmt_number(value))}</span></div>')


def _measure_row(label: str, value: float, limit: float, scale: float, channel_max: float | None = None) -> str:
    over = not value <= limit
    extra = f"channel max {fmt_number(channel_max)} · " if channel_max is not None else ""
    return (f'<tr><th>{_e(label)}</th><td class="bar">{_bar(value, scale, limit, over)}</td>'
            f'<td class="num {"bad-text" if over else ""}">{_e(fmt_number(value))}</td>'
            f'<td class="muted">{_e(extra)}limit {_e(fmt_number(limit))}</td></tr>')


# ---- per-channel charts ----------------------------------------------------------------------------

_W, _H, _LEFT, _TOP, _PLOT_W, _PLOT_H = 320, 118, 46, 6, 268, 88


def _channel_chart(title: str, values: np.ndarray | None, colour: str, *, log: bool) -> str:
    """A figure: one bar per channel (few channels) or a histogram (many); log scale for wide positive spans."""
    if values is None:
        return f'<figure><figcaption><b>{_e(title)}</b></figcaption><p class="muted empty">none</p></figure>'
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    log = bool(log and finite.size and finite.min() > 0 and finite.max() / finite.min() > LOG_SPAN)
    caption = [f"<b>{_e(title)}</b>"]
    if finite.size:
        caption.append(f'<span class="muted">{_e(fmt_number(finite.min()))} … {_e(fmt_number(finite.max()))}</span>')
    if log:
        caption.append('<span class="tag">log</span>')
    if finite.size < values.size:
        caption.append(f'<span class="tag bad">{values.size - finite.size} NaN/Inf</span>')
    if not finite.size:
        svg = ""
    elif values.size <= CHANNEL_BARS:
        svg = _channel_bars(values, colour, log)
    else:
        svg = _histogram(finite, colour, log)
    return f'<figure><figcaption>{" ".join(caption)}</figcaption>{svg}</figure>'


def _svg(content: str) -> str:
    return f'<svg class="chart" viewBox="0 0 {_W} {_H}" width="100%" role="img">{content}</svg>'


def _label(x: float, y: float, text: str, anchor: str = "end") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{_e(text)}</text>'


def _channel_bars(values: np.ndarray, colour: str, log: bool) -> str:
    """One bar per channel from the zero line (or from the bottom on a log scale); NaN/Inf as red stripes."""
    finite = values[np.isfinite(values)]
    to_axis = np.log10 if log else (lambda v: v)
    low, high = float(to_axis(finite.min())), float(to_axis(finite.max()))
    if log:
        low -= 0.1 * (high - low)
    else:
        low, high = min(low, 0.0), max(high, 0.0)
    if high == low:
        high, low = high + 1.0, (low - 1.0 if low < 0 else low)
    y = lambda v: _TOP + (high - v) / (high - low) * _PLOT_H  # noqa: E731 - a local coordinate map
    base = y(low if log else 0.0)
    width = min(_PLOT_W / values.size, 24.0)
    start = _LEFT + (_PLOT_W - width * values.size) / 2
    gap = width * 0.15 if width > 3 else 0.0
    bars = []
    for channel, value in enumerate(values):
        x = start + channel * width
        tip = f"<title>channel {channel}: {_e(fmt_number(value, 4))}</title>"
        if not math.isfinite(value):
            bars.append(f'<rect x="{x:.2f}" y="{_TOP}" width="{width - gap:.2f}" height="{_PLOT_H}" class="nan">{tip}</rect>')
            continue
        top = y(float(to_axis(value)))
        bars.append(f'<rect x="{x:.2f}" y="{min(top, base):.2f}" width="{width - gap:.2f}" '
                    f'height="{max(abs(base - top), 0.5):.2f}" class="{colour}">{tip}</rect>')
    axis_value = (lambda v: 10 ** v) if log else (lambda v: v)
    labels = [_label(_LEFT - 4, _TOP + 8, fmt_number(axis_value(high))),
              _label(_LEFT - 4, _TOP + _PLOT_H, fmt_number(axis_value(low))),
              _label(_LEFT, _H - 4, "ch 0", "start")]
    if values.size > 1:
        labels.append(_label(_LEFT + _PLOT_W, _H - 4, f"ch {values.size - 1}"))
    if not log and low < 0 < high:
        labels.append(_label(_LEFT - 4, base + 3, "0"))
    zero = f'<line x1="{_LEFT}" y1="{base:.2f}" x2="{_LEFT + _PLOT_W}" y2="{base:.2f}" class="axis" />'
    return _svg("".join(bars) + zero + "".join(labels))


def _histogram(finite: np.ndarray, colour: str, log: bool) -> str:
    """How many channels fall in each of `HISTOGRAM_BINS` equal (or log-equal) value ranges."""
    axis = np.log10(finite) if log else finite
    low, high = float(axis.min()), float(axis.max())
    if high == low:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(axis, bins=HISTOGRAM_BINS, range=(low, high))
    value = (lambda v: 10 ** v) if log else (lambda v: v)
    width, peak = _PLOT_W / HISTOGRAM_BINS, int(counts.max())
    bars = []
    for count, left, right in zip(counts, edges[:-1], edges[1:]):
        if count:
            height = max(count / peak * _PLOT_H, 1.0)
            x = _LEFT + (left - low) / (high - low) * _PLOT_W
            bars.append(f'<rect x="{x:.2f}" y="{_TOP + _PLOT_H - height:.2f}" width="{width * 0.85:.2f}" '
                        f'height="{height:.2f}" class="{colour}"><title>{_e(fmt_number(value(left)))} to '
                        f"{_e(fmt_number(value(right)))}: {count} channels</title></rect>")
    labels = [_label(_LEFT - 4, _TOP + 8, f"{peak} ch"), _label(_LEFT - 4, _TOP + _PLOT_H, "0"),
              _label(_LEFT, _H - 4, fmt_number(value(low)), "start"),
              _label(_LEFT + _PLOT_W / 2, _H - 4, f"{finite.size} channels", "middle"),
              _label(_LEFT + _PLOT_W, _H - 4, fmt_number(value(high)))]
    axis_line = (f'<line x1="{_LEFT}" y1="{_TOP + _PLOT_H}" x2="{_LEFT + _PLOT_W}" y2="{_TOP + _PLOT_H}" '
                 'class="axis" />')
    return _svg("".join(bars) + axis_line + "".join(labels))


# ---- page --------------------------------------------------------------------------------------------

_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--red:#cf222e;--redbg:#ffebe9;
--amber:#9a6700;--amberbg:#fff8c5;--green:#1a7f37;--greenbg:#dafbe1;--blue:#0969da;--bluebg:#ddf4ff}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0}
h2{font-size:16px;margin:0 0 10px}
h3{font-size:15px;margin:0;overflow-wrap:anywhere}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;overflow-wrap:anywhere}
h3.mono{font-size:15px}
.muted{color:var(--muted)}
header.top,section,article.layer{background:#fff;border:1px solid var(--line);border-radius:8px;
padding:16px 20px;margin-bottom:16px;overflow-x:auto}
.title{display:flex;align-items:center;gap:14px;flex-wrap:wrap}
.verdict{font-weight:600;padding:3px 12px;border-radius:999px}
.verdict.pass{background:var(--greenbg);color:var(--green)}
.verdict.fail{background:var(--redbg);color:var(--red)}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:12px 0}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;
overflow-wrap:anywhere}
.tiles{display:flex;gap:10px;flex-wrap:wrap}
.tile{border:1px solid var(--line);border-radius:6px;padding:6px 14px;min-width:86px}
.tile b{display:block;font-size:20px}
.tile span{color:var(--muted);font-size:12px}
.tile.bad{border-color:var(--red);background:var(--redbg)}
.tile.bad b{color:var(--red)}
.tile.warn{border-color:#d4a72c;background:var(--amberbg)}
.advice{margin:12px 0 0;font-weight:600;color:var(--amber)}
.pill{display:inline-block;font-size:12px;font-weight:600;padding:1px 8px;border-radius:999px;
margin:1px 4px 1px 0;white-space:nowrap}
.pill.wrap{white-space:normal;overflow-wrap:break-word;border-radius:10px}
.pill.good{background:var(--greenbg);color:var(--green)}
.pill.bad{background:var(--redbg);color:var(--red)}
.pill.warn{background:var(--amberbg);color:var(--amber)}
.pill.info{background:var(--bluebg);color:var(--blue)}
.pill.muted{background:#eff2f5;color:var(--muted)}
table{border-collapse:collapse;width:100%}
table.grid th,table.grid td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
table.grid th{font-size:12px;color:var(--muted);font-weight:600}
table.overview td:nth-child(1),table.overview td:nth-child(3){color:var(--muted);text-align:right}
table.overview th:nth-child(3){text-align:right}
table.overview td:nth-child(2){min-width:200px}
table.overview .mono{overflow-wrap:break-word}
td.mono{white-space:nowrap}
table.overview a{color:var(--fg);text-decoration:none}
table.overview a:hover{text-decoration:underline}
.cellbar{display:flex;align-items:center;gap:8px;min-width:130px}
.cellbar svg{flex:1}
.num{font-variant-numeric:tabular-nums;min-width:52px;text-align:right}
.bad-text{color:var(--red);font-weight:600}
table.measures{max-width:760px;margin:8px 0}
table.measures th{text-align:left;font-weight:500;width:130px;padding:3px 0}
table.measures td{padding:3px 8px}
table.measures td.bar{width:300px}
svg.hbar .track{fill:#eff2f5}
svg.hbar .fill-good{fill:#4ac26b}
svg.hbar .fill-bad{fill:#fa4549}
svg.hbar .limit{stroke:var(--fg);stroke-width:2;vector-effect:non-scaling-stroke}
ul.failures,ul.findings{margin:6px 0 0;padding-left:18px}
ul.findings{list-style:none;padding:0}
ul.findings li{padding:5px 10px;border-left:3px solid var(--line);margin:4px 0;background:var(--bg);
border-radius:0 4px 4px 0}
ul.findings li.sev-error{border-color:var(--red)}
ul.findings li.sev-warning{border-color:#d4a72c}
ul.findings li.sev-info{border-color:var(--blue)}
.hint{color:var(--muted)}
article.layer{border-left:4px solid var(--green)}
article.layer.warn{border-left-color:#d4a72c}
article.layer.bad{border-left-color:var(--red)}
article.layer header{display:flex;align-items:center;gap:8px;flex-wrap:wrap}
article.layer .index{color:var(--muted);font-weight:600}
article.layer p{margin:6px 0}
.charts{display:grid;grid-template-columns:repeat(3,1fr);gap:16px;margin:10px 0}
figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:8px 10px}
figcaption{font-size:12px;display:flex;gap:8px;align-items:baseline;flex-wrap:wrap}
.tag{font-size:11px;padding:0 6px;border-radius:4px;background:#eff2f5;color:var(--muted)}
.tag.bad{background:var(--redbg);color:var(--red)}
.empty{margin:24px 0;text-align:center}
svg.chart{display:block;margin-top:4px}
svg.chart text{font-size:10px;fill:var(--muted);font-family:system-ui,sans-serif}
svg.chart .axis{stroke:#8c959f;stroke-width:1}
svg.chart .mean{fill:#218bff}
svg.chart .var{fill:#8250df}
svg.chart .gain{fill:#1b7c83}
svg.chart .nan{fill:var(--red);opacity:.35}
svg.chart rect:hover{opacity:.7}
p.fold b{margin-right:6px}
footer{color:var(--muted);font-size:12px;text-align:center;margin:8px 0 24px}
@media (max-width:900px){.charts{grid-template-columns:1fr}}
@media print{body{background:#fff}header.top,section,article.layer{break-inside:avoid}}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8" />
<meta name="viewport" content="width=device-width, initial-scale=1" />
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:" />
<link rel="icon" href="data:," />
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
{body}
<footer>written by bnfold · self-contained: no scripts, no network</footer>
</main>
</body>
</html>
"""
