"""The HTML report: well-formed, complete, self-contained, escaped, and it renders in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from onnx import helper

from bnfold import check, inspect
from bnfold.layers import FoldStatus
from bnfold.reports.html import CHANNEL_BARS, HISTOGRAM_BINS, render_html, write_html
from tests.conftest import SAMPLES
from tests.onnx_builders import bn_node, bn_params, make, weights

MODEL = SAMPLES / "mixed.onnx"
SHIFTED = SAMPLES / "shifted_calib.npy"
MALICIOUS = "<script>alert(1)</script>"
QUOTED = "x\" onload=\"alert(2)' & y"


@pytest.fixture(scope="module")
def plain():
    return inspect(MODEL)


@pytest.fixture(scope="module")
def drifted():
    return inspect(MODEL, SHIFTED)


@pytest.fixture(scope="module")
def gate():
    return check(MODEL, SHIFTED)


@pytest.fixture(scope="module")
def hostile():
    """A 128-channel BN named like a script (one NaN mean, so histogram and NaN paths run) feeding a conv
    and a BN whose name tries to break out of an attribute."""
    rng = np.random.default_rng(0)
    first, second = bn_params(rng, 128, MALICIOUS), bn_params(rng, 8, QUOTED)
    first[f"{MALICIOUS}.mean"][3] = np.nan
    nodes = [bn_node("x", "h", MALICIOUS), helper.make_node("Conv", ["h", "w"], ["c"], name="conv"),
             bn_node("c", "y", QUOTED)]
    model = make(nodes, {"x": ([1, 128, 4, 4], np.float32)}, {"y": (None, np.float32)},
                 {**first, "w": weights(rng, 8, 128, 1, 1), **second})
    return inspect(model)


def parse(html: str) -> ET.Element:
    """Strict parse: the report is well-formed XML (balanced tags, quoted attributes, escaped text)."""
    assert html.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(html.removeprefix("<!DOCTYPE html>\n"))


def text(element: ET.Element) -> str:
    return " ".join(" ".join(element.itertext()).split())


def cards(root: ET.Element) -> list[ET.Element]:
    return [a for a in root.iter("article") if "layer" in a.get("class", "").split()]


def card_names(root: ET.Element) -> list[str]:
    return [card.find(".//h3").text for card in cards(root)]


def test_the_document_is_one_well_formed_page(plain):
    root = parse(render_html(plain))
    assert root.tag == "html"
    assert [child.tag for child in root] == ["head", "body"]
    assert len(list(root.iter("html"))) == 1
    assert root.find("head/title").text == f"bnfold inspect: {MODEL}"


@pytest.mark.parametrize("name", ["plain", "drifted", "gate", "hostile"])
def test_nothing_is_fetched_and_nothing_runs(name, request):
    html = render_html(request.getfixturevalue(name))
    root = parse(html)
    assert not re.search(r"https?:|//|url\(|@import", html)
    assert list(root.iter("script")) == [] and list(root.iter("img")) == [] and list(root.iter("iframe")) == []
    for element in root.iter():
        assert "src" not in element.attrib
        assert not any(attribute.startswith("on") for attribute in element.attrib)
        href = element.get("href")
        assert href is None or href.startswith("#") or href == "data:,"
    policy = root.find("head/meta[@http-equiv='Content-Security-Policy']").get("content")
    assert "default-src 'none'" in policy and "script" not in policy


def test_every_layer_has_a_card_worst_finding_first(plain):
    root = parse(render_html(plain))
    names = card_names(root)
    assert sorted(names) == sorted(layer.name for layer in plain.layers)
    with_findings = {f.layer for f in plain.findings}
    assert with_findings and names[0] in with_findings  # the only finding (bn2 redundant-bias) leads
    assert [a.text for a in root.iter("a")] == names  # the overview links to each card in the same order
    assert [a.get("href") for a in root.iter("a")] == [f"#{card.get('id')}" for card in cards(root)]


def test_kept_reasons_fold_targets_and_findings_are_shown(plain):
    root = parse(render_html(plain))
    by_name = {card.find(".//h3").text: text(card) for card in cards(root)}
    kept = [d for d in plain.folds.values() if d.status is FoldStatus.KEPT]
    assert kept and all(f"kept: {' '.join(d.reason.split())}" in by_name[d.layer] for d in kept)
    for decision in plain.folds.values():
        if decision.status is not FoldStatus.KEPT:
            assert all(target in by_name[decision.layer] for target in decision.targets)
    for finding in plain.findings:
        assert finding.code in by_name[finding.layer] and " ".join(finding.message.split()) in by_name[finding.layer]


def test_a_bn_folded_into_a_sum_reads_as_in_the_tables():
    """Every summed conv takes the whole BN: 'conv1 + conv2', as FoldDecision.describe writes it for the
    fold and inspect tables, not 'conv1, conv2' (a split across a concat)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="conv2"),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"), bn_node("s", "y")]
    report = inspect(make(nodes, {"x": ([1, 4, 5, 5], np.float32)}, {"y": (None, np.float32)},
                          {"w1": weights(rng, 6, 4, 1, 1), "w2": weights(rng, 6, 4, 1, 1), **bn_params(rng, 6)}))
    (card,) = cards(parse(render_html(report)))
    assert text(card.find(".//p[@class='fold']")) == "fold foldable → conv1 + conv2"
    assert "→ conv1 + conv2" in [span.text for span in card.iter("span")]  # the pill beside the name

def test_per_channel_charts_draw_one_bar_per_channel(plain):
    root = parse(render_html(plain))
    for card, layer in zip(cards(root), _ordered(plain, card_names(root))):
        assert layer.channels <= CHANNEL_BARS
        figures = card.findall(".//figure")
        assert [f.find("figcaption/b").text for f in figures][:2] == ["running mean", "running variance"]
        tips = [r.find("title").text for r in figures[0].iter("rect")]
        assert tips == [f"channel {i}: {v:.4g}" for i, v in enumerate(layer.running_mean)]


def _ordered(report, names):
    layers = {layer.name: layer for layer in report.layers}
    return [layers[name] for name in names]


def test_many_channels_become_a_histogram_and_nan_is_flagged(hostile):
    root = parse(render_html(hostile))
    card = next(c for c in cards(root) if c.find(".//h3").text == MALICIOUS)
    mean = card.find(".//figure")
    assert "1 NaN/Inf" in text(mean.find("figcaption"))
    counts = [int(re.search(r": (\d+) channels$", r.find("title").text).group(1)) for r in mean.iter("rect")]
    assert 1 < len(counts) <= HISTOGRAM_BINS and sum(counts) == 127  # every finite channel, once


def test_hostile_layer_names_are_escaped(hostile):
    html = render_html(hostile)
    assert "<script" not in html.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'onload="' not in html
    root = parse(html)
    assert sorted(card_names(root)) == sorted([MALICIOUS, QUOTED])  # shown verbatim, as text
    assert "non-finite-stats" in text(root)  # the NaN is an error finding: it leads
    assert card_names(root)[0] == MALICIOUS


def test_drift_orders_the_layers_and_shows_the_measures(drifted):
    root = parse(render_html(drifted))
    assert card_names(root) == [layer.name for layer in drifted.by_drift()]
    page = text(root)
    outputs = drifted.model_discrepancy
    assert "Outputs on the data" in page and f"{outputs.relative_l2:.3g}" in page
    assert f"{outputs.softmax_kl:.3g}" in page and f"{outputs.top1_agreement:.1%}" in page
    assert f"KL (limit {drifted.limits.max_layer_kl:g})" in page
    for card in cards(root):
        drift = drifted.discrepancy[card.find(".//h3").text]
        assert f"{drift.kl.mean:.3g}" in text(card) and f"{drift.mean_shift.max:.3g}" in text(card)
        assert drift.verdict in [span.text for span in card.iter("span")]
    assert sum(d.drifted for d in drifted.discrepancy.values()) >= 1


def test_without_data_there_is_no_drift_section(plain):
    page = text(parse(render_html(plain)))
    assert "Outputs on the data" not in page and "KL (limit" not in page


def test_check_report_lists_policies_and_layer_failures(gate):
    assert not gate.passed
    root = parse(render_html(gate))
    header = text(root.find(".//header"))
    assert header.startswith("bnfold check failed: " + ", ".join(r.policy for r in gate.failed))
    rows = [text(row) for row in root.find(".//section/table/tbody")]
    assert [row.split()[0] for row in rows] == [r.policy for r in gate.results]
    for card in cards(root):
        for policy, failure in gate.layer_failures(card.find(".//h3").text):
            assert f"{policy} {failure.message}" in text(card)


def test_write_html_is_atomic_and_refuses_to_overwrite(plain, tmp_path):
    target = tmp_path / "report.html"
    size = write_html(plain, target)
    assert size == target.stat().st_size and target.read_text(encoding="utf-8") == render_html(plain)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no staging leftovers
    with pytest.raises(Exception, match="already exists"):
        write_html(plain, target)
    write_html(plain, target, force=True)


def test_cli_inspect_report_for_a_pt2_model(cli, tmp_path):
    target = tmp_path / "report.html"
    result = cli("inspect", SAMPLES / "mixed.pt2", "--report", target)
    assert result.code == 0
    assert f"HTML report written to {target}" in result.stderr and "HTML report" not in result.stdout
    assert sorted(card_names(parse(target.read_text(encoding="utf-8")))) == ["bn1", "bn2", "bn3", "input_bn"]


def test_cli_check_writes_the_report_when_the_gate_fails(cli, tmp_path):
    target = tmp_path / "gate.html"
    result = cli("check", MODEL, "--data", SHIFTED, "--report", target, "--json")
    assert result.code == 1
    assert json.loads(result.stdout)["passed"] is False  # stdout stays one JSON document
    assert "Outputs on the data" in text(parse(target.read_text(encoding="utf-8")))


def test_cli_refuses_an_existing_report_before_running(cli, tmp_path):
    target = tmp_path / "report.html"
    target.write_text("keep me")
    result = cli("inspect", MODEL, "--report", target)
    assert result.code == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert result.stdout == "" and target.read_text() == "keep me"
    assert cli("inspect", MODEL, "--report", target, "--force").code == 0
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(BROWSER is None, reason="no headless browser (chromium, chromium-browser, google-chrome)")
def test_a_headless_browser_renders_the_report(drifted, tmp_path):
    from PIL import Image

    page, png = tmp_path / "report.html", tmp_path / "report.png"
    write_html(drifted, page)
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1280,2000",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    with Image.open(png) as image:
        assert image.size == (1280, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=image.width * image.height)
    # A blank or error page has a handful of colours; the report has text, bars and charts in several hues.
    assert len(colours) > 200
    assert sum(n for n, (r, g, b) in colours if r > 200 and g < 100 and b < 100) > 500  # red drift bars
