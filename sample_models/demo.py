"""`make demo`: the whole bnfold story on the committed sample models, with real measured numbers.

1. inspect a model: BN layers, findings, what can fold and why not;
2. inspect --data on shifted data: which layers drifted, and the whole-model discrepancy;
3. recalibrate on that data, and held-out accuracy before and after;
4. fold the recalibrated model: layers folded, verified error, CPU speed-up;
5. check --require-folded as a pipeline would run it: failing, then passing.

Every command is the real CLI; accuracy and timing are computed here with plain torch.
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
OUT = REPO / "out" / "demo"
ENV = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120")}


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def bnfold(*args: str, expect: tuple[int, ...] = (0,)) -> int:
    """Run the real CLI, showing the command line and its output; stop the demo on a surprise."""
    relative = [str(a).replace(str(REPO) + "/", "") for a in args]  # run from the repository, as shown
    print(f"\n$ bnfold {' '.join(map(shlex.quote, relative))}", flush=True)
    code = subprocess.run([sys.executable, "-m", "bnfold", *relative], cwd=REPO, env=ENV).returncode
    print(f"[exit code {code}]", flush=True)
    if code not in expect:
        sys.exit(f"demo stopped: bnfold exited {code}, expected {' or '.join(map(str, expect))}")
    return code


def load(path: Path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()


def accuracy(path: Path, split: str) -> float:
    data = np.load(SAMPLES / f"{split}.npz")
    with torch.no_grad():
        predicted = load(path)(torch.from_numpy(data["x"])).argmax(dim=1).numpy()
    return float((predicted == data["y"]).mean())


def latency_ms(paths: list[Path], batch: int, rounds: int = 15, calls: int = 20) -> list[float]:
    """Median per-call latency of each model; rounds are interleaved so machine noise hits all alike."""
    torch.set_num_threads(1)
    models = [load(path) for path in paths]
    x = torch.rand(batch, 1, 8, 8)
    samples: list[list[float]] = [[] for _ in paths]
    with torch.inference_mode():
        for model in models:  # warm-up
            for _ in range(5):
                model(x)
        for _ in range(rounds):
            for model, times in zip(models, samples):
                start = time.perf_counter()
                for _ in range(calls):
                    model(x)
                times.append((time.perf_counter() - start) / calls * 1e3)
    return [statistics.median(times) for times in samples]


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    model = SAMPLES / "cnn.pt2"
    recalibrated, folded = OUT / "cnn_recalibrated.pt2", OUT / "cnn_folded.pt2"
    shifted = SAMPLES / "shifted_calib.npy"

    banner("1. Audit: every BN layer, its health, and whether it can fold (a model with unfoldable BN)")
    bnfold("inspect", SAMPLES / "mixed.pt2")

    banner("2. A new camera: measure how far the running statistics are from the shifted data")
    bnfold("inspect", model, "--data", shifted, expect=(0, 1))

    banner("3. Recalibrate exactly on 256 shifted images, then measure held-out accuracy")
    bnfold("recalibrate", model, "--data", shifted, "-o", recalibrated)
    print("\nheld-out accuracy (450 test images, computed with torch):")
    print(f"  original      on clean data   {accuracy(model, 'test'):7.2%}")
    print(f"  original      on shifted data {accuracy(model, 'shifted_test'):7.2%}")
    print(f"  recalibrated  on shifted data {accuracy(recalibrated, 'shifted_test'):7.2%}")

    banner("4. Fold BN into the convolutions, verified numerically, and time it on this CPU")
    bnfold("fold", recalibrated, "-o", folded)
    for batch in (1, 64):
        before, after = latency_ms([recalibrated, folded], batch)
        print(f"  eager CPU latency, batch {batch:>2}: {before:.3f} ms -> {after:.3f} ms "
              f"({before / after:.2f}x, median of 15 interleaved rounds, 1 thread)")
    bnfold("fold", SAMPLES / "mixed.onnx", "-o", OUT / "mixed_folded.onnx")

    banner("5. The deployment gate: an unfolded artifact fails --require-folded, the folded one passes")
    failing = bnfold("check", recalibrated, "--require-folded", "--data", shifted, expect=(1,))
    passing = bnfold("check", folded, "--require-folded", "--data", shifted)
    print(f"\ngate results: unfolded artifact exit {failing} (blocked), folded artifact exit {passing} (ships)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
