"""Library-level fold options shared by every engine: real-data verification, default tolerance, input shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnfold import fold, inspect
from bnfold.errors import UsageError
from bnfold.layers import FoldStatus
from tests.conftest import SAMPLES


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


class TokenNorm(nn.Module):
    """Vision-transformer style: BN over flattened tokens after a Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):  # (N, T, 8)
        y = self.fc(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class HalfConvFloatBN(nn.Module):
    """Autocast leftovers: a float16 conv feeding a float32 BN (CASES E2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False).half()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x.half()))


def test_fold_verifies_on_real_data():
    report = fold(SAMPLES / "cnn.pt2", data=SAMPLES / "calib.npy")
    assert report.passed and report.verification_inputs == "data"
    assert report.difference.samples == 4 * 32  # the first four batches of the default size
    assert report.difference.max_rel < 1e-5


def test_default_tolerance_follows_the_least_precise_dtype():
    report = fold(randomized(HalfConvFloatBN()), input_shape="2,3,8,8")
    assert report.difference.dtypes == {"float16"}
    assert report.tolerance == 1e-2 and report.passed
    assert [d.status for d in report.decisions] == [FoldStatus.FOLDED]


def test_float32_models_keep_the_strict_default():
    report = fold(SAMPLES / "cnn.onnx")
    assert report.tolerance == 1e-4 and report.difference.dtypes == {"float32"}


def test_inspect_input_shape_proves_what_shapes_decide():
    model = randomized(TokenNorm())
    without = inspect(model).folds["bn"]
    assert without.status is FoldStatus.KEPT and "example input" in without.reason
    with_shape = inspect(model, input_shape="2,5,8").folds["bn"]
    assert with_shape.status is FoldStatus.FOLDABLE and with_shape.targets == ["fc"]
    assert fold(model, input_shape="2,5,8").folded[0].layer == "bn"


def test_input_shape_is_also_a_tuple_or_one_per_input():
    """From Python a shape is a tuple; the API took the CLI's text alone and raised AttributeError ('tuple'
    object has no attribute 'split') from deep inside. A bad one is a UsageError naming it."""
    model = randomized(TokenNorm())
    assert inspect(model, input_shape=(2, 5, 8)).folds["bn"].status is FoldStatus.FOLDABLE
    assert fold(model, input_shape=[(2, 5, 8)]).folded[0].layer == "bn"
    with pytest.raises(UsageError, match=r"got \(2, 5.5, 8\)"):
        fold(model, input_shape=(2, 5.5, 8))


def test_batch_one_example_keeps_the_pt2_batch_dynamic(tmp_path):
    """torch.export specializes size-1 axes; folding with --input-shape 1,... must still write a dynamic batch."""
    output = tmp_path / "cnn.pt2"
    assert fold(SAMPLES / "cnn.pt2", output, input_shape="1,1,8,8").passed
    program = torch.export.load(str(output)).module()
    assert program(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_fold_with_data_leaves_the_callers_model_as_it_was():
    """Reading the data's input names built a recalibration runner on the caller's module, which put it in
    eval mode: a BN the caller left in training mode was then folded (found by helper-33), and the
    caller's model came back changed. With data as with an input shape, it is kept, and nothing moves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    model[4].eval()
    data = np.random.default_rng(0).standard_normal((16, 3, 10, 10)).astype(np.float32)
    for source in ({"data": data}, {"input_shape": "2,3,10,10"}):
        report = fold(model, **source)
        assert [(d.layer, d.status) for d in report.decisions] == [("1", FoldStatus.KEPT), ("4", FoldStatus.FOLDED)]
        assert "training mode" in report.decisions[0].reason
        assert [m.training for m in model.modules()] == [True, True, True, True, True, False]


class ScalesItsInputInPlace(nn.Module):
    """A forward that writes its input (`x.mul_(2)`), as some preprocessing wrappers do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x.mul_(2)))


def test_a_model_that_writes_its_input_verifies_on_data_it_cannot_change():
    """The original and the folded model each get their own copy of a batch: the original's x.mul_(2) had
    doubled the batch the folded model ran next, and the fold was refused (relative error 0.97)."""
    data = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    untouched = data.copy()
    report = fold(randomized(ScalesItsInputInPlace()), data=data)
    assert report.passed and len(report.folded) == 1 and report.difference.max_rel < 1e-5
    np.testing.assert_array_equal(data, untouched)
