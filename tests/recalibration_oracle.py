"""Independent oracles for `bnfold.recalibrate`: plain torch in float64 over all the data, no bnfold code.

Every BN computation goes through `F.batch_norm` (BN modules, their subclasses, SyncBatchNorm, hand-written
calls on odd buffers), so the oracle intercepts that one function with a `TorchFunctionMode`: it records
the input of each layer under study (a layer is the module path owning the running statistics a call
reads) and decides what the call normalizes with. No streaming merge, no graph, no dependency analysis:

- exact: a fixed point. Every pass runs the whole data in eval mode with the statistics of the pass
  before, then stores every layer's input statistics (in the model's buffers too, unless `per_call`, so
  that code reading them outside F.batch_norm sees them); passes repeat until the statistics come back
  bit for bit (a layer at depth d is final after d + 1 passes). This is what `exact` promises: each
  layer holds the statistics of the inputs it sees at inference once the layers before it hold theirs,
  whatever order the modules are declared in and however the data flows.
- fast: one pass in which the calls of the layers under study normalize by the batch's own statistics
  (as torch does in training: no running statistics, `training=True`); nothing else changes mode, so
  dropout stays off, also inside a BN subclass.

`ddof` is the variance the format stores and normalizes with (1: PyTorch's unbiased running_var, 0: ONNX's
population variance); in exact passes downstream layers see inputs normalized by it. With `per_call`,
each call of a layer is a layer of its own (keys `(name, k)` for its k-th call in a forward), as each
BatchNormalization node is in ONNX even when two nodes share their statistics.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Collection, Hashable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_BATCH_NORM = inspect.signature(F.batch_norm)
_MAX_PASSES = 64


class _BatchNormCalls(TorchFunctionMode):
    """Records the inputs of the studied layers' F.batch_norm calls and sets what they normalize with."""

    def __init__(self, oracle: BatchNormOracle, batch_statistics: bool) -> None:
        super().__init__()
        self.oracle = oracle
        self.batch_statistics = batch_statistics
        self.inputs: dict[Hashable, list[torch.Tensor]] = {}
        self.calls: Counter[str] = Counter()  # per forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.batch_norm:
            return func(*args, **(kwargs or {}))
        call = _BATCH_NORM.bind(*args, **(kwargs or {}))
        call.apply_defaults()
        arguments = call.arguments
        mean, var = arguments["running_mean"], arguments["running_var"]
        buffer = self.oracle.buffers.get(mean.data_ptr()) if isinstance(mean, torch.Tensor) else None
        layer = buffer.rpartition(".")[0] if buffer is not None else None
        if layer is None or (self.oracle.layers is not None and layer not in self.oracle.layers):
            return func(**arguments)
        self.oracle.reads[layer] = (buffer, self.oracle.buffers[var.data_ptr()])
        key = (layer, self.calls[layer]) if self.oracle.per_call else layer
        self.calls[layer] += 1
        self.inputs.setdefault(key, []).append(arguments["input"])
        if self.batch_statistics:
            arguments.update(running_mean=None, running_var=None, training=True)
        elif key in self.oracle.statistics:
            stored_mean, stored_var = self.oracle.statistics[key]
            arguments.update(running_mean=torch.from_numpy(stored_mean), running_var=torch.from_numpy(stored_var))
        return func(**arguments)


class BatchNormOracle:
    """Recalibration of `module`'s BN layers on `data`, computed the plain way (see the module docstring)."""

    def __init__(self, module: nn.Module, data: np.ndarray, *, batch: int, ddof: int,
                 layers: Collection[str] | None = None, per_call: bool = False) -> None:
        self.model = copy.deepcopy(module).double().eval()
        self.batches = [torch.from_numpy(np.asarray(data[start:start + batch], np.float64))
                        for start in range(0, len(data), batch)]
        self.ddof = ddof
        self.layers = None if layers is None else set(layers)  # None: every layer F.batch_norm reads stats of
        self.per_call = per_call
        self.buffers: dict[int, str] = {}  # a module held under two names is named by its first, as eager names it
        for name, tensor in self.model.named_buffers(remove_duplicate=False):
            self.buffers.setdefault(tensor.data_ptr(), name)
        self.reads: dict[str, tuple[str, str]] = {}  # layer -> the (mean, var) buffers its calls read
        self.statistics: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}
        self.calls: dict[Hashable, int] = {}  # key -> calls over the data (batches, times calls per forward)
        self.passes = 0

    def exact(self) -> BatchNormOracle:
        for self.passes in range(1, _MAX_PASSES + 1):
            before = self.statistics
            self._observe(batch_statistics=False)
            if self.statistics.keys() == before.keys() and all(
                    np.array_equal(a, b) for key in before for a, b in zip(before[key], self.statistics[key])):
                return self
        raise AssertionError(f"the exact oracle did not converge in {_MAX_PASSES} passes")

    def fast(self) -> BatchNormOracle:
        self._observe(batch_statistics=True)
        self.passes = 1
        return self

    def _observe(self, batch_statistics: bool) -> None:
        mode = _BatchNormCalls(self, batch_statistics)
        self.reads = {}
        with torch.no_grad(), mode:
            for batch in self.batches:
                mode.calls.clear()
                self.model(batch)
        self.statistics = {key: channel_statistics(inputs, self.ddof) for key, inputs in mode.inputs.items()}
        self.calls = {key: len(inputs) for key, inputs in mode.inputs.items()}
        if not batch_statistics and not self.per_call:
            self._store(self.model)

    def _store(self, model: nn.Module) -> None:
        """Write the statistics into the model's buffers too, as a recalibrated model holds them: code that
        reads them outside F.batch_norm (DBB's BNAndPadLayer computes its border values from them) sees
        them in the next pass. One call's statistics per buffer: per call, the buffers stay as they were."""
        with torch.no_grad():
            for layer, (mean, var) in self.statistics.items():
                model.get_buffer(self.reads[layer][0]).copy_(torch.from_numpy(mean))
                model.get_buffer(self.reads[layer][1]).copy_(torch.from_numpy(var))

    def outputs(self, x: torch.Tensor) -> np.ndarray:
        """The model's output on `x`, every studied layer normalizing with the oracle's statistics."""
        with torch.no_grad(), _BatchNormCalls(self, batch_statistics=False):
            return self.model(x.double()).numpy()

    def reference_model(self) -> nn.Module:
        """A float64 copy of the model holding the oracle's statistics in its own buffers."""
        assert not self.per_call, "one module cannot hold a statistic per call"
        model = copy.deepcopy(self.model)
        self._store(model)
        return model


def channel_statistics(inputs: list[torch.Tensor], ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance per channel (axis 1) over every value of every input."""
    channels = inputs[0].shape[1]
    values = torch.cat([x.double().transpose(0, 1).reshape(channels, -1) for x in inputs], 1).numpy()
    return values.mean(axis=1), values.var(axis=1, ddof=ddof)


def exact_oracle(module: nn.Module, data: np.ndarray, ddof: int, **options) -> tuple[dict, nn.Module]:
    """Exact statistics of every BN layer (all samples in one batch unless `batch` says otherwise) and a
    float64 copy of `module` holding them."""
    oracle = BatchNormOracle(module, data, batch=options.pop("batch", len(data)), ddof=ddof, **options).exact()
    return oracle.statistics, oracle.reference_model()


def fast_oracle(module: nn.Module, data: np.ndarray, ddof: int, *, batch: int, **options) -> tuple[dict, nn.Module]:
    """Fast-method statistics (BN layers normalizing by each batch of `batch` samples) and a model holding them."""
    oracle = BatchNormOracle(module, data, batch=batch, ddof=ddof, **options).fast()
    return oracle.statistics, oracle.reference_model()


def assert_statistics_match(stored_mean, stored_var, oracle_mean, oracle_var, *, layer: object = ""):
    """Within 1e-4 relative: means relative to the channel's scale (a mean may be ~0), variances plain."""
    scale = np.abs(oracle_mean) + np.sqrt(oracle_var)
    mean_error = np.max(np.abs(np.asarray(stored_mean, np.float64) - oracle_mean) / scale)
    assert mean_error < 1e-4, f"{layer}: running mean off by {mean_error:.2g} of the channel's scale"
    np.testing.assert_allclose(np.asarray(stored_var, np.float64), oracle_var, rtol=1e-4, err_msg=str(layer))
