"""The write path under faults (SECURITY.md, "Output"): every command that writes publishes a complete file
or nothing, never touches the input without --in-place, and replaces an output only with --force."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from bnfold.onnx.model import OnnxModel
from tests.conftest import REPO, SAMPLES
from tests.test_cli import assert_one_line_error

CALIB = SAMPLES / "calib.npy"
OLD = b"an older output that must survive"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command(name: str, model: Path, out: Path) -> tuple:
    """The CLI arguments of each writing command, writing `out`."""
    return {"fold": ("fold", model, "-o", out),
            "recalibrate": ("recalibrate", model, "--data", CALIB, "-o", out),
            "check": ("check", model, "--junit-xml", out)}[name]


WRITERS = ["fold", "recalibrate", "check"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes((SAMPLES / "cnn.onnx").read_bytes())
    return path


# ---- consent ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["fold", "recalibrate"])
def test_an_existing_output_needs_force(cli, tmp_path, model, writer):
    out = tmp_path / "out.onnx"
    out.write_bytes(OLD)
    assert_one_line_error(cli(*command(writer, model, out)), "already exists", "--force")
    assert out.read_bytes() == OLD
    assert cli(*command(writer, model, out), "--force").code == 0
    onnx.checker.check_model(onnx.load(out))


def test_junit_xml_replaces_an_earlier_report_whole(cli, tmp_path, model):
    """CI reruns overwrite their report by design (documented), still atomically."""
    out = tmp_path / "report.xml"
    out.write_bytes(OLD)
    assert cli(*command("check", model, out)).code == 0
    assert out.read_text().startswith("<?xml") and leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", ["fold", "recalibrate"])
@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink"])
def test_the_input_is_never_the_output_without_in_place(cli, tmp_path, model, writer, alias):
    out = {"same": lambda: model, "symlink": lambda: (tmp_path / "l.onnx").symlink_to(model) or tmp_path / "l.onnx",
           "hardlink": lambda: (tmp_path / "h.onnx").hardlink_to(model) or tmp_path / "h.onnx"}[alias]()
    before = digest(model)
    for extra in ((), ("--force",)):
        assert_one_line_error(cli(*command(writer, model, out), *extra), "is the input file", "--in-place")
    assert digest(model) == before


@pytest.mark.parametrize("writer", ["fold", "recalibrate"])
def test_in_place_replaces_the_input_whole(cli, tmp_path, model, writer):
    before = digest(model)
    assert cli(*command(writer, model, model), "--in-place").code == 0
    assert digest(model) != before and leftovers(tmp_path) == []
    onnx.checker.check_model(onnx.load(model))


def test_a_symlinked_output_is_replaced_not_written_through(cli, tmp_path, model):
    """A link planted where the output goes cannot redirect the write to another file."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(OLD)
    out = tmp_path / "out.onnx"
    out.symlink_to(victim)
    assert cli("fold", model, "-o", out, "--force").code == 0
    assert victim.read_bytes() == OLD and not out.is_symlink()


# ---- faults while writing ------------------------------------------------------------------------------


def failing_write(monkeypatch, error: BaseException) -> None:
    """Every writer stops half way through its file with `error` (full disk, Ctrl-C...)."""
    def half_then_fail(path: Path, data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise error

    def save(self, path):
        half_then_fail(Path(path), self.proto.SerializeToString())

    def write_text(self, text, *args, **kwargs):
        half_then_fail(self, text.encode())

    monkeypatch.setattr(OnnxModel, "save", save)
    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("fault, code, fragment", [
    (OSError(errno.ENOSPC, "No space left on device"), 2, "No space left on device"),
    (OSError(errno.EIO, "Input/output error"), 2, "Input/output error"),
    (KeyboardInterrupt(), 130, ""),
], ids=["full-disk", "io-error", "ctrl-c"])
def test_a_failed_write_leaves_no_partial_file_and_the_old_one_intact(cli, monkeypatch, tmp_path, model, writer,
                                                                     fault, code, fragment):
    out = tmp_path / ("report.xml" if writer == "check" else "out.onnx")
    out.write_bytes(OLD)
    before = digest(model)
    failing_write(monkeypatch, fault)
    result = cli(*command(writer, model, out), *(() if writer == "check" else ("--force",)))
    assert result.code == code and fragment in result.stderr and "Traceback" not in result.stderr
    if code == 2:
        assert_one_line_error(result, fragment)
    assert out.read_bytes() == OLD and digest(model) == before
    assert leftovers(tmp_path) == []


def never_read_the_model(monkeypatch) -> None:
    """Any command that gets as far as reading its model fails the test: the output is checked first."""
    def read(*args, **kwargs):
        raise AssertionError("the model was read before the output path was checked")

    monkeypatch.setattr("bnfold.formats.load_model", read)


@pytest.mark.parametrize("writer", WRITERS)
def test_an_unwritable_directory_is_refused_before_the_work(cli, monkeypatch, tmp_path, model, writer,
                                                           read_only_dir):
    out = read_only_dir / ("report.xml" if writer == "check" else "out.onnx")
    never_read_the_model(monkeypatch)
    assert_one_line_error(cli(*command(writer, model, out)), "is not writable")
    assert not out.exists()


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("where, fragment", [("absent/out.onnx", "does not exist"), ("folder", "is a directory")])
def test_a_missing_directory_or_a_directory_is_refused_before_the_work(cli, monkeypatch, tmp_path, model, writer,
                                                                      where, fragment):
    (tmp_path / "folder").mkdir()
    never_read_the_model(monkeypatch)
    assert_one_line_error(cli(*command(writer, model, tmp_path / where)), fragment)
    assert not (tmp_path / "absent").exists()


FACTORY = ("--model-factory", "sample_models.architectures:make_cnn", "--input-shape", "2,1,8,8")


@pytest.fixture
def safetensors_model(tmp_path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "cnn.safetensors"
    save_file(dict(torch.load(SAMPLES / "cnn_state_dict.pt", weights_only=True)), path)
    return path


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("args, out, fragment", [
    (("fold", "safetensors", *FACTORY), "out.safetensors", "fold writes a safetensors model as a torch.export "
                                                           "program: name the output out.pt2"),
    (("fold", "cnn_state_dict.pt", *FACTORY), "out.bin", "fold writes a state_dict model as a torch.export "
                                                         "program: name the output out.pt2"),
    (("fold", "cnn.pt2"), "out.pt", "fold writes a .pt2 model as a torch.export program: name the output out.pt2"),
    (("recalibrate", "cnn.pt2", "--data", CALIB), "out", "name the output out.pt2"),
    (("recalibrate", "cnn_state_dict.pt", "--data", CALIB, *FACTORY[:2]), "out.safetensors",
     "recalibrate writes a state_dict model as a torch.save pickle: name the output out.pt"),
    (("fold", "cnn_pickle.pt", "--allow-pickle", *FACTORY[2:]), "out.safetensors", "name the output out.pt"),
], ids=["fold-safetensors", "fold-state-dict", "fold-pt2", "recalibrate-pt2", "recalibrate-state-dict",
        "fold-pickle"])
def test_an_output_name_its_format_does_not_load_under_is_refused_before_the_work(
        cli, monkeypatch, tmp_path, safetensors_model, args, out, fragment):
    """torch.export.load reads a program only from a .pt2 file, torch.load reads any .safetensors name as
    safetensors: such a name is refused once the model's format is known, before any analysis."""
    from bnfold.pytorch.engine import TorchEngine

    def analyse(*args, **kwargs):
        raise AssertionError("the model was analysed before its output name was checked")

    monkeypatch.setattr(TorchEngine, "plan", analyse)
    monkeypatch.setattr("bnfold.recalibration.statistics_runner", analyse)
    name, source, *flags = args
    source = safetensors_model if source == "safetensors" else SAMPLES / source
    assert_one_line_error(cli(name, source, *flags, "-o", tmp_path / out), fragment)
    assert not (tmp_path / out).exists()


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/proc/mounts").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: chmod, or (for root, whom chmod does not stop) a read-only tmpfs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if not can_mount():
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]).returncode:
        pytest.skip("root without mount permission: no way to make a directory unwritable")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_disk(cli, tmp_path, model):
    """A 32 KiB tmpfs cannot hold the folded model: the write fails cleanly (root only: it mounts)."""
    if not can_mount():
        pytest.skip("needs root to mount a small tmpfs; the simulated full disk above covers the logic")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(tiny)]).returncode:
        pytest.skip("mount refused")
    try:
        result = cli("fold", model, "-o", tiny / "out.onnx")
        assert_one_line_error(result, "No space left on device")
        assert list(tiny.iterdir()) == []
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


# ---- real processes: kill -9, Ctrl-C and two runs racing for one output --------------------------------

SLOW_WRITER = '''
import signal, sys, time
from pathlib import Path
import bnfold.onnx.model

# A runner that ignores SIGINT passes that on to the processes it starts; Ctrl-C must reach this one.
Path(sys.argv[1]).with_suffix(".sigint").write_text(str(signal.getsignal(signal.SIGINT)))
signal.signal(signal.SIGINT, signal.default_int_handler)

original = bnfold.onnx.model.OnnxModel.save
started, pause = Path(sys.argv[1]), float(sys.argv[2])


def slow_save(self, path):
    """The real file, written in four slow chunks."""
    original(self, path)
    data = Path(path).read_bytes()
    step = len(data) // 4 + 1
    with open(path, "wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start:start + step])
            handle.flush()
            started.touch()
            time.sleep(pause)


bnfold.onnx.model.OnnxModel.save = slow_save
from bnfold.cli import main
main(sys.argv[3:])
'''


def slow_run(tmp_path: Path, name: str, pause: float, *args) -> tuple[subprocess.Popen, Path]:
    runner = tmp_path / "slow_writer.py"
    runner.write_text(SLOW_WRITER)
    started = tmp_path / f"{name}.started"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160", "NO_COLOR": "1"}
    process = subprocess.Popen([sys.executable, str(runner), str(started), str(pause), *map(str, args)], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, started


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.02)


@pytest.mark.parametrize("existing", [False, True])
def test_kill_9_mid_write_never_publishes_a_partial_file(tmp_path, model, existing):
    out = tmp_path / "out.onnx"
    if existing:
        out.write_bytes(OLD)
    before = digest(model)
    process, started = slow_run(tmp_path, "killed", 30, "fold", model, "-o", out, "--force")
    wait_for(started, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert (out.read_bytes() == OLD) if existing else not out.exists()
    assert digest(model) == before
    # What a kill -9 can leave: one hidden staging directory, never a file under the output's name.
    assert all(name.startswith(".out.onnx.") and name.endswith(".tmp") for name in leftovers(tmp_path))


def test_ctrl_c_mid_write_cleans_up_and_exits_130(tmp_path, model):
    out = tmp_path / "out.onnx"
    process, started = slow_run(tmp_path, "interrupted", 30, "fold", model, "-o", out)
    wait_for(started, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [True, False])
def test_two_runs_writing_one_output_never_mix(tmp_path, force):
    """Two slow writers overlap in time; the output is always one complete model. Without --force the
    later one fails cleanly even though both found the path free when they started."""
    out = tmp_path / "out.onnx"
    runs = [slow_run(tmp_path, name, 0.3, "fold", SAMPLES / f"{name}.onnx", "-o", out, *(["--force"] * force))
            for name in ("cnn", "mlp")]
    results = [(process.wait(timeout=300), process.communicate()[1]) for process, _ in runs]
    assert all(started.exists() for _, started in runs)  # both really wrote
    codes = sorted(code for code, _ in results)
    if force:
        assert codes == [0, 0]
    else:
        assert codes == [0, 2], results
        assert any("appeared while bnfold was working" in err or "already exists" in err for _, err in results)
    written = onnx.load(out)
    onnx.checker.check_model(written)
    layers = {init.name.split(".")[0] for init in written.graph.initializer}
    assert ("conv1" in layers) != ("fc1" in layers)  # the CNN's or the MLP's weights, not some of each
    assert leftovers(tmp_path) == []
