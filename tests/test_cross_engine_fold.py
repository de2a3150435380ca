"""Random Conv/ConvTranspose/Linear + BN stacks folded end to end by both engines.

Hypothesis draws whole models (1-3 blocks of Conv1d/2d/3d or ConvTranspose with random groups, kernels,
strides, dilations, padding and padding modes, biases, affine or plain BN with random statistics and
eps, an optional Linear + BatchNorm1d head) and a dtype. Each model goes through `bnfold.fold` twice: as
an nn.Module (the PyTorch engine) and as its ONNX export (the ONNX engine). Every BN directly follows
its layer, so every BN must fold in both; the folded model must hold no BN and compute, on a fresh
input, what the original computes. tests/test_foldmath.py sweeps the arithmetic alone and
tests/test_torch_fold_properties.py single PyTorch patterns; this file checks the engines agree.
A longer sweep: BNFOLD_PROPERTY_EXAMPLES=500 .venv/bin/python -m pytest tests/test_cross_engine_fold.py
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from bnfold.layers import FoldStatus
from bnfold.onnx import runtime
from tests.zoo import randomize_bn

SWEEP = settings(max_examples=int(os.environ.get("BNFOLD_PROPERTY_EXAMPLES", "12")), deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# Relative error of the folded model against the original in the same dtype: a few roundings.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@dataclass
class Drawn:
    model: nn.Module
    shape: tuple[int, ...]
    dtype: torch.dtype
    bn_layers: int


@st.composite
def stacks(draw, dtypes: list[torch.dtype]) -> Drawn:
    """A random model whose every BN follows a layer that only it reads."""
    dims = draw(st.integers(1, 3))
    size = draw(st.integers(5, 8)) if dims < 3 else 5
    channels = draw(st.integers(1, 4))
    shape = (2, channels, *[size] * dims)
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3 if dims < 3 else 2))):
        transposed = draw(st.booleans())
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
        out = groups * draw(st.integers(1, 3))
        kernel, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        padding = draw(st.integers(0, 1))
        if transposed:
            layer = CONV_T[dims](channels, out, kernel, stride=stride, padding=padding, dilation=dilation,
                                 groups=groups, bias=draw(st.booleans()),
                                 output_padding=draw(st.integers(0, stride - 1)))  # onnxruntime: < stride
            size = (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + layer.output_padding[0] + 1
        else:
            mode = draw(st.sampled_from(["zeros", "replicate", "circular"])) if padding else "zeros"
            layer = CONV[dims](channels, out, kernel, stride=stride, padding=padding, dilation=dilation,
                               groups=groups, bias=draw(st.booleans()), padding_mode=mode)
            size = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        if size < 1 or size > 24:
            draw(st.nothing())  # a shape the layers cannot produce, or too big to be quick
        bn = BATCH_NORM[dims](out, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])), affine=draw(st.booleans()))
        layers += [layer, bn] + ([nn.ReLU()] if draw(st.booleans()) else [])
        channels = out
    if draw(st.booleans()):
        features = channels * size**dims
        layers += [nn.Flatten(), nn.Linear(features, 3, bias=draw(st.booleans())), nn.BatchNorm1d(3)]
    model = randomize_bn(nn.Sequential(*layers), draw(st.integers(0, 2**16))).eval()
    with torch.no_grad():  # signed, non-trivial affine parameters: a fold of gamma = 1, beta = 0 proves little
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(-2, 2)
                module.bias.uniform_(-1, 1)
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return Drawn(model.to(draw(st.sampled_from(dtypes))), shape, next(model.parameters()).dtype, count)


def fresh_input(drawn: Drawn) -> torch.Tensor:
    return torch.randn(drawn.shape, generator=torch.Generator().manual_seed(7)).to(drawn.dtype)


def assert_close(expected: np.ndarray, actual: np.ndarray, dtype: torch.dtype) -> None:
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    scale = max(float(np.abs(expected).max()), 1e-3)
    assert float(np.abs(expected - actual).max()) <= RTOL[dtype] * scale, (np.abs(expected - actual).max(), scale)


def all_folded(report) -> None:
    assert report.passed, (report.difference, report.verify_error)
    assert all(d.status is FoldStatus.FOLDED for d in report.decisions), report.decisions


@given(drawn=stacks([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
@SWEEP
def test_the_pytorch_engine_folds_every_bn_of_a_random_stack(drawn):
    original = copy.deepcopy(drawn.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = bnfold.fold(drawn.model, input_shape=",".join(map(str, drawn.shape)))
    all_folded(report)
    assert len(report.decisions) == drawn.bn_layers
    folded = report.folded_model
    module = folded.program.module() if hasattr(folded, "program") else folded.module
    x = fresh_input(drawn)
    with torch.no_grad():
        expected, actual = original(x), module(x)
    assert_close(expected.float().numpy(), actual.float().numpy(), drawn.dtype)
    for name, tensor in drawn.model.state_dict().items():  # the caller's model is untouched
        torch.testing.assert_close(tensor, original.state_dict()[name], rtol=0, atol=0)


@given(drawn=stacks([torch.float32, torch.float16]))
@SWEEP
def test_the_onnx_engine_folds_every_bn_of_the_same_stacks(drawn, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(drawn.model, (fresh_input(drawn),), str(path), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, opset_version=17, input_names=["x"])
    report = bnfold.fold(str(path))
    all_folded(report)
    assert len(report.decisions) == drawn.bn_layers
    folded = report.folded_model.proto
    assert not [node for node in folded.graph.node if node.op_type == "BatchNormalization"]
    onnx.checker.check_model(folded, full_check=True)
    x = fresh_input(drawn).numpy()
    expected = runtime.run(runtime.session(onnx.load(path)), {"x": x})[0]
    actual = runtime.run(runtime.session(folded), {"x": x})[0]
    assert_close(expected, actual, drawn.dtype)
    with torch.no_grad():  # and both agree with PyTorch itself
        assert_close(drawn.model(fresh_input(drawn)).float().numpy(), actual, drawn.dtype)


def test_the_generator_covers_the_layers_it_claims():
    """The strategy really draws transposed, grouped, dilated, padded and 1-3-D layers (or it proves little)."""
    seen: set[str] = set()

    @given(stacks([torch.float32]))
    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def collect(drawn):
        for module in drawn.model.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                seen.add(type(module).__name__)
                seen.update(name for name, hit in (("grouped", module.groups > 1), ("strided", module.stride[0] > 1),
                                                   ("dilated", module.dilation[0] > 1),
                                                   ("padded", module.padding[0] > 0 if isinstance(module.padding, tuple)
                                                    else False),
                                                   (module.padding_mode, True)) if hit)
            if isinstance(module, nn.Linear):
                seen.add("Linear")

    collect()
    assert {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "Linear", "grouped", "strided",
            "dilated", "padded", "replicate", "circular"} <= seen, seen


pytestmark = pytest.mark.filterwarnings("ignore")
