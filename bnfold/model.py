"""The model adapter interface: one small class per format, loaded by `bnfold.formats.load_model`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from bnfold.layers import BNLayer


class ModelFormat(str, Enum):
    """The model file formats bnfold reads and writes."""

    ONNX = "onnx"
    EXPORTED_PROGRAM = "pt2"
    TORCHSCRIPT = "torchscript"
    PICKLE = "pickle"
    STATE_DICT = "state_dict"

    @property
    def framework(self) -> str:
        return "onnx" if self is ModelFormat.ONNX else "torch"


@dataclass(frozen=True)
class LoadOptions:
    """What the user allowed and supplied when loading a model."""

    allow_pickle: bool = False
    model_factory: str | None = None  # "package.module:callable" that builds the architecture


@dataclass(frozen=True)
class InputSpec:
    """One model input; `None` in `shape` marks a dynamic dimension."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    dim_names: tuple[str | None, ...] = ()  # symbolic names of dynamic dims (ONNX dim_param), when recorded
    # a BN's variance fed at run time: random inputs for it must be positive, or every output is NaN
    positive: bool = False


class Model(ABC):
    """A loaded model of one format. Subclasses hold the framework object in `.graph` or `.module`."""

    format: ModelFormat

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def framework(self) -> str:
        return self.format.framework

    @abstractmethod
    def bn_layers(self) -> list[BNLayer]:
        """Every BN layer in the model, in graph (or module) order."""

    @abstractmethod
    def input_specs(self) -> list[InputSpec]:
        """The inputs, as far as the format records them (empty when it does not)."""

    @abstractmethod
    def parameter_count(self) -> int:
        """Number of stored weight values (parameters, buffers, initializers)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the model in its own format to `path` (callers handle atomicity)."""
