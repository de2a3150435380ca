"""PyTorch BN discovery finds more than isinstance(m, BatchNorm2d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.pytorch.discover import discover_exported, discover_module


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's: normalize, then an activation inside the same module."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class FrozenBatchNorm2d(nn.Module):
    """Detectron-style look-alike: BN buffers, hand-written affine, not a _BatchNorm."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.ones(channels)), ("bias", torch.zeros(channels)),
                            ("running_mean", torch.zeros(channels)), ("running_var", torch.ones(channels))):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1d = nn.BatchNorm1d(4)
        self.bn2d = nn.BatchNorm2d(4)
        self.bn3d = nn.BatchNorm3d(4)
        self.sync = nn.SyncBatchNorm(4)
        self.act_bn = BatchNormAct2d(4)
        self.frozen = FrozenBatchNorm2d(4)
        self.no_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.lazy = nn.LazyBatchNorm2d()


def test_module_walk_finds_every_bn_kind():
    layers = {layer.name: layer for layer in discover_module(Zoo().eval())}
    assert set(layers) == {"bn1d", "bn2d", "bn3d", "sync", "act_bn", "frozen", "no_stats", "lazy"}
    assert layers["act_bn"].kind == "BatchNormAct2d (BatchNorm2d subclass)"
    assert layers["frozen"].kind == "FrozenBatchNorm2d (look-alike)"
    assert layers["sync"].kind == "SyncBatchNorm"
    assert layers["no_stats"].running_mean is None and not layers["no_stats"].track_running_stats
    assert layers["lazy"].channels == 0 and layers["lazy"].running_mean is None
    assert layers["bn2d"].num_batches_tracked == 0 and layers["bn2d"].channels == 4


def test_scripted_modules_are_found_by_their_original_class():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    layers = discover_module(torch.jit.script(model))
    assert [(layer.name, layer.kind) for layer in layers] == [("1", "BatchNorm2d")]
    assert layers[0].eps == 1e-5


def test_exported_program_bn_ops_are_named_after_their_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    (layer,) = discover_exported(program)
    assert layer.name == "1" and layer.kind == "BatchNormAct2d"
    torch.testing.assert_close(torch.from_numpy(layer.running_var).float(), model[1].running_var)


def test_functional_batch_norm_in_an_exported_program():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mu", torch.zeros(4))
            self.register_buffer("sigma2", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(x, self.mu, self.sigma2, training=False, eps=1e-3)

    program = torch.export.export(Functional().eval(), (torch.randn(2, 4, 5, 5),))
    (layer,) = discover_exported(program)
    assert layer.eps == 1e-3 and layer.channels == 4 and not layer.affine
