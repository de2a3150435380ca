"""Run ONNX models in onnxruntime with every graph optimization off (optimized only for timing).

onnxruntime's default level already fuses Conv+BN: comparing a folded model against an original that
the runtime silently folds too would hide a wrong fold. Both sides run unoptimized.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from bnfold import memory
from bnfold.errors import InputError
from bnfold.onnx.graph import opset_version
from bnfold.onnx.model import OnnxModel, save_model

# Models of up to this many weights reach onnxruntime as bytes: quicker than a file, and their three
# copies (see `session`) are a few MB.
IN_MEMORY_WEIGHTS = 1 << 20
# The oldest default-domain opset onnxruntime implements (BatchNormalization-6 and older have no kernel).
OLDEST_OPSET = 7
# Intra-op threads of the sessions bnfold creates; 0 lets onnxruntime choose (one per core). Benchmarks
# set 1, as they do for torch, so that a neighbour's load on a shared machine is not timed as the model.
intra_op_threads = 0


def session(model: onnx.ModelProto, optimize: bool = False):
    """An unoptimized CPU session (`optimize`: every graph optimization on, as deployments run it);
    raises onnxruntime's own errors when the model cannot load.

    A large model reaches onnxruntime as a file in a temporary directory, written a tensor at a time:
    from bytes, onnxruntime would hold the serialized model, its own copy and the parsed graph at once
    (three times the weights); from a file it keeps one copy, and models over protobuf's 2 GB limit work
    too. A small one (up to `IN_MEMORY_WEIGHTS`) goes as bytes, which is quicker. A model older than
    onnxruntime's oldest opset gets an InputError that says so, not the first node it has no kernel for.
    """
    try:
        return _session(model, optimize)
    except Exception as error:
        if opset_version(model) >= OLDEST_OPSET:
            raise
        raise InputError(f"onnxruntime runs opset {OLDEST_OPSET} and later, and this model is opset "
                         f"{opset_version(model)}",
                         "convert it first: onnx.version_converter.convert_version(model, 17)") from error


def _session(model: onnx.ModelProto, optimize: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 4  # failures surface as exceptions; no console noise
    # The memory pattern (one block for all activations, planned from the first runs) made a fresh session's
    # second run as slow as its first: 0.1 s more per recalibration of a MobileNet at 128x128, and no
    # faster afterwards. Sessions timed as deployments run them keep onnxruntime's defaults.
    options.enable_mem_pattern = optimize
    # The default order runs a node whose outputs only leave the graph (a recalibration probe's
    # ReduceMean) after everything else, so every probed activation stays allocated to the end and is
    # read back cold: the fast pass of a MobileNet at 64x64 ran at 0.74x of inference, and at 0.85x in
    # this order, which runs each probe beside its layer. Inference takes the same time in either.
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.intra_op_num_threads = intra_op_threads
    providers = ["CPUExecutionProvider"]
    if OnnxModel.weight_count(model) <= IN_MEMORY_WEIGHTS:  # counted from shapes: ByteSize() serializes
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="bnfold-ort-", ignore_cleanup_errors=True) as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path)
        memory.release()  # the writer's buffers, before onnxruntime allocates its copy
        return ort.InferenceSession(str(path), options, providers=providers)


def run(sess, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of the session for one batch; inputs the session does not take are ignored."""
    return [np.asarray(output) for output in sess.run(None, feed(sess, batch))]


def feed(sess, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The part of a batch that the session takes as inputs."""
    names = {value.name for value in sess.get_inputs()}
    return {k: v for k, v in batch.items() if k in names}
