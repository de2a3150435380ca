"""Running a caller's model leaves it as it was.

A forward can write into the module it runs: a BN whose forward fixes training mode
(`F.batch_norm(..., training=True)` in eval mode, a `.pt2` with the training-mode op) moves its running
statistics by its momentum on every call, and a module may count its calls in a buffer. inspect, fold and
check run the model many times (verification, drift measurement, timing); none of them may hand back, or
write to a file, statistics those runs moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


# a buffer as found: its module's path, the module, its name there, the tensor and the tensor's shape
_Held = tuple[str, nn.Module, str, torch.Tensor, torch.Size]


@contextmanager
def buffers_kept(module: nn.Module) -> Iterator[list[str]]:
    """For the duration the module's buffers may change; afterwards each holds what it held before, and
    the yielded list names those that had changed (written, resized or replaced by another tensor).

    Changes are found by value: torch's BN kernels write running statistics without bumping the tensor's
    version. The buffers (a small part of a model: BN statistics) are copied into one flat tensor per dtype
    and device on entry and compared in one step on exit: a few ops per call, not a few per buffer."""
    groups: dict[tuple[torch.dtype, torch.device], list[_Held]] = {}
    for path, owner in module.named_modules(remove_duplicate=False):
        for name, tensor in owner.named_buffers(recurse=False):
            if tensor.layout == torch.strided and not tensor.is_quantized and tensor.device.type != "meta":
                groups.setdefault((tensor.dtype, tensor.device), []).append((path, owner, name, tensor, tensor.shape))
    with torch.no_grad():
        saved = [(group, _flat([held[3] for held in group])) for group in groups.values()]
    changed: list[str] = []
    try:
        yield changed
    finally:
        with torch.no_grad():
            for group, flat in saved:
                _restore(group, flat, changed)


def _restore(group: list[_Held], saved: torch.Tensor, changed: list[str]) -> None:
    """Put one group's buffers back from their flat copy `saved`, naming in `changed` those that differed."""
    replaced = {id(tensor) for _, owner, name, tensor, _ in group if getattr(owner, name, None) is not tensor}
    if not replaced and all(held[3].shape == held[4] for held in group) and \
            _same(_flat([held[3] for held in group]), saved):
        return
    offset = 0
    for path, owner, name, tensor, shape in group:
        original = saved[offset:offset + shape.numel()].view(shape)
        offset += shape.numel()
        if id(tensor) in replaced:
            setattr(owner, name, tensor)
        elif tensor.shape == shape and _same(tensor, original):
            continue
        tensor.resize_(shape).copy_(original)  # an observer may resize its min/max in place
        changed.append(f"{path}.{name}".lstrip("."))


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensor.reshape(-1) for tensor in tensors])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (a health test's NaN statistics are no change)."""
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)
