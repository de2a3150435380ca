"""TorchScript models as the converter and the interpreter hand them to bnfold.

The converter lifts a traced model's Python numbers (`* 0.5`, the 2 of `h - 2`) as 0-dim "wrapped number"
tensors, which a ScriptModule traced back from the folded graph stored as Python numbers; and a
TorchScript run's error opens with the same line for every failure, which reports quoted as the cause.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import first_line
from bnfold.pytorch.capture import capture_script
from tests.test_traced_size_arithmetic import CroppedShuffle, traced
from tests.torch_builders import randomized


class ScaledShuffle(CroppedShuffle):
    """Sizes shifted by a Python number (`h - 2`, inlined by the fold) and an output scaled by one (kept)."""

    def forward(self, x):
        return super().forward(x) * 0.5


def is_wrapped_number(tensor: torch.Tensor) -> bool:
    """A wrapped number does not promote a 0-dim int8 tensor; a 0-dim tensor of a wider type does."""
    return (torch.zeros((), dtype=torch.int8) + tensor).dtype is torch.int8


def test_the_numbers_the_converter_lifts_are_plain_tensors():
    capture = capture_script(traced(randomized(ScaledShuffle())), (torch.zeros(2, 3, 8, 8),))
    numbers = [t for t in capture.module.buffers() if t.dim() == 0]
    assert {t.dtype for t in numbers} == {torch.int64, torch.float64}
    assert not any(is_wrapped_number(t) for t in numbers)


def test_a_traced_model_scaled_by_a_python_number_folds_and_keeps_the_number_a_tensor():
    """The folded model, traced back, held the 0.5 as a float "buffer": fold failed in parameter_count
    ("'float' object has no attribute 'detach'")."""
    model = randomized(ScaledShuffle())
    report = bnfold.fold(traced(model), input_shape="2,3,8,8")
    assert report.verified and [d.layer for d in report.folded] == ["bn"]
    folded = report.folded_model.module
    assert all(isinstance(t, torch.Tensor) for t in folded.state_dict().values())
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_saved_traced_model_scaled_by_a_python_number_folds(tmp_path):
    """Saved, the 0.5 is a plain float64 tensor, held as a 0-dim buffer of the folded model: the fold's
    verification took it for the model's dtype and ran the float32 convolution on float64 inputs."""
    model, path = randomized(ScaledShuffle()), tmp_path / "model.pt"
    torch.jit.save(traced(model), str(path))
    report = bnfold.fold(path, input_shape="2,3,8,8")
    assert report.verified and report.verify_error is None


class TwoRows(nn.Module):
    """A model that hard-codes its batch size: it runs on 2 rows and fails in its Linear on 1."""

    def __init__(self):
        super().__init__()
        self.m, self.fc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), nn.Linear(4 * 32, 5)

    def forward(self, x):
        return self.fc(self.m(x).view(2, -1))


CAUSE = "mat1 and mat2 shapes cannot be multiplied (2x64 and 128x5)"


def rows(count: int) -> np.ndarray:
    return np.random.default_rng(count).standard_normal((count, 3, 4, 8)).astype(np.float32)


def test_a_scripted_model_that_fails_at_run_time_is_reported_by_its_cause():
    scripted = torch.jit.script(randomized(TwoRows()))
    report = bnfold.fold(scripted, batches=[{"x": rows(2)}, {"x": rows(1)}])
    assert not report.passed
    assert report.verify_error == f"the original model does not run: {CAUSE}"


def test_the_cli_names_the_cause_of_a_saved_scripted_models_run_time_failure(tmp_path, cli):
    path, data = tmp_path / "model.pt", tmp_path / "x.npy"
    torch.jit.save(torch.jit.script(randomized(TwoRows())), str(path))
    np.save(data, rows(3))  # batches of 2 and 1 rows
    result = cli("fold", path, "--data", data, "--batch-size", "2")
    assert result.code == 1
    assert f"not verified: the original model does not run: {CAUSE}" in " ".join(result.stdout.split())
    assert "TorchScript interpreter" not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_script_raising_a_python_exception_is_quoted_by_its_exception():
    @torch.jit.script
    def positive_only(x: torch.Tensor) -> torch.Tensor:
        if bool(x.min() < 0):
            raise ValueError("negative input")
        return x

    with pytest.raises(torch.jit.Error) as raised:
        positive_only(-torch.ones(1))
    assert first_line(raised.value) == "builtins.ValueError: negative input"


def test_a_traced_models_python_numbers_are_no_parameters_in_memory_or_saved(tmp_path, cli):
    """Saved, a trace's `h - 2` and `* 0.5` are 0-dim tensor constants of its graph, which the parameter
    count of a frozen model (whose weights are graph constants) counted: the CLI said 131, the API 129."""
    model = randomized(ScaledShuffle())
    expected = sum(t.numel() for t in model.state_dict().values())  # 129, num_batches_tracked included
    assert bnfold.fold(traced(model), input_shape="2,3,8,8").params_before == expected
    path = tmp_path / "model.pt"
    torch.jit.save(traced(model), str(path))
    result = cli("fold", path, "--input-shape", "2,3,8,8", "--json")
    assert result.code == 0 and json.loads(result.stdout)["params_before"] == expected
