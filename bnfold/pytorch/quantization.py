"""Quantization-aware training (torch.ao.quantization) under bnfold's forward passes.

A FakeQuantize keeps observing in eval mode: each forward moves its scale, zero point and its observer's
min/max before quantizing with them, and a plain observer records every input it sees. Recalibration,
drift measurement and fold verification must see what the model computes with the quantization it holds,
and must leave that quantization as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.ao.quantization import FakeQuantizeBase, ObserverBase


@contextmanager
def observers_frozen(module: nn.Module) -> Iterator[None]:
    """For the duration, fake quantization uses the scale and zero point `module` holds and no observer
    learns; afterwards the buffers of every FakeQuantize and observer (their observer_enabled and
    fake_quant_enabled flags included) are what they were before."""
    quantizers = [child for child in module.modules() if isinstance(child, (FakeQuantizeBase, ObserverBase))]
    saved = [(buffer, buffer.clone()) for child in quantizers for buffer in child.buffers(recurse=False)]
    for child in quantizers:
        if isinstance(child, FakeQuantizeBase):
            child.disable_observer()
    try:
        yield
    finally:
        for buffer, value in saved:  # a per-channel observer resizes its min/max in place on its first input
            buffer.resize_(value.shape).copy_(value)
