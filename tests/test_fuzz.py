"""A mutation fuzzer over every input format (SECURITY.md): no input may crash bnfold.

Each mutated file runs through the CLI; the contract is exit code 0, 1 or 2, no traceback, an error (exit
2) of one line plus an optional hint, no output file unless the command succeeded, and the input left as
it was. Mutations are raw bytes (bit flips, interesting values, cuts, splices), edits of one zip member
(so torch's parsers see more than CRC errors), and edits of ONNX protobuf fields (dims, op types, value
names, attributes, element types).

The fuzzer runs in a worker process, so a native crash (a segfault in a runtime) is caught too, with the
input that caused it kept. CI runs a few seconds per format group with a fixed seed. A longer run:

    BNFOLD_FUZZ_SECONDS=600 BNFOLD_FUZZ_SEED=7 .venv/bin/python -m pytest tests/test_fuzz.py -s

prints inputs per second and saves every failing input under the pytest temporary directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
SECONDS = float(os.environ.get("BNFOLD_FUZZ_SECONDS", "3"))
SEED = int(os.environ.get("BNFOLD_FUZZ_SEED", "0"))
PER_INPUT_SECONDS = 60
CALIB = SAMPLES / "calib.npy"
FACTORY = ("--model-factory", "sample_models.architectures:make_cnn")

# Format group -> seed files and the commands each mutated file goes through (every `n`-th input for the
# slower ones). "{in}" is the mutated file, "{out}" an output path that must not exist after a failure.
GROUPS = {
    "onnx": (["cnn.onnx", "mlp.onnx", "resnet.onnx", "mixed.onnx"],
             [(1, ["inspect", "{in}"]), (3, ["fold", "{in}", "-o", "{out}"]),
              (5, ["recalibrate", "{in}", "--data", str(CALIB), "-o", "{out}"])]),
    "torch": (["cnn.pt2", "mlp.pt2", "cnn.ts", "mixed.ts", "cnn_state_dict.pt", "cnn.safetensors", "cnn_pickle.pt"],
              [(1, ["inspect", "{in}", *FACTORY]), (8, ["fold", "{in}", "-o", "{out}", *FACTORY])]),
    "data": (["calib.npy", "test.npz"], [(1, ["inspect", str(SAMPLES / "cnn.onnx"), "--data", "{in}"])]),
}
# fold writes a state_dict (.pt here) or safetensors model as a .pt2 program, and refuses other names.
OUTPUT_SUFFIX = {".pt": ".pt2", ".safetensors": ".pt2"}
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x3F, 0x40]
ONNX_OPS = ["BatchNormalization", "Conv", "ConvTranspose", "Gemm", "MatMul", "Reshape", "Flatten", "Transpose",
            "Add", "Mul", "Concat", "Identity", "ConstantOfShape", "Expand", "Tile", "NoSuchOp"]


@dataclass
class Outcome:
    """What the fuzzer saw: counts, and every input that broke the contract."""

    group: str
    inputs: int = 0
    runs: int = 0
    seconds: float = 0.0
    exit_codes: dict[str, int] = field(default_factory=dict)
    violations: list[dict] = field(default_factory=list)
    max_rss_mb: float = 0.0


# ---- mutations ---------------------------------------------------------------------------------------


def mutate_bytes(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        choice = rng.randrange(6)
        at = rng.randrange(len(data))
        if choice == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif choice == 1:
            data[at] = rng.choice(INTERESTING)
        elif choice == 2:
            del data[rng.randrange(len(data)):]
        elif choice == 3:
            del data[at:at + rng.randint(1, 64)]
        elif choice == 4:
            data[at:at] = data[at:at + rng.randint(1, 64)]
        else:
            donor = rng.choice(donors)
            start = rng.randrange(max(1, len(donor)))
            data[at:at + rng.randint(1, 64)] = donor[start:start + rng.randint(1, 64)]
    return bytes(data)


def mutate_zip_member(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    """Rewrite a torch archive with one member mutated, dropped or duplicated under another name."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    index = rng.randrange(len(members))
    name, content = members[index]
    action = rng.randrange(10)
    if action == 0:
        del members[index]
    elif action == 1:
        members.append((name.rsplit("/", 1)[0] + "/extra", content))
    else:
        members[index] = (name, mutate_bytes(rng, content, donors))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, payload in members:
            archive.writestr(member, payload)
    return buffer.getvalue()


def mutate_onnx_fields(rng: random.Random, data: bytes) -> bytes:
    """Edit one protobuf field the way a crafted file would: dims, op types, names, attributes, types."""
    import onnx

    model = onnx.ModelProto.FromString(data)
    graph = model.graph
    names = [name for node in graph.node for name in (*node.input, *node.output)] or ["x"]
    action = rng.randrange(7)
    if action == 0 and graph.initializer:
        tensor = rng.choice(graph.initializer)
        if tensor.dims:
            tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice([0, -1, 1, 3, 2**31, 10**12])
    elif action == 1 and graph.node:
        rng.choice(graph.node).op_type = rng.choice(ONNX_OPS)
    elif action == 2 and graph.node:
        node = rng.choice(graph.node)
        if node.input:
            node.input[rng.randrange(len(node.input))] = rng.choice(names)
    elif action == 3 and graph.node:
        node = rng.choice(graph.node)
        if node.attribute:
            attr = rng.choice(node.attribute)
            if attr.ints:
                attr.ints[rng.randrange(len(attr.ints))] = rng.choice([0, -1, 2, 7, 2**40])
            attr.i = rng.choice([0, -1, 3, 2**40])
            attr.f = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-30])
    elif action == 4 and graph.initializer:
        rng.choice(graph.initializer).data_type = rng.randrange(0, 27)
    elif action == 5 and graph.node:
        del graph.node[rng.randrange(len(graph.node))]
    else:
        model.opset_import[0].version = rng.choice([1, 6, 9, 13, 15, 22, 99])
    return model.SerializeToString()


def mutate(rng: random.Random, seed_name: str, data: bytes, donors: list[bytes]) -> bytes:
    if data.startswith(b"PK\x03\x04") and rng.random() < 0.7:
        return mutate_zip_member(rng, data, donors)
    if seed_name.endswith(".onnx") and rng.random() < 0.5:
        return mutate_onnx_fields(rng, data)
    return mutate_bytes(rng, data, donors)


# ---- the worker --------------------------------------------------------------------------------------


class Hang(BaseException):
    """An input ran longer than PER_INPUT_SECONDS (a BaseException, so the CLI cannot swallow it)."""


def _alarm(signum, frame):
    raise Hang


def run_cli(args: list[str]) -> tuple[int, str, str]:
    from bnfold.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as done:
            code = int(done.code or 0) if not isinstance(done.code, str) else 2
    return code, out.getvalue(), err.getvalue()


def contract_broken(code: int, stderr: str, wrote: bool) -> str | None:
    if code not in (0, 1, 2):
        return f"exit code {code}"
    if "Traceback" in stderr:
        return "traceback"
    lines = stderr.strip().splitlines()
    if code == 2 and not (lines and lines[0].startswith("error: ") and len(lines) <= 2
                          and all(line.startswith("hint: ") for line in lines[1:])):
        return "error is not one line (plus a hint)"
    if wrote and code != 0:
        return "an output was written although the command failed"
    return None


def fuzz(group: str, seconds: float, seed: int, folder: Path) -> Outcome:
    """Mutate the group's seed files for `seconds` and run each mutant through its commands."""
    os.environ.update(COLUMNS="160", NO_COLOR="1", TERM="dumb")
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    seeds, commands = GROUPS[group]
    originals = {name: seed_file(name, folder) for name in seeds}
    donors = list(originals.values())
    rng = random.Random(seed)
    outcome = Outcome(group)
    signal.signal(signal.SIGALRM, _alarm)
    run_cli(["inspect", str(SAMPLES / seeds[0]), *(FACTORY if group == "torch" else ())])  # warm up imports
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        name = rng.choice(seeds)
        mutant = mutate(rng, name, originals[name], donors)
        path = folder / f"current{Path(name).suffix}"
        path.write_bytes(mutant)
        digest = hashlib.sha256(mutant).hexdigest()
        outcome.inputs += 1
        for every, template in commands:
            if outcome.inputs % every:
                continue
            out = folder / f"out{OUTPUT_SUFFIX.get(Path(name).suffix, Path(name).suffix)}"
            args = [part.format(**{"in": path, "out": out}) for part in template]
            (folder / "current.json").write_text(json.dumps({"seed": name, "args": args}))
            signal.alarm(PER_INPUT_SECONDS)
            try:
                code, _, stderr = run_cli(args)
            except Hang:
                code, stderr = -1, f"hang: over {PER_INPUT_SECONDS}s"
            finally:
                signal.alarm(0)
            outcome.runs += 1
            outcome.exit_codes[str(code)] = outcome.exit_codes.get(str(code), 0) + 1
            problem = "hang" if code == -1 else contract_broken(code, stderr, out.exists())
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                problem = "the input was modified"
            out.unlink(missing_ok=True)
            if problem:
                kept = folder / f"failure-{len(outcome.violations)}{Path(name).suffix}"
                kept.write_bytes(mutant)
                outcome.violations.append({"problem": problem, "input": str(kept), "seed": name,
                                           "command": args[0], "stderr": stderr[-2000:]})
    outcome.seconds = time.monotonic() - start
    outcome.max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return outcome


def seed_file(name: str, folder: Path) -> bytes:
    if name == "cnn.safetensors":
        import torch
        from safetensors.torch import save_file

        path = folder / name
        save_file(dict(torch.load(SAMPLES / "cnn_state_dict.pt", weights_only=True)), str(path))
        return path.read_bytes()
    return (SAMPLES / name).read_bytes()


# ---- the tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
def test_mutated_inputs_never_crash(tmp_path, group):
    result = tmp_path / "outcome.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tests.test_fuzz", group, str(SECONDS), str(SEED), str(tmp_path), str(result)],
        cwd=REPO, capture_output=True, text=True, timeout=SECONDS + 300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    if not result.exists():  # the worker itself died: a native crash
        current = json.loads((tmp_path / "current.json").read_text()) if (tmp_path / "current.json").exists() else {}
        pytest.fail(f"the fuzz worker died (exit {completed.returncode}) on {current}; input kept in {tmp_path}:\n"
                    f"{completed.stderr[-3000:]}")
    outcome = Outcome(**json.loads(result.read_text()))
    print(f"\nfuzz {group}: {outcome.inputs} inputs, {outcome.runs} runs in {outcome.seconds:.1f}s "
          f"({outcome.inputs / max(outcome.seconds, 1e-9):.1f} inputs/s), exit codes {outcome.exit_codes}, "
          f"peak RSS {outcome.max_rss_mb:.0f} MB, {len(outcome.violations)} violations")
    assert outcome.inputs > 0
    assert outcome.violations == [], json.dumps(outcome.violations[:3], indent=1)


if __name__ == "__main__":
    _group, _seconds, _seed, _folder, _result = sys.argv[1:6]
    found = fuzz(_group, float(_seconds), int(_seed), Path(_folder))
    Path(_result).write_text(json.dumps(asdict(found)))
