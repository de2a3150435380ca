"""The CLI contract: exit codes, one-line errors on stderr, JSON alone on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import REPO, SAMPLES


SCALE, VARIANCE = 1, 4  # BatchNormalization input positions


def corrupt_first_bn(source, target, position, value):
    """Copy an ONNX model with channel 0 of one parameter of its first BN set to `value`."""
    model = onnx.load(source)
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    init = next(i for i in model.graph.initializer if i.name == bn.input[position])
    var = numpy_helper.to_array(init).copy()
    var[0] = value
    init.CopyFrom(numpy_helper.from_array(var, init.name))
    onnx.save(model, target)
    return target


def assert_one_line_error(result, *fragments):
    assert result.code == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ")
    assert all(line.startswith("hint: ") for line in lines[1:]) and len(lines) <= 2
    for fragment in fragments:
        assert fragment in result.stderr


def test_version(cli):
    result = cli("--version")
    assert result.code == 0 and result.stdout.startswith("bnfold ")


def test_inspect_json_is_the_only_stdout(cli):
    result = cli("inspect", SAMPLES / "cnn.onnx", "--json")
    assert result.code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1 and document["kind"] == "inspect"
    assert [layer["name"] for layer in document["layers"]] == [
        layer["name"] for layer in document["layers"]]  # order preserved below
    assert len(document["layers"]) == 3
    assert isinstance(document["findings"], list)
    assert document["model"]["format"] == "onnx"
    layer = document["layers"][0]
    for key in ("name", "kind", "channels", "eps", "momentum", "affine", "track_running_stats",
                "running_mean", "running_var", "effective_gain", "num_batches_tracked", "dtype", "fold", "findings"):
        assert key in layer
    assert result.stderr == ""


@pytest.mark.parametrize("args", [
    ("cnn.pt2",),
    ("cnn.ts",),
    ("cnn_pickle.pt", "--allow-pickle"),
    ("cnn_state_dict.pt", "--model-factory", "sample_models.architectures:make_cnn"),
    ("cnn.onnx",),
])
def test_inspect_every_format_renders_a_table(cli, args):
    result = cli("inspect", SAMPLES / args[0], *args[1:])
    assert result.code == 0, result.stderr
    assert "3 BN layers" in result.stdout
    for name in ("bn1", "bn2", "bn3"):
        assert name in result.stdout or "BatchNormalization" in result.stdout


def test_pickle_is_refused_with_the_flag_named(cli):
    result = cli("inspect", SAMPLES / "cnn_pickle.pt")
    assert_one_line_error(result, "--allow-pickle", "sample_models.architectures.DigitsCNN")


@pytest.mark.parametrize("name, content, fragment", [
    ("missing.onnx", None, "no such file"),
    ("junk.onnx", b"definitely not a model", "not a model bnfold can read"),
    ("empty.pt", b"", "is empty"),
])
def test_unreadable_inputs_exit_2_with_one_line(cli, tmp_path, name, content, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert_one_line_error(cli("inspect", path), fragment)


def test_state_dict_without_factory_is_a_usage_error(cli):
    assert_one_line_error(cli("inspect", SAMPLES / "cnn_state_dict.pt"), "--model-factory")


def test_fail_on_sets_the_exit_code(cli, tmp_path):
    broken = corrupt_first_bn(SAMPLES / "cnn.onnx", tmp_path / "nan.onnx", VARIANCE, np.nan)
    failed = cli("inspect", broken, "--json")
    assert failed.code == 1
    document = json.loads(failed.stdout)
    assert document["passed"] is False
    assert any(f["code"] == "non-finite-stats" and f["severity"] == "error" for f in document["findings"])
    assert cli("inspect", broken, "--fail-on", "never").code == 0


def test_fail_on_warning_is_stricter(cli, tmp_path):
    dead = corrupt_first_bn(SAMPLES / "cnn.onnx", tmp_path / "dead.onnx", SCALE, 0.0)
    assert cli("inspect", dead).code == 0
    assert cli("inspect", dead, "--fail-on", "warning").code == 1


def test_bad_option_is_exit_2(cli):
    result = cli("inspect", SAMPLES / "cnn.onnx", "--no-such-option")
    assert result.code == 2 and result.stdout == ""


def test_debug_shows_the_traceback_of_a_user_error(cli):
    result = cli("--debug", "inspect", SAMPLES / "missing.onnx")
    assert result.code == 2 and "Traceback" in result.stderr


def test_internal_errors_keep_their_traceback(cli, monkeypatch):
    import bnfold.inspection

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(bnfold.inspection, "inspect", broken)
    result = cli("inspect", SAMPLES / "cnn.onnx")
    assert result.code == 3
    assert "Traceback" in result.stderr and "boom" in result.stderr and "bug in bnfold" in result.stderr


def test_real_subprocess_run():
    completed = subprocess.run([sys.executable, "-m", "bnfold", "inspect", str(SAMPLES / "mlp.onnx"), "--json"],
                               capture_output=True, text=True, cwd=REPO, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert len(json.loads(completed.stdout)["layers"]) == 2


def test_piped_tables_are_wide_enough_for_layer_names():
    """Rich sizes piped output (a CI log) at 80 columns, which broke 'block.downsample.1' across lines."""
    environment = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    completed = subprocess.run([sys.executable, "-m", "bnfold", "inspect", str(SAMPLES / "resnet.pt2")],
                               capture_output=True, text=True, cwd=REPO, timeout=120, env=environment)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert any("block.downsample.1" in line for line in lines)
    assert 80 < max(map(len, lines)) <= 120


def test_fold_verifies_on_real_data(cli):
    result = cli("fold", SAMPLES / "mlp.onnx", "--data", SAMPLES / "calib.npy", "--batch-size", "16", "--json")
    assert result.code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["verification_inputs"] == "data"
    assert document["verification"]["samples"] == 4 * 16


def test_inspect_accepts_an_input_shape(cli):
    result = cli("inspect", SAMPLES / "mlp_pickle.pt", "--allow-pickle", "--input-shape", "2,1,8,8", "--json")
    assert result.code == 0, result.stderr
    assert all(layer["fold"]["status"] == "foldable" for layer in json.loads(result.stdout)["layers"])


def run_installed(*args: str, cwd) -> subprocess.CompletedProcess:
    """`bnfold ARGS` as the installed console script runs it: the working directory is not on sys.path."""
    return subprocess.run([sys.executable, "-I", "-c", "from bnfold.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_allowed_pickles_import_their_classes_from_the_working_directory(tmp_path):
    found = run_installed("inspect", "sample_models/cnn_pickle.pt", "--allow-pickle", "--json", cwd=REPO)
    assert found.returncode == 0, found.stderr
    assert [layer["name"] for layer in json.loads(found.stdout)["layers"]] == ["bn1", "bn2", "bn3"]
    elsewhere = run_installed("inspect", SAMPLES / "cnn_pickle.pt", "--allow-pickle", cwd=tmp_path)
    assert elsewhere.returncode == 2 and elsewhere.stdout == "" and "Traceback" not in elsewhere.stderr
    assert "No module named 'sample_models'" in elsewhere.stderr and "hint: the classes" in elsewhere.stderr


def test_inspect_shows_each_layers_statistics_in_the_table_and_the_json(cli):
    """The ranges come from the file's own tensors: running mean, running var, gamma/sqrt(var + eps)."""
    model = onnx.load(SAMPLES / "cnn.onnx")
    stored = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in model.graph.initializer}
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    eps = next(a.f for a in bn.attribute if a.name == "epsilon")
    gamma, _, mean, var = (stored[name] for name in bn.input[1:5])
    gain = gamma / np.sqrt(var + eps)
    document = json.loads(cli("inspect", SAMPLES / "cnn.onnx", "--json").stdout)
    layer = document["layers"][0]
    assert layer["name"] == bn.name and layer["channels"] == var.size and layer["eps"] == pytest.approx(eps)
    for key, values in (("running_mean", mean), ("running_var", var), ("effective_gain", gain)):
        assert (layer[key]["min"], layer[key]["max"]) == pytest.approx((values.min(), values.max())), key
    row = next(line for line in cli("inspect", SAMPLES / "cnn.onnx").stdout.splitlines() if bn.name in line)
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[1:5] == [str(var.size)] + [f"{values.min():.3g}..{values.max():.3g}" for values in (mean, var, gain)]
