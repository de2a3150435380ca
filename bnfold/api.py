"""The public library surface: `from bnfold import inspect, fold, recalibrate, check, bench, load_model`."""

from bnfold.benchmark import bench
from bnfold.folding import fold
from bnfold.formats import load_model
from bnfold.gate import check
from bnfold.inspection import inspect
from bnfold.recalibration import recalibrate

__all__ = ["bench", "check", "fold", "inspect", "load_model", "recalibrate"]
