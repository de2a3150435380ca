"""bnfold's private copy of a scripted model holds leaf parameters, as the model does."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

import bnfold
from tests.torch_builders import randomized


def _scripted():
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval())
    model[0].bias.requires_grad_(False)
    return torch.jit.script(model)


def test_recalibrating_a_scripted_model_warns_nothing_and_returns_trainable_leaf_parameters():
    """A ScriptModule's deepcopy cloned its parameters with autograd on: `Module.to` warned that it read
    the .grad of a non-leaf tensor, and torch.optim refused the recalibrated model's parameters."""
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    scripted = _scripted()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = bnfold.recalibrate(scripted, data=data)
    parameters = dict(report.result.module.named_parameters())
    assert all(parameter.is_leaf for parameter in parameters.values())
    assert {name: p.requires_grad for name, p in parameters.items()} == {
        name: p.requires_grad for name, p in scripted.named_parameters()}
    assert not parameters["0.bias"].requires_grad
    torch.optim.SGD([p for p in parameters.values() if p.requires_grad], lr=0.1)
