"""bnfold: audit, recalibrate and fold BatchNorm in trained PyTorch and ONNX models.

    from bnfold import inspect, fold, recalibrate, check

Each returns a report object that is truthy when it passed, renders with Rich and serializes with
`.to_json()`. Heavy imports (torch, onnx) happen on first use, so `import bnfold` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("inspect", "fold", "recalibrate", "check", "bench", "load_model")

if TYPE_CHECKING:
    from bnfold.api import bench, check, fold, inspect, load_model, recalibrate


def __getattr__(name: str) -> Any:
    if name in _API:
        from bnfold import api

        return getattr(api, name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")


__all__ = [*_API, "__version__"]
