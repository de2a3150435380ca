"""What the processes started by torchrun run in tests/test_distributed.py.

`python -m torch.distributed.run --nproc-per-node 2 tests/distributed_job.py DATA OUT` runs, on every rank,
`bnfold recalibrate` on `CLI_MODEL` as `python -m bnfold` would (writing `OUT/cli.pt2`, the JSON report on
stdout), then recalibrates every case of `CASES` through the library and saves the statistics stored in
each resulting model (`OUT/rank<r>.npz`), in a process group the job joined itself, as a user's script
would. The `*_shard` functions are `--data-fn` callables.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from bnfold.model import Model
from tests.conftest import SAMPLES

CASES = {f"{model}-{method}": (SAMPLES / model, method)
         for model in ("resnet.pt2", "resnet.onnx") for method in ("exact", "fast")}
BATCH = 32
CLI_MODEL = SAMPLES / "resnet.pt2"  # its exact recalibration is the case resnet.pt2-exact


def stored_statistics(model: Model) -> dict[str, np.ndarray]:
    """Every BN layer's running statistics and batch count, as the model stores them."""
    stored = {}
    for layer in model.bn_layers():
        stored[f"{layer.name}/mean"] = layer.running_mean
        stored[f"{layer.name}/var"] = layer.running_var
        if layer.num_batches_tracked is not None:
            stored[f"{layer.name}/batches"] = np.array(layer.num_batches_tracked)
    return stored


def recalibrated(data: Path, distributed: bool) -> dict[str, np.ndarray]:
    """The stored statistics of every case, keyed `case/layer/what`."""
    from bnfold import recalibrate

    results = {}
    for case, (model, method) in CASES.items():
        report = recalibrate(model, data, method=method, batch_size=BATCH, distributed=distributed)
        results.update({f"{case}/{key}": value for key, value in stored_statistics(report.result).items()})
        results[f"{case}/samples"] = np.array(report.samples)
    return results


def _rows(rank: int) -> list[np.ndarray]:
    data = np.load(SAMPLES / "shifted_calib.npy")
    return [data[start:start + BATCH] for start in range(rank * 64, rank * 64 + 64, BATCH)]


def failing_shard(rank: int, world_size: int) -> list[np.ndarray]:
    """A data pipeline whose shard on rank 1 cannot be read."""
    if rank == 1:
        raise OSError("shard 1 of the calibration set is unreadable")
    return _rows(rank)


def crashing_shard(rank: int, world_size: int):
    """A data pipeline whose process on rank 1 dies outright after one batch (as on a segfault)."""
    for batch in _rows(rank):
        yield batch
        if rank == 1:
            os._exit(9)


def _cli(data: Path, output: Path) -> None:
    from bnfold.cli import main

    try:
        main(["recalibrate", str(CLI_MODEL), "--data", str(data), "-o", str(output), "--batch-size", str(BATCH),
              "--json"])
    except SystemExit as done:
        if done.code:
            raise


def gloo_threads() -> int:
    """gloo's worker threads in this process: a group bnfold used and released leaves none behind."""
    return sum(Path(f"/proc/self/task/{task}/comm").read_text().strip() == "pt_gloo_runloop"
               for task in os.listdir("/proc/self/task"))


def leftover_gloo_threads(before: int, patience: float = 10.0) -> int:
    """Threads of released groups beyond `before`, once they have had `patience` seconds to wind down
    (a destroyed group's thread exits asynchronously; on a loaded machine that takes a moment)."""
    deadline = time.monotonic() + patience
    while gloo_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    return gloo_threads() - before


if __name__ == "__main__":
    import torch.distributed as dist

    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")  # as the user's own script would: bnfold uses the group it finds
    default_group = dist.distributed_c10d._get_default_group()
    _cli(data, out / "cli.pt2")
    before = gloo_threads()  # the default group's, named by now (a new thread names itself)
    results = recalibrated(data, distributed=True)
    np.savez(out / f"rank{os.environ['RANK']}.npz", leftover_gloo_threads=leftover_gloo_threads(before),
             default_group_collectives=default_group._get_sequence_number_for_group(), **results)
