"""Findings and reasons that read the same whatever the model's format.

A BN without running statistics is skipped by recalibrate and kept by fold with one reason in every format
(eager pickle, torch.export, TorchScript); a BN whose statistics are per activation says so in inspect's
JSON and table.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import bnfold
from bnfold.layers import FoldStatus
from tests.test_inspect_gaps import _feature_maps_model, _features_model

STATLESS = ("no running statistics (track_running_stats=False): it always normalizes by batch statistics, so there "
            "are none to recalibrate and no fixed scale and shift to fold")


class Statless(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def _saved(tmp_path, how: str) -> str:
    torch.manual_seed(0)
    model, example = Statless().eval(), torch.randn(2, 3, 8, 8)
    path = tmp_path / ("model.pt2" if how == "export" else "model.pt")
    if how == "pickle":
        torch.save(model, path)
    elif how == "export":
        torch.export.save(torch.export.export(model, (example,)), path)
    else:
        torch.jit.save(torch.jit.script(model), path)
    return str(path)


@pytest.mark.parametrize("how", ["pickle", "export", "script"])
def test_fold_keeps_a_bn_without_running_statistics_for_one_reason_in_every_format(tmp_path, how):
    """fold's reason was worded apart from recalibrate's, and claimed track_running_stats=False for any BN."""
    decisions = {d.layer: d for d in bnfold.fold(_saved(tmp_path, how), allow_pickle=True,
                                                 input_shape="2,3,8,8").plan.decisions}
    assert (decisions["bn1"].status, decisions["bn1"].reason) == (FoldStatus.KEPT, STATLESS)


@pytest.mark.parametrize("how", ["pickle", "export", "script"])
def test_recalibrate_skips_a_bn_without_running_statistics_for_the_reason_fold_gives(tmp_path, how):
    """The .pt2 skip said only "no running statistics", TorchScript's "(track_running_stats=False)" without
    why that matters."""
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    skipped = bnfold.recalibrate(_saved(tmp_path, how), data, allow_pickle=True).skipped
    assert [(s.name, s.reason) for s in skipped] == [("bn1", STATLESS)]


@pytest.mark.parametrize("opset", [7, 8])
def test_inspect_json_says_which_bn_keeps_statistics_per_activation(opset):
    """`channels` of a spatial=0 BN on feature maps counts activations; the flag saying so was computed but
    not in the JSON, so 54 read as channels. Every layer of either framework now carries it."""
    per_activation = bnfold.inspect(_feature_maps_model(opset)).to_dict()["layers"]
    assert [(entry["channels"], entry["per_activation"]) for entry in per_activation] == [(54, True)]
    per_feature = bnfold.inspect(_features_model(opset)).to_dict()["layers"]
    assert [(entry["channels"], entry["per_activation"]) for entry in per_feature] == [(8, False)]
    linear = bnfold.inspect(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)).eval()).to_dict()["layers"]
    assert [(entry["channels"], entry["per_activation"]) for entry in linear] == [(8, False)]


def test_the_inspect_table_counts_activations_of_a_bn_with_statistics_per_activation():
    """Its channel cell read 54, the activations of (6, 3, 3), as if they were channels."""
    console = Console(width=120, record=True, color_system=None)
    console.print(bnfold.inspect(_feature_maps_model(7)))
    assert "│ bn    │ 54 activations │" in console.export_text()
