"""The README is the manual: every command and option is in it, its quoted output is what bnfold prints,
and the commands and the Python example in it run as pasted (on the sample models)."""

from __future__ import annotations

import re
import shlex

import pytest
import typer

from bnfold.cli import DATA_OPTIONS, app
from tests.conftest import REPO, SAMPLES

README = (REPO / "README.md").read_text(encoding="utf-8")
COMMANDS = typer.main.get_command(app)
DATA_NAMES = {option.name for option in DATA_OPTIONS}  # described once, in the recalibrate section


def section(command: str) -> str:
    """The README text of `### \\`bnfold COMMAND ...\\``, up to the next command's heading or chapter."""
    match = re.search(rf"^### `bnfold {command}\b.*?(?=^### `bnfold |^## )", README, re.M | re.S)
    assert match, f"the README has no section for bnfold {command}"
    return match.group(0)


def flags(parameter) -> list[str]:
    return [flag for flag in (*parameter.opts, *parameter.secondary_opts) if flag.startswith("-")]


def mentioned(flag: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.mark.parametrize("command", sorted(COMMANDS.commands))
def test_every_option_of_every_command_is_documented_in_its_section(command):
    own, shared = section(command), section("recalibrate")
    missing = [flag for parameter in COMMANDS.commands[command].params for flag in flags(parameter)
               if flag != "--help" and not mentioned(flag, own)
               and not (parameter.name in DATA_NAMES and mentioned(flag, shared))]
    assert missing == [], f"bnfold {command}: options missing from the README: {missing}"


def test_global_options_are_documented():
    assert [flag for parameter in COMMANDS.params for flag in flags(parameter)
            if flag != "--help" and not mentioned(flag, README)] == []


def console_blocks() -> list[tuple[str, list[str]]]:
    """(command line, output lines) for every `$ bnfold ...` in a ```console block."""
    runs = []
    for block in re.findall(r"^```console\n(.*?)^```", README, re.M | re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *output = chunk.rstrip("\n").split("\n")
            runs.append((command, output))
    return runs


VARYING = re.compile(r"\d+(\.\d+)?(e[-+]\d+)?")  # errors of random-input verification differ between CPUs


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh directory holding the sample models, and the README's placeholder names for real files."""
    (tmp_path / "sample_models").symlink_to(SAMPLES)
    for name, target in {"model.onnx": "mlp.onnx", "model.pt2": "mlp.pt2", "calib.npy": "calib.npy"}.items():
        (tmp_path / name).symlink_to(SAMPLES / target)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "120")
    return tmp_path


@pytest.mark.parametrize("command, expected", [run for run in console_blocks() if " bench " not in f" {run[0]} "],
                         ids=lambda value: value if isinstance(value, str) else "")
def test_quoted_output_is_what_the_cli_prints(workdir, cli, command, expected):
    program, *args = shlex.split(command)
    assert program == "bnfold"
    result = cli(*args)
    assert result.code == 0, result.stderr
    printed = [line.rstrip() for line in result.stdout.rstrip("\n").split("\n")]
    assert len(printed) == len(expected), "\n".join(printed)
    for ours, quoted in zip(printed, expected):
        if ours.startswith("verified on random inputs"):
            ours, quoted = VARYING.sub("#", ours), VARYING.sub("#", quoted)
        assert ours == quoted.rstrip()


def test_quoted_bench_output_has_the_printed_shape(workdir, cli):
    (command, expected), = [run for run in console_blocks() if run[0].startswith("bnfold bench ")]
    result = cli(*shlex.split(command)[1:])
    assert result.code == 0, result.stderr
    printed = result.stdout.splitlines()
    assert printed[0] == expected[0]
    labels = [line.split("│")[1].strip() for line in expected if line.startswith("│")]
    assert labels == [line.split("│")[1].strip() for line in printed if line.startswith("│")]
    assert printed[-1].startswith("outputs agree: max abs error")


def shell_commands() -> list[str]:
    """Every `bnfold ...` line of the README's sh and yaml blocks, without redirections."""
    lines = []
    for block in re.findall(r"^```(?:sh|yaml)\n(.*?)^```", README, re.M | re.S):
        for line in block.splitlines():
            if line.strip().startswith("bnfold "):
                words = shlex.split(line, comments=True)
                lines.append(" ".join(words[:words.index(">")] if ">" in words else words))
    return lines


def test_the_readme_has_runnable_shell_commands():
    assert len(shell_commands()) >= 3  # the report example and both CI recipes


@pytest.mark.parametrize("command", shell_commands())
def test_shell_commands_run_as_pasted(workdir, cli, command):
    """Each runs to a verdict (0 passed, 1 a check failed), never to a usage or input error."""
    result = cli(*shlex.split(command)[1:])
    assert result.code in (0, 1), result.stderr
    written = [word for word in shlex.split(command) if word.endswith((".html", ".xml"))]
    assert all((workdir / name).stat().st_size > 0 for name in written)


def test_python_api_example_runs(workdir, capsys):
    (code,) = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert type(namespace["report"]).__name__ == "InspectReport"
    assert type(namespace["fixed"]).__name__ == "RecalibrateReport" and namespace["fixed"].passed
    assert type(namespace["gate"]).__name__ == "CheckReport"
    assert (workdir / "model_folded.pt2").is_file() and (workdir / "model_recal.pt2").is_file()
    assert '"kind": "fold"' in capsys.readouterr().out
