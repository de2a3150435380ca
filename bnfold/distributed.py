"""Recalibration across processes and machines with torch.distributed, launched by torchrun.

Under torchrun (WORLD_SIZE > 1, with RANK, LOCAL_RANK and MASTER_ADDR/MASTER_PORT set) every rank reads
its own share of the data and runs the same passes; the ranks' float64 sufficient statistics (count,
mean and M2 per channel) are then gathered and merged in rank order by the exact merge that combines
batches (`bnfold.stats`). Every rank so computes bit-identical statistics and buffers, and nothing
is an average of per-rank estimates (biased when shards differ in size).

A step that can fail on one rank only (its data, its GPU) runs under `agree_on_failure`: afterwards
every rank has failed or none has, so rank 0 never writes a result another rank could not help
compute. An error every rank met alike (a missing data file) is printed by rank 0 alone; a rank's own
failure by that rank, and by rank 0 as "rank N failed". A rank that dies outright breaks the
connection, which the others report as a `DistributedError`; the process group's timeout
(`BNFOLD_DISTRIBUTED_TIMEOUT` seconds, default 1800) bounds how long a rank waits for one that stops
answering, and torchrun stops the rest when one exits.

A single process gets the plain `World`, whose exchanges do nothing: it never imports torch.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np

from bnfold.errors import BnfoldError, DistributedError, MissingDependencyError, UsageError, first_line
from bnfold.stats import ChannelStatistics, Moments

TIMEOUT_ENV = "BNFOLD_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
# Per layer, ahead of its four channel vectors: the value count, the sample count, the batch count and
# whether the unit means are per batch (`ChannelStatistics.batch_units`).
_HEADER = 4

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job. Alone it is rank 0 of 1, and every exchange returns its input."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def root(self) -> bool:
        """Rank 0 alone writes outputs and prints reports."""
        return self.rank == 0

    def device(self, name: str) -> str:
        """The device this rank computes on: a bare `cuda` means this node's GPU number LOCAL_RANK."""
        return f"cuda:{self.local_rank}" if name == "cuda" and self.size > 1 else name

    @contextmanager
    def agree_on_failure(self) -> Iterator[None]:
        """A step that may fail on some ranks only: after it, every rank has failed or none has."""
        yield

    def all_reduce_statistics(self, statistics: dict[str, ChannelStatistics],
                              channels: Mapping[str, int]) -> dict[str, ChannelStatistics]:
        """The statistics of all ranks' data together, for the layers in `channels` (name: channel count)."""
        return statistics

    def total(self, count: int) -> int:
        """The sum of `count` over all ranks."""
        return count

    def broadcast(self, value: T) -> T:
        """Rank 0's `value`, on every rank."""
        return value


class _Handle:
    """The command's process group, released when the command ends (see `joined`)."""

    def __init__(self, group: Any) -> None:
        self.group = group


@dataclass(frozen=True)
class ProcessGroupWorld(World):
    """A rank of a torch.distributed process group: the exchanges are collectives over it."""

    backend: str = "gloo"
    handle: _Handle = field(default_factory=lambda: _Handle(None), compare=False, repr=False)

    @contextmanager
    def agree_on_failure(self) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            self._share(error)
            raise
        self._share(None)

    def _share(self, error: Exception | None) -> None:
        """Tell every rank whether this one failed; raise on a rank that did not when another did. An
        error rank 0 met word for word is marked `reported_by_root`: rank 0 prints it for the job."""
        dist = _torch_distributed()
        statuses: list[tuple[str, str | None] | None] = [None] * self.size
        with self._collective("agreeing on failures"):
            dist.all_gather_object(statuses, None if error is None else _status(error), group=self.handle.group)
        failed = [(rank, status) for rank, status in enumerate(statuses) if status is not None]
        if error is None and failed:
            rank, (message, hint) = failed[0]
            others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise DistributedError(f"rank {rank} of {self.size} failed{others}: {message}", hint)
        if isinstance(error, BnfoldError) and not self.root and statuses[self.rank] == statuses[0]:
            error.reported_by_root = True

    def all_reduce_statistics(self, statistics: dict[str, ChannelStatistics],
                              channels: Mapping[str, int]) -> dict[str, ChannelStatistics]:
        """All ranks' statistics, gathered and merged in rank order: bit-identical on every rank."""
        import torch

        dist = _torch_distributed()
        local = torch.from_numpy(_pack(statistics, channels)).to(self._tensor_device())
        parts = [torch.empty_like(local) for _ in range(self.size)]
        with self._collective("merging the statistics"):
            dist.all_gather(parts, local, group=self.handle.group)
        merged: dict[str, ChannelStatistics] = {}
        for part in parts:
            for name, received in _unpack(part.cpu().numpy(), channels).items():
                merged.setdefault(name, ChannelStatistics(batch_units=received.batch_units)).merge(received)
        return merged

    def total(self, count: int) -> int:
        import torch

        summed = torch.tensor([count], dtype=torch.int64, device=self._tensor_device())
        with self._collective("counting samples"):
            _torch_distributed().all_reduce(summed, group=self.handle.group)
        return int(summed.item())

    def broadcast(self, value: T) -> T:
        box = [value]
        with self._collective("sharing the pass plan"):
            _torch_distributed().broadcast_object_list(box, src=0, group=self.handle.group)
        return box[0]

    def _tensor_device(self) -> str:
        return "cuda" if self.backend == "nccl" else "cpu"  # NCCL moves GPU tensors only

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as error:  # torch.distributed.DistBackendError and the like
            raise DistributedError(
                f"rank {self.rank} of {self.size} lost contact with the others while {what} ({first_line(error)})",
                "another rank probably crashed or was stopped: its own output says why") from None


def world() -> World:
    """Where this process stands: in the process group the caller joined, else as torchrun's environment says."""
    if "torch.distributed" in sys.modules:  # only then can a group already exist
        dist = sys.modules["torch.distributed"]
        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size(), _environment("LOCAL_RANK", 0))
    return World(_environment("RANK", 0), _environment("WORLD_SIZE", 1), _environment("LOCAL_RANK", 0))


@contextmanager
def joined(device: str = "cpu", enabled: bool | None = None) -> Iterator[World]:
    """This process's `World` for one command; `enabled=False` runs alone anyway.

    Under torchrun the process joins the default process group (env://) once and stays in it until it
    exits (a group cannot be created again over torchrun's store, whose keys outlive it); a group the
    caller joined is used as it is. The command's collectives run on a group of its own, destroyed and
    released when the command ends: releasing a group joins gloo's worker threads, which must finish
    with the collectives' tensors while the interpreter is alive (the default group cannot be released,
    as modules torch imports keep references to it, and a worker thread that needs the interpreter
    during its shutdown aborts the process).
    """
    place = world() if enabled is not False else World()
    if place.size == 1:
        yield World()
        return
    dist = _torch_distributed()
    if not dist.is_initialized():
        try:
            dist.init_process_group(_backend(device, place.local_rank), init_method="env://", timeout=_timeout())
        except (RuntimeError, ValueError) as error:
            raise DistributedError(f"rank {place.rank} could not join the torch.distributed group of {place.size} "
                                   f"processes ({first_line(error)})",
                                   "launch with torchrun, which sets MASTER_ADDR, MASTER_PORT, RANK and "
                                   "WORLD_SIZE") from None
        atexit.register(dist.destroy_process_group)
    backend = dist.get_backend()
    handle = _Handle(dist.new_group(backend=backend, timeout=_timeout()))
    try:
        yield ProcessGroupWorld(place.rank, place.size, place.local_rank, backend, handle)
    finally:
        dist.destroy_process_group(handle.group)
        handle.group = None  # the last reference: gloo's threads are joined here


def _backend(device: str, local_rank: int) -> str:
    """NCCL for CUDA (each rank on its node's GPU LOCAL_RANK), gloo for the CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return "nccl"
    return "gloo"


def _torch_distributed() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:
        raise MissingDependencyError("running as several processes (WORLD_SIZE > 1) needs torch.distributed",
                                     "pip install torch, or run a single process") from None
    if not dist.is_available():
        raise MissingDependencyError("this build of torch has no torch.distributed",
                                     "install a torch build with distributed support")
    return dist


def _status(error: Exception) -> tuple[str, str | None]:
    """What another rank prints about this rank's failure: the error's line and hint."""
    if isinstance(error, BnfoldError):
        return error.message, error.hint
    return f"{type(error).__name__}: {first_line(error)}", "that rank printed its traceback"


def _pack(statistics: Mapping[str, ChannelStatistics], channels: Mapping[str, int]) -> np.ndarray:
    """One float64 vector: per layer, the header and then mean, M2 of the values and of the unit means.

    A layer this rank never reached is all zeros (count 0). Counts are exact in float64 below 2**53.
    """
    parts = []
    for name, width in channels.items():
        found = statistics.get(name)
        if found is None:
            parts.append(np.zeros(_HEADER + 4 * width))
            continue
        values, samples = found.values, found.sample_means
        parts += [np.array([values.count, samples.count, found.batches, found.batch_units], np.float64),
                  values.mean, values.m2, samples.mean, samples.m2]
    return np.concatenate(parts) if parts else np.zeros(0)


def _unpack(packed: np.ndarray, channels: Mapping[str, int]) -> dict[str, ChannelStatistics]:
    unpacked = {}
    offset = 0
    for name, width in channels.items():
        count, samples, batches, batch_units = (int(v) for v in packed[offset:offset + _HEADER])
        vectors = packed[offset + _HEADER:offset + _HEADER + 4 * width].reshape(4, width)
        offset += _HEADER + 4 * width
        if batches:
            unpacked[name] = ChannelStatistics(Moments(count, vectors[0], vectors[1]),
                                               Moments(samples, vectors[2], vectors[3]), batches, bool(batch_units))
    return unpacked


def _timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if seconds <= 0:
        raise UsageError(f"{TIMEOUT_ENV} must be positive, got {text!r}")
    return timedelta(seconds=seconds)


def _environment(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise UsageError(f"the environment variable {name} must be an integer, got {text!r}") from None


__all__ = ["DEFAULT_TIMEOUT_S", "ProcessGroupWorld", "TIMEOUT_ENV", "World", "joined", "world"]
