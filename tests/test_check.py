"""`bnfold check`: policy loading, evaluation, the JUnit / GitHub / JSON renderings and the CLI contract."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from bnfold.discrepancy import DriftLimits, OutputComparison, compare_layer
from bnfold.errors import InputError, UsageError
from bnfold.gate import evaluate, publish_github, write_junit
from bnfold.layers import BNLayer, Finding, FoldDecision, FoldDirection, FoldStatus, Severity
from bnfold.policy import Policy, find_config, load_policy
from bnfold.reports.check import CheckReport, Outcome
from bnfold.reports.inspect import InspectReport, ModelInfo
from bnfold.stats import ChannelStatistics
from tests.conftest import SAMPLES

# ---------------------------------------------------------------- policy loading


def test_defaults_without_any_config(tmp_path):
    policy = load_policy(search_from=tmp_path)
    assert policy == Policy() and policy.sources == ("defaults",)
    assert policy.limits == DriftLimits() and policy.fail_on is Severity.ERROR and not policy.require_folded


def test_pyproject_table_then_flags_override(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.bnfold]\nmax-layer-kl = 0.1\n'
                                             'require_folded = true\nfail-on = "warning"\n')
    nested = tmp_path / "deploy" / "models"
    nested.mkdir(parents=True)
    policy = load_policy(search_from=nested, flags={"max-layer-kl": 0.2, "fail-on": None, "max-output-l2": 3})
    assert policy.limits.max_layer_kl == 0.2 and policy.limits.max_output_l2 == 3.0
    assert policy.require_folded and policy.fail_on is Severity.WARNING
    assert policy.sources == ("defaults", f"{tmp_path / 'pyproject.toml'} [tool.bnfold]", "flags")


def test_bnfold_toml_wins_and_a_pyproject_without_the_table_is_passed_over(tmp_path):
    (tmp_path / "bnfold.toml").write_text("max-mean-shift = 0.5\nfail-on = \"never\"\n")
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pyproject.toml").write_text('[project]\nname = "inner"\n')
    assert find_config(inner) == tmp_path / "bnfold.toml"
    policy = load_policy(search_from=inner)
    assert policy.limits.max_mean_shift == 0.5 and policy.fail_on is None


@pytest.mark.parametrize("text, error, fragment", [
    ("max-kl = 0.1\n", UsageError, "unknown bnfold setting 'max-kl'"),
    ("max-layer-kl = \"high\"\n", UsageError, "max-layer-kl must be a number"),
    ("max-layer-kl = -1\n", UsageError, "max-layer-kl must be a number >= 0"),
    ("require-folded = 1\n", UsageError, "require-folded must be true or false"),
    ("fail-on = \"info\"\n", UsageError, "fail-on must be one of error, warning, never"),
    ("max-layer-kl = \n", InputError, "not valid TOML"),
])
def test_bad_config_is_a_one_line_user_error(tmp_path, text, error, fragment):
    config = tmp_path / "bnfold.toml"
    config.write_text(text)
    with pytest.raises(error, match=fragment):
        load_policy(config)


def test_explicit_config_must_exist(tmp_path):
    with pytest.raises(InputError, match="no such config file"):
        load_policy(tmp_path / "missing.toml")


# ---------------------------------------------------------------- evaluation on synthetic inspections


def make_layer(name: str, channels: int = 4) -> BNLayer:
    return BNLayer(name=name, kind="BatchNorm2d", framework="torch", channels=channels, eps=1e-5, momentum=0.1,
                   affine=True, track_running_stats=True, running_mean=np.zeros(channels),
                   running_var=np.ones(channels))


def statistics(mean: float, std: float, channels: int = 4) -> ChannelStatistics:
    stats = ChannelStatistics()
    stats.add_array(np.random.default_rng(0).normal(mean, std, size=(200, channels, 3)))
    return stats


def make_inspection(*, data: bool, shifted: bool = False, findings=(), folds=None) -> InspectReport:
    layers = [make_layer("bn1"), make_layer("bn2")]
    report = InspectReport(model=ModelInfo("m.onnx", "onnx", "onnx"), layers=layers, findings=list(findings),
                           folds=folds or {}, fail_on=None)
    if data:
        report.data = "calib.npy"
        report.discrepancy = {"bn1": compare_layer(layers[0], statistics(0.0, 1.0)),
                              "bn2": compare_layer(layers[1], statistics(0.8 if shifted else 0.0, 1.0))}
        outputs = OutputComparison()
        logits = np.random.default_rng(1).normal(size=(50, 10)) * 4
        outputs.add([logits + (3 * np.random.default_rng(2).normal(size=(50, 10)) if shifted else 0)], [logits])
        report.model_discrepancy = outputs
    return report


def outcomes(results) -> dict[str, Outcome]:
    return {r.policy: r.outcome for r in results}


def test_without_data_only_static_policies_apply():
    results = evaluate(make_inspection(data=False), Policy())
    assert outcomes(results) == {"fail-on": Outcome.PASSED, "require-folded": Outcome.SKIPPED,
                                 "max-layer-kl": Outcome.SKIPPED, "max-mean-shift": Outcome.SKIPPED,
                                 "max-output-kl": Outcome.SKIPPED, "max-output-l2": Outcome.SKIPPED}
    assert all(r.detail == "needs --data" for r in results[2:])


def test_clean_data_passes_and_shifted_data_fails_on_the_drifted_layer():
    assert all(o is not Outcome.FAILED for o in outcomes(evaluate(make_inspection(data=True), Policy())).values())
    report = CheckReport(make_inspection(data=True, shifted=True), Policy(),
                         evaluate(make_inspection(data=True, shifted=True), Policy()))
    failed = {r.policy: r for r in report.failed}
    assert set(failed) == {"max-layer-kl", "max-mean-shift", "max-output-kl", "max-output-l2"}
    assert [f.layer for f in failed["max-layer-kl"].failures] == ["bn2"]
    assert failed["max-output-kl"].failures[0].layer is None
    assert not report and not report.passed


def test_fail_on_and_require_folded():
    findings = [Finding("stale-stats", Severity.WARNING, "never updated", "bn1"),
                Finding("redundant-bias", Severity.INFO, "bias", "bn2")]
    folds = {"bn1": FoldDecision("bn1", FoldStatus.FOLDABLE, ["conv1"], FoldDirection.INTO_PRODUCER),
             "bn2": FoldDecision("bn2", FoldStatus.KEPT, reason="conv2 output also feeds add")}
    inspection = make_inspection(data=False, findings=findings, folds=folds)
    lenient = CheckReport(inspection, Policy(), evaluate(inspection, Policy()))
    assert lenient.passed and [n.code for n in lenient.notices()] == ["stale-stats"]
    strict = Policy(require_folded=True, fail_on=Severity.WARNING)
    report = CheckReport(inspection, strict, evaluate(inspection, strict))
    failed = {r.policy: r for r in report.failed}
    assert set(failed) == {"fail-on", "require-folded"}
    assert [(f.layer, "run bnfold fold" in f.message) for f in failed["require-folded"].failures] == [("bn1", True)]
    assert report.notices() == []  # the warning now fails instead of being a notice


def test_a_folded_model_without_bn_passes_require_folded():
    inspection = InspectReport(model=ModelInfo("folded.onnx", "onnx", "onnx"), layers=[], findings=[], folds={})
    result = evaluate(inspection, Policy(require_folded=True))[1]
    assert result.outcome is Outcome.PASSED and result.detail == "no BN left"


# ---------------------------------------------------------------- renderings


def failing_report() -> CheckReport:
    inspection = make_inspection(data=True, shifted=True,
                                 findings=[Finding("gain-outliers", Severity.WARNING, "a, b: 100% | worse", "bn1")])
    inspection.model = ModelInfo("models/m,1.onnx", "onnx", "onnx")
    return CheckReport(inspection, Policy(), evaluate(inspection, Policy()))


def test_junit_xml_is_valid_with_one_case_per_policy_and_layer(tmp_path):
    target = tmp_path / "junit.xml"
    target.write_text("old report")
    write_junit(failing_report(), target)
    root = ET.parse(target).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    names = [(c.get("classname"), c.get("name")) for c in cases]
    assert names == [("bnfold.policy", p) for p in ("fail-on", "require-folded", "max-layer-kl", "max-mean-shift",
                                                    "max-output-kl", "max-output-l2")] + [
        ("bnfold.layer", "bn1"), ("bnfold.layer", "bn2")]
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    assert failed == {"max-layer-kl", "max-mean-shift", "max-output-kl", "max-output-l2", "bn2"}
    assert {c.get("name") for c in cases if c.find("skipped") is not None} == {"require-folded"}
    assert suite.get("tests") == "8" and suite.get("failures") == "5" and suite.get("skipped") == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml"]  # replaced, no temp file left


def test_github_annotations_and_step_summary(tmp_path, capsys):
    report = failing_report()
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    assert not publish_github(report, sys.stdout, {"GITHUB_ACTIONS": "false"})
    assert capsys.readouterr().out == ""
    assert publish_github(report, sys.stdout,
                          {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)})
    lines = capsys.readouterr().out.splitlines()
    errors = [line for line in lines if line.startswith("::error ")]
    warnings = [line for line in lines if line.startswith("::warning ")]
    assert len(errors) == 4 and len(warnings) == 1  # one per policy failure
    assert errors[0].startswith("::error file=models/m%2C1.onnx,title=bnfold check%3A max-layer-kl::bn2: ")
    assert warnings[0].endswith("::bn1: a, b: 100%25 | worse")
    text = summary.read_text()
    assert text.startswith("earlier step\n### bnfold check `models/m,1.onnx`: failed")
    assert "| max-layer-kl | 0.06 | failed |" in text and "| bn2 |" in text


def test_an_unwritable_step_summary_is_a_one_line_output_error(tmp_path, capsys):
    from bnfold.errors import ExitCode, OutputError

    with pytest.raises(OutputError, match=r"cannot append to \$GITHUB_STEP_SUMMARY") as raised:
        publish_github(failing_report(), sys.stdout, {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(tmp_path)})
    assert raised.value.exit_code is ExitCode.USAGE
    assert capsys.readouterr().out.startswith("::error ")  # the annotations were already out


def test_json_document_pins_the_check_fields():
    document = json.loads(failing_report().to_json())
    assert document["kind"] == "check" and document["schema_version"] == 1 and document["passed"] is False
    assert set(document) >= {"model", "data", "policy", "policies", "layers", "model_discrepancy", "findings"}
    assert set(document["policy"]) == {"max-layer-kl", "max-mean-shift", "max-output-kl", "max-output-l2",
                                       "require-folded", "fail-on", "sources"}
    policy = document["policies"][2]
    assert set(policy) == {"policy", "limit", "outcome", "detail", "failures"}
    assert policy["policy"] == "max-layer-kl" and policy["outcome"] == "failed"
    layer = document["layers"][1]
    assert set(layer) == {"name", "passed", "failures", "discrepancy"}
    assert layer["name"] == "bn2" and not layer["passed"]
    assert set(layer["discrepancy"]) == {"samples", "mean_shift", "var_log_ratio", "kl", "fraction_beyond", "verdict"}
    assert set(document["model_discrepancy"]) == {"samples", "relative_l2", "classifier", "softmax_kl",
                                                  "top1_agreement", "verdict"}


# ---------------------------------------------------------------- end to end on the sample models

CALIB, SHIFTED = SAMPLES / "calib.npy", SAMPLES / "shifted_calib.npy"


@pytest.mark.parametrize("name", ["mlp.pt2", "resnet.onnx"])  # the mildest shift; the narrowest layer margin
def test_clean_passes_shifted_fails_recalibrated_passes(tmp_path, name):
    from bnfold import check, recalibrate

    model = SAMPLES / name
    assert check(model, CALIB, policy=Policy()).passed
    shifted = check(model, SHIFTED, policy=Policy())
    assert not shifted.passed
    assert {"max-layer-kl", "max-output-kl"} <= {r.policy for r in shifted.failed}
    assert shifted.inspection.recommendation == "statistics drifted: run bnfold recalibrate"
    recalibrated = tmp_path / f"recalibrated{model.suffix}"
    recalibrate(model, SHIFTED, output=recalibrated)
    again = check(recalibrated, SHIFTED, policy=Policy())
    assert again.passed, again.failed
    assert max(d.kl.mean for d in again.inspection.discrepancy.values()) < 1e-3


def test_cli_exit_codes_and_streams(cli):
    clean = cli("check", SAMPLES / "cnn.onnx", "--data", CALIB)
    assert clean.code == 0 and clean.stderr == "" and "check passed" in clean.stdout
    shifted = cli("check", SAMPLES / "cnn.onnx", "--data", SHIFTED)
    assert shifted.code == 1 and shifted.stderr == ""
    assert "check failed: max-layer-kl, max-mean-shift, max-output-kl, max-output-l2" in shifted.stdout
    missing = cli("check", SAMPLES / "cnn.onnx", "--data", SAMPLES / "nope.npy")
    assert missing.code == 2 and missing.stdout == "" and missing.stderr.startswith("error: no such data file")
    assert cli("check", SAMPLES / "cnn.onnx", "--fail-on", "info").code == 2


def test_cli_policy_from_bnfold_toml_and_flags(cli, tmp_path, monkeypatch):
    (tmp_path / "bnfold.toml").write_text("max-layer-kl = 1.0\nmax-mean-shift = 1.0\nmax-output-kl = 1.0\n"
                                          "max-output-l2 = 1.0\n")
    monkeypatch.chdir(tmp_path)
    lenient = cli("check", SAMPLES / "cnn.onnx", "--data", SHIFTED, "--json")
    assert lenient.code == 0, lenient.stdout
    assert json.loads(lenient.stdout)["policy"]["sources"] == ["defaults", str(tmp_path / "bnfold.toml")]
    assert cli("check", SAMPLES / "cnn.onnx", "--data", SHIFTED, "--max-layer-kl", "0.06").code == 1
    (tmp_path / "bnfold.toml").write_text("max_layer_kl = 1.0\nmax-kl = 1.0\n")  # underscores are fine
    typo = cli("check", SAMPLES / "cnn.onnx")
    assert typo.code == 2 and "unknown bnfold setting 'max-kl'" in typo.stderr


def test_require_folded_fails_until_the_model_is_folded(cli, tmp_path):
    from bnfold import fold

    unfolded = cli("check", SAMPLES / "cnn.onnx", "--require-folded", "--json")
    assert unfolded.code == 1
    document = json.loads(unfolded.stdout)
    assert [f["layer"] for f in document["policies"][1]["failures"]] == [layer["name"] for layer in document["layers"]]
    folded = tmp_path / "cnn_folded.onnx"
    assert fold(SAMPLES / "cnn.onnx", folded).passed
    deployed = cli("check", folded, "--require-folded", "--data", SHIFTED, "--json")
    assert deployed.code == 0, deployed.stdout  # no BN left: nothing to fold, nothing to drift
    outcomes = {p["policy"]: (p["outcome"], p["detail"]) for p in json.loads(deployed.stdout)["policies"]}
    assert outcomes["require-folded"] == ("passed", "no BN left")
    assert outcomes["max-layer-kl"] == ("skipped", "no BN layer with running statistics")


def test_cli_under_github_actions_keeps_json_pure(cli, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit = tmp_path / "bnfold.xml"
    result = cli("check", SAMPLES / "cnn.onnx", "--data", SHIFTED, "--json", "--junit-xml", junit)
    assert result.code == 1
    assert json.loads(result.stdout)["passed"] is False  # stdout: the JSON document alone
    annotations = result.stderr.splitlines()
    assert annotations and all(line.startswith(("::error ", "::warning ")) for line in annotations)
    assert "| max-layer-kl | 0.06 | failed |" in summary.read_text()
    cases = ET.parse(junit).getroot().find("testsuite").findall("testcase")
    failed = {(c.get("classname"), c.get("name")) for c in cases if c.find("failure") is not None}
    assert {name for kind, name in failed if kind == "bnfold.policy"} == {
        "max-layer-kl", "max-mean-shift", "max-output-kl", "max-output-l2"}
    assert ("bnfold.layer", "/bn3/BatchNormalization") in failed
    human = cli("check", SAMPLES / "cnn.onnx", "--data", SHIFTED)
    assert human.stderr == "" and "::error file=" in human.stdout


def test_check_as_a_process_on_onnx_never_imports_torch(tmp_path):
    from tests.test_startup import run_probe

    completed = run_probe("check", str(SAMPLES / "cnn.onnx"), "--data", str(SHIFTED), "--json",
                          "--junit-xml", str(tmp_path / "junit.xml"))
    assert completed.returncode == 1, completed.stderr
    assert json.loads(completed.stdout)["kind"] == "check"
    assert "TORCH-MODULES: 0" in completed.stderr
    assert ET.parse(tmp_path / "junit.xml").getroot().tag == "testsuites"


def test_batches_too_small_for_batch_statistics_skip_the_output_policies(cli):
    result = cli("check", SAMPLES / "mlp.onnx", "--data", CALIB, "--batch-size", "2", "--max-samples", "64", "--json")
    document = json.loads(result.stdout)
    assert result.code == 0 and document["model_discrepancy"] is None
    outcomes = {p["policy"]: (p["outcome"], p["detail"]) for p in document["policies"]}
    assert outcomes["max-output-kl"] == ("skipped", "not measured: see the notes")
    assert outcomes["max-layer-kl"][0] == "passed"  # per-layer statistics do not depend on the batch size
    assert any("batches of 2 samples are too small" in note for note in document["notes"])
