"""The public library surface: `from bnfold import inspect, fold, recalibrate, check, load_model`."""

from bnfold.folding import fold
from bnfold.formats import load_model
from bnfold.gate import check
from bnfold.inspection import inspect
from bnfold.recalibration import recalibrate

__all__ = ["check", "fold", "inspect", "load_model", "recalibrate"]
