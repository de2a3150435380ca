"""Observe BN inputs and write new running statistics in torch models (see `bnfold.recalibration`).

One runner per kind of torch object, because each is instrumented differently:

- eager `nn.Module` (pickle, state_dict + factory): forward pre-hooks on the BN modules, and
  `F.batch_norm` intercepted where a module that is no BN module calls it on its own buffers; for the
  fast method, a BN module with torch's own forward gets a forward that normalizes by its batch, and a BN
  subclass's own forward gets its F.batch_norm call taken over to do the same.
  Dependencies come from a torch.fx trace, which also counts each pass's calls: an exact pass's
  forward stops once they are made (checked on its first batch). A model fx cannot trace is planned
  from one eval pass over the data: each layer comes after every layer called before it, in any batch
  (more passes, and correct as long as the branches the stored statistics take are those the new ones
  take: a branch on activation values that the new statistics switch is not followed; recalibrating
  the result again is).
- ExportedProgram (.pt2): `program.module()` is an fx GraphModule whose BN ops read the program's own
  buffers; an observer call is inserted before each BN op (for the fast method, the BN op reads the
  batch's statistics from it instead), and the observers are the graph's outputs (dead code after the
  last is dropped). The buffers are updated in place and the program is saved as a .pt2 again.
- TorchScript: the inlined forward graph returns the BN inputs instead of the model's output (dead code
  dropped, as far as the model's own checks allow; batch-statistics BN ops for the fast method), compiled
  into a function that runs on the module's own attributes.

Every runner hands each BN call to one `InputStatistics`, which reduces it on its device (bnfold's moments
kernel for float32 on the CPU, which also normalizes where the fast method normalizes by the batch; else
torch's own BN kernels for small calls and vectorized passes per sample for large ones), takes each
batch's results to the host as one array and merges them into `bnfold.stats.ChannelStatistics` in
float64, many batches at a time (a per-call merge of small arrays would cost more than the reduction).
"""

from __future__ import annotations

import copy
import functools
import operator
from abc import ABC, abstractmethod
import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from bnfold.engine import Batch
from bnfold.errors import DataError, UsageError, first_line
from bnfold.foldmath import round_to
from bnfold.health import fixed_training
from bnfold.layers import BNLayer
from bnfold.model import InputSpec, Model
from bnfold.pytorch.capture import private_copy
from bnfold.pytorch.discover import (BN_ATEN_SIGNATURES, attribute_path, bn_kind, describe_module,
                                     constant_input, describe_tensors, discover_exported, discover_module, first_names,
                                     frozen_batch_norms, inlined_graph, missing_statistics, op_missing_statistics,
                                     owner_at, resolve_path)
from bnfold.pytorch.model import (ExportedProgramModel, ModuleModel, TorchScriptModel, inner_model, like_input,
                                  program_module, wrapper_notes)
from bnfold.pytorch.quantization import observers_frozen
from bnfold.recalibration import GraphStep, upstream_layers
from bnfold.stats import ChannelStatistics, Moments, beyond_float32_means

try:
    from bnfold import _moments  # the moments kernel (bnfold/_moments.c), built where a C compiler was found
except ImportError:
    _moments = None

# ExportedProgram BN ops that normalize with their running statistics, and how to make them use the
# batch's statistics instead.
_EVAL_BATCH_NORM = torch.ops.aten.batch_norm.default
_EVAL_NATIVE_BATCH_NORM = torch.ops.aten._native_batch_norm_legit_no_training.default


def torch_statistics_runner(model: Model, *, device: str = "cpu", copy: bool = True) -> _TorchRunner:
    target = _device(device)
    if isinstance(model, ExportedProgramModel):
        return ExportedProgramRunner(model, target, copy)
    if isinstance(model, TorchScriptModel):
        return ScriptRunner(model, target, copy)
    if isinstance(model, ModuleModel):
        return ModuleRunner(model, target, copy)
    raise UsageError(f"cannot recalibrate a {type(model).__name__}")


def torch_inputs(model: Model) -> list[InputSpec | str]:
    """The model's inputs, in the order its forward takes them (what the data must provide)."""
    if isinstance(model, ExportedProgramModel):
        return list(model.input_specs()) or ["input"]
    if isinstance(model, TorchScriptModel):
        return [argument.name for argument in model.module.forward.schema.arguments[1:]] or ["input"]
    return list(_forward_names(inner_model(model.module)[0].forward))


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device", "use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA GPU here", "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


NO_KERNEL_NOTE = ("bnfold's moments kernel was not built (no C compiler when bnfold was installed): BN inputs "
                  "are reduced and normalized by torch's slower kernels and passes instead, to the same statistics")
# Kept batches wait on the host until they take this many bytes, then merge into the float64
# statistics in bulk: few merges per pass, and memory far below one batch's activations.
_PENDING_BYTES = 4 << 20
# A variance recovered from a training-mode BN's 1 / sqrt(variance + eps) (float32) keeps about 1e-6 of
# its value while it is above eps / 8; a layer with a channel below reduces its variance directly instead.
_INVSTD_EPS_RATIO = 8.0
# Input dtypes torch's BN kernels reduce exactly (others are reduced in float32).
_EXACT_DTYPES = (torch.float32, torch.float64)
# Calls of more values than this are reduced by vectorized float32 passes (a dozen more operations, but
# several times faster per value than the BN kernels' scalar loops with double accumulators).
_VECTORIZED_VALUES = 1 << 16


class Observation(NamedTuple):
    """One call of a BN, reduced on its device, as flat `pieces` in the order `_Call` reads them back: per
    channel the batch's mean and spread, and each sample's sum (N, C) over its `positions` values, whose
    spread gives the standard error; with `m2`, each sample's sum of squared deviations from its own mean
    (N, C) too.

    The spread is the population variance, or, when `eps` is set, what a training-mode BN hands back
    instead: 1 / sqrt(variance + eps). With `m2` the statistics come from the per-sample sums and M2, and
    the mean and spread only serve to check the batch, unless the reduction was `exact` at any offset.
    The moments kernel's observation is one host array (its record, in an `_Arena`); others are tensors.
    """

    pieces: list[torch.Tensor | np.ndarray]
    samples: int
    channels: int
    positions: int
    eps: float | None = None
    m2: bool = False
    exact: bool = False

    @classmethod
    def of(cls, mean: torch.Tensor, spread: torch.Tensor, sample_sums: torch.Tensor, positions: int,
           eps: float | None = None, sample_m2: torch.Tensor | None = None) -> "Observation":
        m2 = [sample_m2.reshape(-1)] if sample_m2 is not None else []
        return cls([mean, spread, sample_sums.reshape(-1), *m2], *sample_sums.shape, positions, eps, bool(m2))


class _Call(NamedTuple):
    """Where one call's observation lies in its batch's flat array (its `Observation.pieces`, in order)."""

    layer: str
    checked: bool  # whether `end_batch` checks it (not exact already, more than one value per sample)
    positions: int
    eps: float | None
    m2: bool
    samples: int
    channels: int
    start: int

    @property
    def size(self) -> int:
        return self.channels * (2 + self.samples * (2 if self.m2 else 1))

    def mean(self, flat: np.ndarray) -> np.ndarray:
        return flat[self.start:self.start + self.channels]

    def spread(self, flat: np.ndarray) -> np.ndarray:
        return flat[self.start + self.channels:self.start + 2 * self.channels]

    def sample_sums(self, flat: np.ndarray) -> np.ndarray:
        start = self.start + 2 * self.channels
        return flat[start:start + self.samples * self.channels].reshape(self.samples, self.channels)

    def sample_m2(self, flat: np.ndarray) -> np.ndarray:
        start = self.start + (2 + self.samples) * self.channels
        return flat[start:start + self.samples * self.channels].reshape(self.samples, self.channels)


class _BatchLayout:
    """A pattern of calls in a batch: where each lies in the batch's flat array, and the vectorized check
    of the `checked` ones (see `InputStatistics`)."""

    def __init__(self, calls: list[_Call]) -> None:
        self.calls = calls
        checked = [index for index, call in enumerate(calls) if call.checked]
        sizes = [calls[index].channels for index in checked]
        self.owners = np.repeat(np.array(checked, dtype=np.int64), sizes)  # the call of each checked channel
        self.means = np.concatenate([np.arange(calls[i].channels) + calls[i].start for i in checked]
                                    or [np.zeros(0, dtype=np.int64)])
        self.spreads = self.means + np.repeat(sizes, sizes).astype(np.int64)
        eps = np.repeat([np.nan if calls[i].eps is None else calls[i].eps for i in checked], sizes)
        self.from_invstd = ~np.isnan(eps)  # channels whose spread is 1 / sqrt(variance + eps)
        self.eps = eps[self.from_invstd]

    def needing_care(self, flat: np.ndarray) -> tuple[set[str], set[str]]:
        """Layers to reduce with `batch_norm_update_stats` (a variance too small for 1/sqrt(var + eps)),
        and layers to reduce in float64 (a mean too large for float32, `beyond_float32_means`)."""
        if not len(self.means):
            return set(), set()
        means, variances = flat[self.means].astype(np.float64), flat[self.spreads].astype(np.float64)
        variances[self.from_invstd] = _invstd_variance(variances[self.from_invstd], self.eps)
        too_small = np.zeros(len(variances), dtype=bool)
        too_small[self.from_invstd] = variances[self.from_invstd] * _INVSTD_EPS_RATIO < self.eps
        too_far = beyond_float32_means(means, variances)
        if not (too_small.any() or too_far.any()):
            return set(), set()
        return ({self.calls[i].layer for i in self.owners[too_small & ~too_far]},
                {self.calls[i].layer for i in self.owners[too_far]})


class _Arena:
    """Room for results that live a while (a batch's kernel outputs, kept batches until they merge), taken
    piece by piece from host blocks that stay, and given back all at once. Small arrays that outlive the
    activations freed around them fragment glibc's heap: allocated afresh, they made the wide CNN's fast
    recalibration peak at 70 or 240 MiB from one process to the next. Numpy, not torch: a slice costs a
    tenth of a tensor view, and a small BN call is a few microseconds."""

    def __init__(self, smallest: int = 1 << 12) -> None:
        self.smallest = smallest  # elements in a block at least
        self._blocks: dict[type, np.ndarray] = {}
        self._used: dict[type, int] = {}

    def take(self, dtype: type, size: int) -> np.ndarray:
        """`size` elements of `dtype` (a numpy scalar type), flat, until `clear`."""
        room = self._room(dtype, size)
        self._used[dtype] = self._used.get(dtype, 0) + size
        return room

    def write(self, pieces: list[np.ndarray], make_room: Callable[[], None]) -> np.ndarray:
        """The pieces, concatenated in float64 into room not yet kept (`make_room` first if there is none
        left: it must let go of what was kept); the room is reused until `keep`."""
        size = sum(piece.size for piece in pieces)
        block, used = self._blocks.get(np.float64), self._used.get(np.float64, 0)
        if block is not None and used + size > block.size and used:
            make_room()
        return np.concatenate(pieces, out=self._room(np.float64, size))

    def _room(self, dtype: type, size: int) -> np.ndarray:
        """`size` elements after those taken, in a block grown for good if need be (views of the old
        block stay valid)."""
        used, block = self._used.get(dtype, 0), self._blocks.get(dtype)
        if block is None or used + size > block.size:
            block = self._blocks[dtype] = np.empty(max(2 * (used + size), self.smallest), dtype=dtype)
            self._used[dtype] = used = 0
        return block[used:used + size]

    def keep(self, flat: np.ndarray) -> None:
        """Keep what `write` returned last, until `clear`."""
        self._used[np.float64] = self._used.get(np.float64, 0) + flat.size

    def clear(self) -> None:
        self._used.clear()


class InputStatistics:
    """What one pass saw of the BN inputs, batch by batch, merged into `ChannelStatistics` in bulk.

    Every BN call is reduced on its device, in one of four ways, each exact at any offset:

    - contiguous float32 calls on the CPU with several values per sample: bnfold's moments kernel
      (`bnfold/_moments.c`), which reads the values once for each sample's sum and M2 and the batch's
      mean and variance, in float64, and, where the fast method normalizes by the batch (`normalize`),
      writes the normalized values in the same call (3 to 10 times faster than the vectorized passes
      below on large inputs; on small ones a call costs little more than an eval-mode BN's). Its
      results go straight into a host arena, laid out as a batch keeps them. Where the kernel was not
      built (no C compiler at install), the next three ways.
    - other small calls (up to `_VECTORIZED_VALUES` values) that the fast method normalizes by their
      batch: one training-mode call of torch's BN kernel, which reduces a contiguous input in two
      passes with double accumulators on the CPU (Welford's update on CUDA) and hands back the
      statistics it normalized by. Few operations.
    - other small calls: `torch.batch_norm_update_stats`, the same kernel as the second way.
    - other larger calls: each sample's sums, then the norm of its deviations from its own mean, in
      vectorized float32 passes (a sum, a subtraction written out, a norm), several times faster per
      value than torch's BN kernels' scalar loops.

    Where a sample is one value per channel (BN after a Linear), the values themselves are kept too.
    Each way keeps one sum per sample and channel, for the standard error. What comes back in float32
    from all but the moments kernel is exact enough but in two cases, which `end_batch` checks once per
    batch: a variance far below eps, recovered from 1 / sqrt(variance + eps) (the layer then uses
    `torch.batch_norm_update_stats`), and a mean too far out for float32
    (`bnfold.stats.beyond_float32_means`), whose rounding would blur the variance between batches and
    samples (the layer is then reduced in float64). The batch then runs again, and the layer stays so
    for the rest of the pass.
    """

    def __init__(self, observe: Iterable[str]) -> None:
        self.observe_layers = set(observe)
        self._direct: set[str] = set()  # reduced by batch_norm_update_stats
        self._careful: set[str] = set()  # reduced by batch_norm_update_stats in float64
        self._batch: list[tuple[str, Observation]] = []
        self._rejected = False  # see `reject_batch`
        self._layouts: dict[tuple[Any, ...], _BatchLayout] = {}
        self._statistics: dict[str, ChannelStatistics] = {}
        # kept batches, each one flat host array (in `_kept_batches` on the CPU, never a few blocks per
        # call: small long-lived blocks between freed activations fragment glibc's heap, see `_Arena`)
        self._pending: list[tuple[_BatchLayout, np.ndarray]] = []
        self._pending_bytes = 0
        self._deviations: torch.Tensor | None = None  # see `_scratch`
        self._arena = _Arena()  # the moments kernel's outputs, see `_Arena`
        self._threads = torch.get_num_threads()  # the moments kernel's
        self._kept_batches = _Arena(2 * _PENDING_BYTES // 8)  # the pending batches' flat arrays (CPU, float64)
        self._parameters: dict[str, _KernelParameters] = {}  # see `_kernel_parameters`

    def normalize(self, layer: str, inputs: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> torch.Tensor:
        """`inputs` normalized by their own batch's statistics, as a BN in training mode does; recorded."""
        if _read_once(inputs) and not self._singled_out(layer) and (parameters := self._kernel_parameters(
                layer, weight, bias)).arrays is not None:
            output = torch.empty_like(inputs)  # the moments kernel reads the values once and normalizes them
            self._kernel_moments(layer, inputs.detach(), output.numpy(), *parameters.arrays, eps)
            return output
        if self._singled_out(layer) or not _plain(inputs) or _large(inputs):
            # float16/bfloat16 inputs are normalized with float32 statistics and parameters: a float16
            # variance overflows past 65,504, and float32 BN layers in a float16 model take no float16 ones
            dtype = torch.promote_types(inputs.dtype, torch.float32)
            mean, var = self.observe(layer, inputs, dtype)
            weight, bias = (None if p is None else p.to(dtype) for p in (weight, bias))
            return F.batch_norm(inputs, mean, var, weight, bias, False, 0.0, eps)
        _check_dims(inputs)
        output, mean, invstd = torch.native_batch_norm(inputs, weight, bias, None, None, True, 0.0, eps)
        self._record(layer, Observation.of(mean, invstd, _sample_sums(inputs), _positions(inputs), eps))
        return output

    def observe(self, layer: str, inputs: torch.Tensor,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's mean and population variance per channel, in `dtype` (the inputs' by default); recorded."""
        _check_dims(inputs)
        values = inputs.detach()
        dtype = dtype or inputs.dtype
        if _read_once(values) and not self._singled_out(layer):
            mean, var = torch.from_numpy(self._kernel_moments(layer, values)).view(2, -1)
            return mean.to(dtype), var.to(dtype)
        if _plain(values) and _large(values) and not self._singled_out(layer):
            mean, var = self._centered(layer, values)
            return mean.to(dtype), var.to(dtype)
        values = values.contiguous()  # torch reduces channels-last inputs in float32: not exact
        if layer in self._careful:
            values = values.double()
        elif values.dtype not in _EXACT_DTYPES:
            values = values.float()
        mean, var = torch.batch_norm_update_stats(values, None, None, 0.0)
        self._record(layer, Observation.of(mean, var, _sample_sums(values), _positions(values)))
        return mean.to(dtype), var.to(dtype)

    def _kernel_parameters(self, layer: str, weight: torch.Tensor | None,
                           bias: torch.Tensor | None) -> _KernelParameters:
        """The layer's weight and bias as the moments kernel takes them, converted once per layer (again if
        the module's tensors or their memory changed): in a forward between convolutions, the checks and
        conversions cost 17 us a call, a third of a small layer's kernel time."""
        found = self._parameters.get(layer)
        memory = _addresses(weight, bias)
        if found is None or found.weight is not weight or found.bias is not bias or found.memory != memory:
            found = self._parameters[layer] = _KernelParameters(weight, bias, memory, _kernel_arrays(weight, bias))
        return found

    def _singled_out(self, layer: str) -> bool:
        """Whether a check singled the layer out for `batch_norm_update_stats` (see the class)."""
        return layer in self._direct or layer in self._careful

    def _kernel_moments(self, layer: str, values: torch.Tensor, *normalized: Any) -> np.ndarray:
        """One read by the moments kernel: each sample's sum and M2, the batch's mean and variance (float32,
        returned: the means, then the variances). With `normalized` (output, weight, bias, eps), the
        values normalized by them too, as an eval-mode BN with those statistics."""
        samples, channels = values.shape[:2]
        rows = samples * channels
        positions = values.numel() // rows
        record = self._arena.take(np.float64, 2 * (channels + rows))
        statistics = self._arena.take(np.float32, 2 * channels)
        _moments.batch_moments(values.numpy(), samples, channels, positions, record, statistics, self._threads,
                               *normalized)
        self._record(layer, Observation([record], samples, channels, positions, m2=True, exact=True))
        return statistics

    def _centered(self, layer: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two vectorized passes per sample: its sums, then the norm of its deviations from its mean."""
        dims = tuple(range(2, values.dim()))
        positions = _positions(values)
        sums = values.sum(dim=dims)
        sample_means = sums / positions
        deviations = torch.sub(values, sample_means[(...,) + (None,) * len(dims)], out=self._scratch(values))
        m2 = torch.linalg.vector_norm(deviations, dim=dims).square_()
        mean = sample_means.mean(dim=0)
        between = (sample_means - mean).square_().sum(dim=0)  # Chan's update, summed over the samples
        var = m2.sum(dim=0).add_(between, alpha=positions).div_(values.shape[0] * positions)
        self._record(layer, Observation.of(mean, var, sums, positions, sample_m2=m2))
        return mean, var

    def _scratch(self, values: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like `values`, the same for every call (grown to the largest): a fresh
        activation-sized block per call, freed at once, would fragment glibc's heap by hundreds of MB."""
        if (self._deviations is None or self._deviations.numel() < values.numel()
                or self._deviations.dtype != values.dtype or self._deviations.device != values.device):
            self._deviations = torch.empty(values.numel(), dtype=values.dtype, device=values.device)
        return self._deviations[:values.numel()].view(values.shape)

    def _record(self, layer: str, observation: Observation) -> None:
        self._batch.append((layer, observation))  # checked even if not observed: it may have normalized

    def reject_batch(self) -> None:
        """Have `end_batch` discard this batch: an instrumented forward found it must change its way."""
        self._rejected = True

    def end_batch(self) -> bool:
        """Keep this batch's observations; or, where a layer's need more care (see the class) or the batch
        was rejected, discard them and return False: the caller runs the batch again."""
        if self._rejected:
            self._rejected = False
            self._batch.clear()
            self._arena.clear()
            return False
        if not self._batch:
            return True
        layout = self._layout()
        pieces = [piece for _, observation in self._batch for piece in observation.pieces]
        self._batch.clear()
        on_host = all(isinstance(piece, np.ndarray) or piece.device.type == "cpu" for piece in pieces)
        flat = (self._kept_batches.write([_host(piece) for piece in pieces], self._merge_pending) if on_host
                else torch.cat(pieces).numpy(force=True))
        self._arena.clear()
        direct, careful = layout.needing_care(flat)
        if direct or careful:
            self._direct |= direct
            self._careful |= careful
            return False
        if on_host:
            self._kept_batches.keep(flat)
        self._pending.append((layout, flat))
        self._pending_bytes += flat.nbytes
        if self._pending_bytes > _PENDING_BYTES:
            self._merge_pending()
        return True

    def _layout(self) -> _BatchLayout:
        """The layout of this batch's calls, made once per pattern of calls."""
        key = tuple((layer, layer in self._careful or observation.exact, observation.positions, observation.eps,
                     observation.m2, observation.samples, observation.channels)
                    for layer, observation in self._batch)
        layout = self._layouts.get(key)
        if layout is None:
            calls, start = [], 0
            for layer, exact, positions, eps, m2, samples, channels in key:
                calls.append(_Call(layer, not exact and positions > 1, positions, eps, m2, samples, channels, start))
                start += calls[-1].size
            layout = self._layouts[key] = _BatchLayout(calls)
        return layout

    def result(self) -> dict[str, ChannelStatistics]:
        """The statistics of every observed layer the pass reached."""
        self._merge_pending()
        return self._statistics

    def _merge_pending(self) -> None:
        alike: dict[tuple[Any, ...], list[tuple[_Call, np.ndarray]]] = {}  # a BN may run at several resolutions
        for layout, flat in self._pending:
            for call in layout.calls:
                if call.layer in self.observe_layers:
                    alike.setdefault((call.layer, call.positions, call.eps, call.m2), []).append((call, flat))
        for (layer, *_), calls in alike.items():
            self._statistics.setdefault(layer, ChannelStatistics()).add(*_pooled(calls), batches=len(calls))
        self._pending.clear()
        self._pending_bytes = 0
        self._kept_batches.clear()


def _pooled(calls: list[tuple[_Call, np.ndarray]]) -> tuple[Moments, Moments]:
    """The moments of the values and of the sample means of alike calls, in float64.

    One value per sample and channel (BN after a Linear): the values themselves were kept, and their
    moments are exact whatever torch's kernel did (it reduces such inputs in float32)."""
    first = calls[0][0]
    sample_means = np.concatenate([call.sample_sums(flat) for call, flat in calls]).astype(np.float64) / first.positions
    samples = Moments.of(sample_means)
    if first.positions == 1:
        return samples, samples
    if first.m2:  # the values' M2: the samples' own, and positions times that of their means
        m2 = np.concatenate([call.sample_m2(flat) for call, flat in calls]).astype(np.float64)
        return Moments(samples.count * first.positions, samples.mean,
                       m2.sum(axis=0) + first.positions * samples.m2), samples
    spreads = np.stack([call.spread(flat) for call, flat in calls]).astype(np.float64)
    return Moments.of_batches(np.array([call.samples for call, _ in calls]) * first.positions,
                              np.stack([call.mean(flat) for call, flat in calls]),
                              spreads if first.eps is None else _invstd_variance(spreads, first.eps)), samples


def _invstd_variance(invstd: np.ndarray, eps: np.ndarray | float) -> np.ndarray:
    """The population variance behind a training-mode BN's 1 / sqrt(variance + eps), in float64."""
    return 1.0 / np.square(invstd.astype(np.float64)) - eps


def _host(piece: torch.Tensor | np.ndarray) -> np.ndarray:
    return piece if isinstance(piece, np.ndarray) else piece.numpy()


class _KernelParameters(NamedTuple):
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    memory: tuple[int, int]  # `_addresses`: a `.data` assignment keeps the tensor, not its memory
    arrays: tuple[np.ndarray | None, ...] | None  # `_kernel_arrays`


def _addresses(weight: torch.Tensor | None, bias: torch.Tensor | None) -> tuple[int, int]:
    return (0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr())


def _kernel_arrays(weight: torch.Tensor | None, bias: torch.Tensor | None) -> tuple[np.ndarray | None, ...] | None:
    """The BN's weight and bias as the moments kernel takes them (float32 arrays sharing their memory, or
    None for 1 and 0); None if it cannot (another dtype or device: torch's eval-mode BN converts them)."""
    parameters = []
    for parameter in (weight, bias):
        if parameter is not None and (parameter.dtype != torch.float32 or parameter.device.type != "cpu"
                                      or not parameter.is_contiguous()):
            return None
        parameters.append(None if parameter is None else parameter.detach().numpy())
    return tuple(parameters)


def _plain(inputs: torch.Tensor) -> bool:
    """Float32 or float64 and contiguous: what torch's BN kernels reduce with double accumulators."""
    return inputs.dtype in _EXACT_DTYPES and inputs.is_contiguous()


def _read_once(inputs: torch.Tensor) -> bool:
    """Whether the moments kernel reduces this call: contiguous float32 on the CPU, (N, C, ...) with values."""
    return (_moments is not None and inputs.dtype is torch.float32 and inputs.is_cpu and inputs.dim() > 2
            and inputs.numel() > 0 and inputs.is_contiguous())


def _large(inputs: torch.Tensor) -> bool:
    """Whether vectorized passes per sample reduce this call faster than torch's BN kernels."""
    return inputs.numel() > _VECTORIZED_VALUES and inputs.dim() > 2


def _sample_sums(values: torch.Tensor) -> torch.Tensor:
    """Each sample's sum per channel (N, C); the values themselves (a copy) when there is one per channel."""
    return values.sum(dim=tuple(range(2, values.dim()))) if values.dim() > 2 else values.detach().clone()


def _positions(values: torch.Tensor) -> int:
    return math.prod(values.shape[2:])


def _check_dims(inputs: torch.Tensor) -> None:
    if inputs.dim() < 2:
        raise DataError(f"a BN layer received a {inputs.dim()}-D tensor; BN inputs are (N, C, ...)")


BufferPair = tuple[torch.Tensor, torch.Tensor]  # a BN's (running_mean, running_var)


@contextmanager
def _buffers_restored(pairs: Iterable[BufferPair]) -> Iterator[None]:
    """Put the running statistics back after a pass that normalized by batch statistics through them."""
    saved = [(pair, (pair[0].clone(), pair[1].clone())) for pair in pairs]
    try:
        yield
    finally:
        for (running_mean, running_var), (mean, var) in saved:
            running_mean.copy_(mean)
            running_var.copy_(var)


class _TorchRunner(ABC):
    """The pass loop and buffer writes shared by the three torch runners."""

    variance_ddof = 1  # torch's running_var is the unbiased estimate

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.notes: list[str] = []
        if _moments is None and device.type == "cpu":
            self.notes.append(NO_KERNEL_NOTE)
        self._skipped: dict[str, str] = {}
        self.float_dtype = torch.float32

    def skipped(self) -> dict[str, str]:
        return dict(self._skipped)

    def inputs(self) -> list[InputSpec | str]:
        return torch_inputs(self.model)

    def run_pass(self, batches: Iterable[Batch], observe: Sequence[str],
                 batch_statistics: bool) -> dict[str, ChannelStatistics]:
        statistics = InputStatistics(observe)
        with torch.no_grad(), observers_frozen(self.module), \
                self._instrumented(batch_statistics, statistics) as forward:
            for batch in batches:
                forward(*self._tensors(batch))
                while not statistics.end_batch():  # a layer needs more care: the batch runs again
                    forward(*self._tensors(batch))
        return statistics.result()

    def _tensors(self, batch: Batch) -> list[torch.Tensor]:
        """The batch as fresh tensors for one forward: a model may write its input in place (x.mul_(2)),
        and neither the data (read-only views of the user's arrays) nor a batch run again may see that."""
        tensors = []
        for name in self.input_names:
            tensor = torch.from_numpy(np.array(batch[name]))
            if tensor.is_floating_point():
                tensor = tensor.to(self.float_dtype)
            tensors.append(tensor.to(self.device))
        return tensors

    def _working_copy(self, module: nn.Module, copy_model: bool) -> nn.Module:
        """The module the passes run on, in eval mode on the device; `float_dtype` follows its weights."""
        working = (private_copy(module) if copy_model else module).eval().to(self.device)
        self.float_dtype = _first_float_dtype(working.parameters())
        return working

    @functools.cached_property
    def input_names(self) -> list[str]:
        return [item if isinstance(item, str) else item.name for item in self.inputs()]

    def set_statistics(self, layer: str, mean: np.ndarray, var: np.ndarray, batches: int) -> None:
        for running_mean, running_var, tracked in self._buffers(layer):
            running_mean.copy_(torch.from_numpy(round_to(mean, _numpy_dtype(running_mean))))
            running_var.copy_(torch.from_numpy(round_to(var, _numpy_dtype(running_var))))
            if tracked is not None:
                tracked.fill_(batches)

    @abstractmethod
    def _instrumented(self, batch_statistics: bool, statistics: InputStatistics) -> Any:
        """A context giving a forward function that feeds the observed layers' inputs to `statistics`."""

    @abstractmethod
    def _buffers(self, layer: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(running_mean, running_var, num_batches_tracked) tensors to write a layer's statistics to."""


def _numpy_dtype(tensor: torch.Tensor) -> str:
    return "float32" if tensor.dtype == torch.bfloat16 else str(tensor.dtype).removeprefix("torch.")


def _first_float_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def _fx_steps(graph: fx.Graph, layer_of: Callable[[fx.Node], str | None]) -> Iterator[GraphStep]:
    for node in graph.nodes:
        yield node.all_input_nodes, [node], layer_of(node)


def _forward_names(forward: Callable[..., Any]) -> list[str]:
    """The positional inputs of a module's forward (its input names for .npz data)."""
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return ["input"]
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.default is p.empty]
    return names or ["input"]


class ModuleRunner(_TorchRunner):
    """An eager nn.Module, observed through forward pre-hooks on its BN modules.

    `F.batch_norm` called on the buffers of a module that is no BN module (a hand-written BN with
    statistics named `mu`/`sigma2`) is a layer too, found in the fx trace and observed by intercepting
    the call; the trace is taken only when a module other than a BN owns 1-D floating buffers.
    """

    def __init__(self, model: ModuleModel, device: torch.device, copy_model: bool) -> None:
        super().__init__(device)
        self.model = model
        self.notes += wrapper_notes(model.module)
        self.module = self._working_copy(_held(model.module), copy_model)
        self.bns: dict[str, _BatchNorm] = {}
        self._look_alikes: set[str] = set()  # traced through: their F.batch_norm call, if any, is a layer
        for name, child in self.module.named_modules():
            kind, missing = bn_kind(child), missing_statistics(child)
            if missing is not None:
                self._skipped[name] = missing
            elif kind is None:
                continue
            elif not isinstance(child, _BatchNorm):
                self._skipped[name] = (f"{kind}: not a torch BatchNorm class, so how it uses its statistics "
                                       "is unknown")
                if not isinstance(child, torch.jit.ScriptModule):
                    self._look_alikes.add(name)
            elif not _torch_forward(child) and _fixes_training(child):  # its statistics are never used
                self._skipped[name] = fixed_training()
            else:
                self.bns[name] = child
        self.functional = self._functional_batch_norms()

    def _functional_batch_norms(self) -> dict[str, BNLayer]:
        """F.batch_norm calls on the running statistics of modules that are no BN module, by owner."""
        if not self._look_alikes and not any(bn_kind(module) is None and any(
                b.dim() == 1 and b.is_floating_point() for b in module.buffers(recurse=False))
                for module in self.module.modules()):
            return {}
        graph = self._graph
        found: dict[str, BNLayer] = {}
        for node in graph.nodes if graph is not None else ():
            call = _functional_call(node)
            if call is None or not all(isinstance(call[key], fx.Node) and call[key].op == "get_attr"
                                       for key in ("running_mean", "running_var")):
                continue
            module_path = call["running_mean"].target.rpartition(".")[0]
            owner = module_path or call["running_mean"].target  # the root's statistics: named as inspect names them
            if owner in self._look_alikes and owner in self._skipped:
                # an mmcv/detectron2-style norm layer: no torch BN class, but F.batch_norm on its own statistics
                del self._skipped[owner]
            if owner in self.bns or owner in self._skipped or owner in found:
                continue
            if call["training"] is not False:
                self._skipped[owner] = fixed_training()  # the working copy is in eval mode
                continue
            tensors = {key: resolve_path(self.module, call[key].target if isinstance(call[key], fx.Node) else None)
                       for key in ("running_mean", "running_var", "weight", "bias")}
            found[owner] = describe_tensors(
                owner, f"F.batch_norm ({type(self.module.get_submodule(module_path)).__name__})",
                mean=tensors["running_mean"], var=tensors["running_var"], weight=tensors["weight"],
                bias=tensors["bias"], eps=call["eps"] if isinstance(call["eps"], float) else None,
                momentum=call["momentum"], extra={"buffers": (call["running_mean"].target, call["running_var"].target)})
        return found

    def _skipped_statistics(self) -> list[BufferPair]:
        """The running statistics of the skipped layers that have them: a forward that fixes training mode
        moves them by its momentum on every call, and a skipped layer leaves recalibration as it came."""
        pairs = []
        for name in self._skipped:
            module = resolve_path(self.module, name)
            mean, var = (getattr(module, key, None) for key in ("running_mean", "running_var"))
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                pairs.append((mean, var))
        return pairs

    def _statistics(self, layer: str) -> BufferPair:
        if layer in self.bns:
            return self.bns[layer].running_mean, self.bns[layer].running_var
        mean, var = self.functional[layer].extra["buffers"]
        return resolve_path(self.module, mean), resolve_path(self.module, var)

    @functools.cached_property
    def _graph(self) -> fx.Graph | None:
        """The fx graph with BN modules as leaves; None (and a note) when fx cannot trace the model."""
        look_alikes = {id(self.module.get_submodule(name)) for name in self._look_alikes}

        class BatchNormLeaves(fx.Tracer):
            """BN modules are leaves; look-alikes too unless `through` (then their F.batch_norm is seen)."""

            def __init__(self, through: bool) -> None:
                super().__init__()
                self.through = through

            def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
                if self.through and id(module) in look_alikes:
                    return False
                return bn_kind(module) is not None or super().is_leaf_module(module, qualified_name)

        for through in ((True, False) if look_alikes else (False,)):
            try:  # a look-alike whose forward fx cannot trace (detectron2 branches on requires_grad): a leaf
                return BatchNormLeaves(through).trace(self.module)
            except Exception as error:  # fx cannot trace data-dependent control flow and more
                self._untraceable = first_line(error, 160)
        return None

    def layers(self) -> list[BNLayer]:
        modules = [describe_module(name, bn, bn_kind(bn)) for name, bn in self.bns.items()]
        return modules + list(self.functional.values())

    def upstream(self, batches: Iterable[Batch]) -> dict[str, set[str]]:
        graph = self._graph
        if graph is None:
            self.notes.append(f"torch.fx cannot trace the model ({self._untraceable}); the passes follow "
                              "the order in which the data calls the BN layers")
            return self._call_order(batches)
        return upstream_layers(_fx_steps(graph, self._layer_of))

    def _layer_of(self, node: fx.Node) -> str | None:
        """The layer an fx node calls: a BN module, or F.batch_norm on the buffers of a functional layer."""
        if node.op == "call_module":
            return node.target if node.target in self.bns else None
        call = _functional_call(node)
        mean = call["running_mean"] if call is not None else None
        if not (isinstance(mean, fx.Node) and mean.op == "get_attr"):
            return None
        return next((name for name, layer in self.functional.items() if layer.extra["buffers"][0] == mean.target), None)

    def _call_order(self, batches: Iterable[Batch]) -> dict[str, set[str]]:
        """Without a graph, assume each layer depends on every layer called before it, in any batch (one
        eval pass over the data: a branch on the input can call other layers batch by batch)."""
        upstream: dict[str, set[str]] = {}
        order: list[str] = []
        with torch.no_grad(), observers_frozen(self.module), \
                self._observed(set(self.layer_names), lambda name, _: order.append(name)):
            for batch in batches:
                order.clear()
                self.module(*self._tensors(batch))
                called = list(dict.fromkeys(order))
                for position, name in enumerate(called):
                    upstream.setdefault(name, set()).update(called[:position])
        while True:  # transitive, as dependency_levels needs: what a layer's upstream layers depend on
            grown = {name: above.union(*(upstream[u] for u in above)) - {name}
                     for name, above in upstream.items()}
            if grown == upstream:
                return upstream
            upstream = grown

    @property
    def layer_names(self) -> list[str]:
        return [*self.bns, *self.functional]

    @contextmanager
    def _observed(self, layers: set[str], observe: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """`observe(layer, input)` before every call of the `layers`: hooks on modules, F.batch_norm intercepted."""
        def hook(name: str, _: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            observe(name, args[0])

        hooks = [self.bns[name].register_forward_pre_hook(functools.partial(hook, name))
                 for name in layers if name in self.bns]
        functional = {id(self._statistics(name)[0]): name for name in layers if name in self.functional}
        try:
            with _FunctionalBatchNormCalls(functional, observe) if functional else nullcontext():
                yield
        finally:
            for handle in hooks:
                handle.remove()

    @contextmanager
    def _instrumented(self, batch_statistics: bool, statistics: InputStatistics) -> Iterator[Callable[..., Any]]:
        """Fast method: a BN module with torch's own forward normalizes by its batch in one training-mode
        call (its forward replaced for the pass), and so does the F.batch_norm call inside a BN subclass's
        own forward (`_OwnForwardByBatch`); any other layer gets its batch's statistics written into its
        running buffers before it runs in eval mode (they are restored after the pass)."""
        layers = set(self.layer_names) if batch_statistics else statistics.observe_layers
        replaced = {name for name in layers if batch_statistics and _torch_forward(self.bns.get(name))}
        own = {name for name in layers if batch_statistics and _class_forward(self.bns.get(name))} - replaced

        # the exact method has a trace (it planned the passes with it): a forward can stop after its layers
        countdown = _Countdown(None if batch_statistics else self._calls_per_forward(layers))

        def observe_input(name: str, inputs: torch.Tensor) -> None:
            buffers = self._statistics(name)  # float32 in a float16 model: the statistics must not pass float16
            mean, var = statistics.observe(name, inputs, buffers[0].dtype)
            if batch_statistics:
                for buffer, value in zip(buffers, (mean, var)):
                    buffer.copy_(value)
            countdown.called()

        pairs = [self._statistics(name) for name in layers - replaced] if batch_statistics else []
        pairs += self._skipped_statistics()
        forwards = {self.bns[name]: functools.partial(_normalized_by_batch, statistics, name, self.bns[name])
                    for name in replaced}
        forwards |= {self.bns[name]: _OwnForwardByBatch(statistics, name, self.bns[name], observe_input)
                     for name in own}
        with _buffers_restored(pairs), _forwards_replaced(forwards), \
                self._observed(layers - replaced - own, observe_input):
            yield functools.partial(countdown.run, self.module)

    def _calls_per_forward(self, layers: set[str]) -> int | None:
        """How many calls of the `layers` one forward makes, by the fx trace (None without one)."""
        graph = self._graph
        return None if graph is None else sum(self._layer_of(node) in layers for node in graph.nodes)

    def _buffers(self, layer: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        tracked = self.bns[layer].num_batches_tracked if layer in self.bns else None
        return [(*self._statistics(layer), tracked)]

    def result(self) -> Model:
        module = self.module.cpu()
        if isinstance(module, _HeldModel):
            module = like_input(self.model.module, module.held)
        return ModuleModel(self.model.path, module, self.model.format, safetensors=self.model.safetensors,
                           key_prefix=self.model.key_prefix, nesting=self.model.nesting)


class _HeldModel(nn.Module):
    """Runs the model that wrappers hold ((Distributed)DataParallel, torch.compile's) at its path in them
    (`module`, `_orig_mod`), so layers keep the wrappers' names, without the wrappers' scatter over devices,
    buffer syncs across processes or compiled frames (which torch.fx cannot trace either). See `_held`."""

    def __init__(self, model: nn.Module, path: str) -> None:
        super().__init__()
        owner, _, attribute = path.rpartition(".")
        owner_at(self, owner).add_module(attribute, model)
        self.path = path

    @property
    def held(self) -> nn.Module:
        return self.get_submodule(self.path)


def _held(module: nn.Module) -> nn.Module:
    """`module`, or for a wrapper a `_HeldModel` of the model it holds, whose forward takes that model's
    inputs: `__wrapped__` gives torch.fx and `inspect.signature` the held model's signature."""
    held, path = inner_model(module)
    if not path:
        return module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.held(*args, **kwargs)

    forward.__wrapped__ = type(held).forward  # type: ignore[attr-defined]
    return type(_HeldModel.__name__, (_HeldModel,), {"forward": forward})(held, path)


class _PassComplete(BaseException):
    """Every observed call of the forward has been made: the rest of the model does not matter to the
    pass (a BaseException, so that no `except Exception` in a model's forward takes it for an error)."""


class _Countdown:
    """Stops a forward once it has made the `expected` number of observed calls (the trace's count).

    The first forward runs whole and counts: stopping starts only when it made exactly the expected
    calls (a trace misses calls hidden in functions it does not enter; those models run whole)."""

    def __init__(self, expected: int | None) -> None:
        self.expected = expected or None
        self.verified = False
        self.remaining = 0

    def called(self) -> None:
        self.remaining -= 1
        if self.verified and self.remaining == 0:
            raise _PassComplete

    def run(self, module: Callable[..., Any], *inputs: torch.Tensor) -> None:
        self.remaining = self.expected or 0
        try:
            module(*inputs)
        except _PassComplete:
            return
        if self.expected is not None and not self.verified:
            self.verified = self.remaining == 0
            self.expected = self.expected if self.verified else None


_FIXES_TRAINING: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()  # see `_fixes_training`


def _fixes_training(bn: _BatchNorm) -> bool:
    """Whether the forward of `bn`'s class fixes training mode, as discovery finds it in a trace of `bn`.
    Judged once per class and process: the mode a forward passes comes from its code, and a trace costs
    3.5 ms, half of preparing a MobileNet's recalibration (a whole-model discovery, 20 to 120 ms)."""
    cls = type(bn)
    if cls not in _FIXES_TRAINING:
        _FIXES_TRAINING[cls] = any(layer.training_fixed for layer in discover_module(bn, share_tensors=True))
    return _FIXES_TRAINING[cls]


def _class_forward(bn: nn.Module | None) -> bool:
    """Whether `bn` is a torch BN module running its class's forward (none set on the instance)."""
    return isinstance(bn, _BatchNorm) and "forward" not in vars(bn)


def _torch_forward(bn: nn.Module | None) -> bool:
    """Whether `bn` runs torch's own BN forward (a subclass may add to it: timm's BatchNormAct2d)."""
    return _class_forward(bn) and type(bn).forward is _BatchNorm.forward


def _normalized_by_batch(statistics: InputStatistics, name: str, bn: _BatchNorm, inputs: torch.Tensor) -> torch.Tensor:
    bn._check_input_dim(inputs)
    return statistics.normalize(name, inputs, bn.weight, bn.bias, bn.eps)


class _OwnForwardByBatch:
    """The fast method's forward for a BN subclass with a forward of its own (timm's BatchNormAct2d): the
    class's forward runs, and its one eval-mode `F.batch_norm` call on the module's input and statistics
    normalizes by the batch instead, reduced and normalized in one read (`InputStatistics.normalize`).

    Written into the buffers before the forward, the batch's statistics would cost a second read of the
    input: 4% of a MobileNet's recalibration. A forward that makes no such call (it calls
    `torch.batch_norm`, say), or another call on the module's statistics, cannot be taken so: its batch is
    rejected, and from then on the layer's input is observed and its statistics written into its buffers
    before the forward runs (`fallback`)."""

    def __init__(self, statistics: InputStatistics, layer: str, bn: _BatchNorm,
                 fallback: Callable[[str, torch.Tensor], None]) -> None:
        self.statistics, self.layer, self.bn, self.fallback = statistics, layer, bn, fallback
        self.fused = True

    def __call__(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.bn).forward
        if not self.fused:
            self.fallback(self.layer, inputs)
            return forward(self.bn, inputs, *args, **kwargs)
        with _TakenBatchNorm(self, inputs) as call:
            output = forward(self.bn, inputs, *args, **kwargs)
        if not call.taken or call.refused:
            self.fused = False
            self.statistics.reject_batch()
        return output


class _TakenBatchNorm:
    """`torch.nn.functional.batch_norm`, what torch's BN modules and their subclasses call, while one
    `_OwnForwardByBatch` call runs (a context): its module's call taken over (see there), any other passed
    on. A TorchFunctionMode would see the call too, but sends every tensor operation of the forward through
    Python: 80 us more per call of a small layer, twice its work."""

    def __init__(self, owner: _OwnForwardByBatch, inputs: torch.Tensor) -> None:
        self.owner, self.inputs = owner, inputs
        self.original = F.batch_norm
        self.taken = False
        self.refused = False  # a call on the module's statistics that cannot be taken

    def __enter__(self) -> _TakenBatchNorm:
        F.batch_norm = self
        return self

    def __exit__(self, *_: object) -> None:
        F.batch_norm = self.original

    def __call__(self, input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                 momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
        bn = self.owner.bn
        if running_mean is bn.running_mean or running_var is bn.running_var:
            if (self.taken or training or input is not self.inputs or running_mean is not bn.running_mean
                    or running_var is not bn.running_var):
                self.refused = True
            else:
                self.taken = True
                return self.owner.statistics.normalize(self.owner.layer, input, weight, bias, eps)
        return self.original(input, running_mean, running_var, weight, bias, training, momentum, eps)


@contextmanager
def _forwards_replaced(forwards: dict[nn.Module, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Give modules another forward for the duration (an instance attribute, which nn.Module calls)."""
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module in forwards:
            del module.forward


_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


def _functional_call(node: fx.Node) -> dict[str, Any] | None:
    """The arguments of an F.batch_norm call in an fx graph, by name, defaults filled in; None for other nodes."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    try:
        call = _BATCH_NORM_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    call.apply_defaults()
    return dict(call.arguments)


class _FunctionalBatchNormCalls(TorchFunctionMode):
    """Calls `observe(layer, input)` before each F.batch_norm call whose running mean is a layer's (by id)."""

    def __init__(self, layers: dict[int, str], observe: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.layers = layers
        self.observe = observe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            mean = args[1] if len(args) > 1 else kwargs.get("running_mean")
            layer = self.layers.get(id(mean))
            if layer is not None:
                self.observe(layer, args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


class ExportedProgramRunner(_TorchRunner):
    """A torch.export program, run as its GraphModule with observers inserted before the BN ops."""

    def __init__(self, model: ExportedProgramModel, device: torch.device, copy_model: bool) -> None:
        super().__init__(device)
        self.model = model
        self.program = _copy_program(model.program) if copy_model else model.program
        self.module = program_module(self.program).to(device)
        self.float_dtype = _first_float_dtype(self.program.state_dict.values())
        self.layer_of: dict[fx.Node, str] = {}
        self.statistics_of: dict[str, tuple[str, str]] = {}  # layer -> its (mean, var) buffers, by any name
        found = {layer.extra.get("node"): layer for layer in discover_exported(self.program)}
        first = first_names(self.program)  # a layer's name, as discovery gives it, whatever name an op reads
        for node in self.module.graph.nodes:
            if node.op != "call_function" or getattr(node.target, "_schema", None) is None:
                continue
            if node.target._schema.name not in BN_ATEN_SIGNATURES:
                continue
            mean, var = (node.args[3], node.args[4]) if len(node.args) > 4 else (None, None)
            buffers = all(isinstance(arg, fx.Node) and arg.op == "get_attr" for arg in (mean, var))
            key = first.get(mean.target, mean.target).rsplit(".", 1)[0] if buffers else None
            if key is None:
                layer = found.get(node.name)  # its kind is the class that called the op
                self._skipped[layer.name if layer else node.name] = op_missing_statistics(layer.kind if layer else None)
            elif node.target not in (_EVAL_BATCH_NORM, _EVAL_NATIVE_BATCH_NORM) or \
                    (node.target is _EVAL_BATCH_NORM and node.args[5]):
                self._skipped[key] = fixed_training()
            else:
                self.layer_of[node] = key
                self.statistics_of[key] = (mean.target, var.target)

    def layers(self) -> list[BNLayer]:
        keys = set(self.layer_of.values())
        return [layer for layer in discover_exported(self.program) if layer.name in keys]

    def upstream(self, batches: Iterable[Batch]) -> dict[str, set[str]]:
        return upstream_layers(_fx_steps(self.module.graph, self.layer_of.get))

    @contextmanager
    def _instrumented(self, batch_statistics: bool, statistics: InputStatistics) -> Iterator[Callable[..., Any]]:
        graph = fx.Graph()
        copies: dict[fx.Node, fx.Node] = {}
        graph.graph_copy(self.module.graph, copies)
        observers = []
        for original, key in self.layer_of.items():
            if key in statistics.observe_layers or batch_statistics:
                node = copies[original]
                with graph.inserting_before(node):
                    observed = graph.call_function(_observer(statistics, key), (node.args[0], *node.args[1:4]))
                    if batch_statistics:  # the BN op reads the batch's mean and variance instead of its buffers
                        mean, var, weight, bias = (graph.call_function(operator.getitem, (observed, index))
                                                   for index in range(4))
                        node.args = (node.args[0], weight, bias, mean, var, *node.args[5:])
                observers.append(observed)
        graph.output(tuple(observers))  # the pass needs nothing after the last observer: it is not run
        module = fx.GraphModule(self.module, graph)
        graph.eliminate_dead_code()
        module.recompile()
        yield module

    def _buffers(self, layer: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        found = []
        mean, var = self.statistics_of[layer]  # F.batch_norm on buffers of any name: stem.norm.mu
        for holder in (self.program.state_dict, dict(self.module.named_buffers())):
            tracked = holder.get(f"{layer}.num_batches_tracked")
            found.append((holder[mean], holder[var], tracked))
        return list({id(entry[0]): entry for entry in found}.values())  # often the same tensors

    def result(self) -> Model:
        return ExportedProgramModel(self.model.path, self.program)


Parameter = torch.Tensor | None


def _observer(statistics: InputStatistics, layer: str) -> Callable[..., tuple[Parameter, ...]]:
    def observe_batch_norm_input(inputs: torch.Tensor, weight: Parameter, bias: Parameter,
                                 running_mean: torch.Tensor) -> tuple[Parameter, ...]:
        """The batch's mean and variance, then the BN's weight and bias, in float32 at least, as eager runs
        normalize (`InputStatistics.normalize`: a float16 variance overflows past 65,504), or in the running
        statistics' dtype where it is wider; torch's BN takes float16 inputs with float32 parameters."""
        dtype = torch.promote_types(torch.promote_types(inputs.dtype, running_mean.dtype), torch.float32)
        mean, var = statistics.observe(layer, inputs, dtype)
        return mean, var, *(None if parameter is None else parameter.to(dtype) for parameter in (weight, bias))

    return observe_batch_norm_input


def _copy_program(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():  # torch's own pytree deprecation, raised while copying its specs
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(program)


_FROZEN = ("its statistics are constants of a frozen TorchScript graph (torch.jit.freeze), which cannot be "
           "rewritten: recalibrate the model before freezing it")


class ScriptRunner(_TorchRunner):
    """A TorchScript module, run through a copy of its inlined graph that also returns BN inputs."""

    def __init__(self, model: TorchScriptModel, device: torch.device, copy_model: bool) -> None:
        super().__init__(device)
        self.model = model
        self.module = self._working_copy(model.module, copy_model)
        graph = self._inlined()
        self.keys = [_stats_owner(node) for node in _top_level_batch_norms(graph)]
        for node in graph.findAllNodes("aten::batch_norm", True):
            if node.owningBlock() != graph.block():
                owner = _stats_owner(node)
                if owner:
                    self._skipped[owner] = "called inside control flow (if/loop), where bnfold cannot observe it"
        for name, _ in frozen_batch_norms(graph):
            self._skipped[name] = _FROZEN
        for layer in discover_module(self.module):
            if "hidden_call" in layer.extra:
                self._skipped[layer.name] = layer.extra["hidden_call"]
        unnamed = False
        for node, key in zip(_top_level_batch_norms(graph), self.keys):
            owner = _stats_owner(node, position=1) if key is None else None  # named after its weight instead
            if owner:
                self._skipped.setdefault(owner, missing_statistics(resolve_path(self.module, owner))
                                         or op_missing_statistics(None))
            unnamed |= key is None and not owner and constant_input(node, 3) is None
        if unnamed:
            self.notes.append("batch_norm calls without running statistics were left as they are")
        self.names = {key for key in self.keys if key is not None} - set(self._skipped)
        self.statistics_of = {key: (attribute_path(node, 3), attribute_path(node, 4))  # running_mean, or `mu` and the like
                              for node, key in zip(_top_level_batch_norms(graph), self.keys) if key in self.names}

    def _inlined(self) -> torch._C.Graph:
        return inlined_graph(self.module)

    def layers(self) -> list[BNLayer]:
        return [layer for layer in discover_module(self.module) if layer.name in self.names]

    def upstream(self, batches: Iterable[Batch]) -> dict[str, set[str]]:
        graph = self._inlined()
        layer_of = dict(zip(_top_level_batch_norms(graph), self.keys))

        def steps() -> Iterator[GraphStep]:
            for node in graph.nodes():
                reads = [value.unique() for value in _reads(node)]
                key = layer_of.get(node)
                yield reads, [value.unique() for value in node.outputs()], key if key in self.names else None

        return upstream_layers(steps())

    @contextmanager
    def _instrumented(self, batch_statistics: bool, statistics: InputStatistics) -> Iterator[Callable[..., Any]]:
        graph, observed = self.pass_graph(statistics.observe_layers, batch_statistics)
        function = torch._C._create_function_from_graph("bnfold_recalibrate", graph)

        def forward(*inputs: torch.Tensor) -> None:
            outputs = function(self.module._c, *inputs)
            for key, value in zip(observed, outputs if isinstance(outputs, tuple) else (outputs,)):
                statistics.observe(key, value)

        yield forward

    def pass_graph(self, observe: set[str], batch_statistics: bool) -> tuple[torch._C.Graph, list[str]]:
        """The inlined forward graph returning the inputs of the `observe` layers (and nothing after
        the last of them, which the pass does not need), and those layers in the order it returns them."""
        graph = self._inlined()
        observed = []
        for node, key in zip(_top_level_batch_norms(graph), self.keys):
            if key not in self.names:
                continue
            if key in observe:
                graph.registerOutput(node.inputsAt(0))
                observed.append(key)
            if batch_statistics:
                graph.setInsertPoint(node)
                none = graph.insertConstant(None)
                node.replaceInput(3, none)
                node.replaceInput(4, none)
                node.replaceInput(5, graph.insertConstant(True))
        graph.eraseOutput(0)  # the model's own output
        torch._C._jit_pass_dce(graph)
        graph.makeMultiOutputIntoTuple()
        return graph, observed

    def _buffers(self, layer: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        mean, var = (resolve_path(self.module, path) for path in self.statistics_of[layer])
        return [(mean, var, getattr(resolve_path(self.module, layer), "num_batches_tracked", None))]

    def result(self) -> Model:
        return TorchScriptModel(self.model.path, self.module.cpu())


def _top_level_batch_norms(graph: torch._C.Graph) -> list[torch._C.Node]:
    return [node for node in graph.nodes() if node.kind() == "aten::batch_norm"]


def _stats_owner(node: torch._C.Node, position: int = 3) -> str | None:
    """The module path whose running_mean (or input `position`) a batch_norm call reads ("layer1.0.bn1")."""
    path = attribute_path(node, position)
    return path.rpartition(".")[0] or None if path else None


def _reads(node: torch._C.Node) -> list[torch._C.Value]:
    """Values a node reads, including those read inside its blocks (if/loop bodies)."""
    values = list(node.inputs())
    for block in node.blocks():
        for inner in block.nodes():
            values.extend(_reads(inner))
        values.extend(block.returnNode().inputs())
    return values
