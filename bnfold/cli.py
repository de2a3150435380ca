"""The `bnfold` command: a thin Typer layer over the library.

Each command parses options, calls one library function, renders the report and turns it into an exit
code (`exit_code_for`). Errors are mapped in `main`: a `BnfoldError` prints one line and a hint on stderr;
anything else is a bug and keeps its traceback. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from enum import Enum
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from bnfold import __version__, memory
from bnfold.data import IMAGENET_MEAN, IMAGENET_STD, DataOptions, ImageOptions, parse_channel_values
from bnfold.errors import BnfoldError, ExitCode, UsageError
from bnfold.reports.base import Report

app = typer.Typer(
    name="bnfold",
    help="Audit, recalibrate and fold BatchNorm in trained PyTorch and ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DEBUG_ENV = "BNFOLD_DEBUG"


class FailOn(str, Enum):
    error = "error"
    warning = "warning"
    never = "never"


ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="Model file: .onnx, .pt2, TorchScript, torch.save pickle, "
                                               "state_dict (.pt/.pth) or .safetensors.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")]
AllowPickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle", help="Allow unpickling a full torch.save(model) file. This runs code from the file: "
                           "use only for files you trust.")]
ReportOpt = Annotated[Optional[Path], typer.Option(
    "--report", metavar="PATH", help="Also write a self-contained HTML report: per-layer statistics, drift, fold "
                                     "status and findings (one file, opens without a server).")]
ReportForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --report file.")]
OutputForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]
FactoryOpt = Annotated[Optional[str], typer.Option(
    "--model-factory", metavar="MODULE:CALLABLE",
    help="For state_dict/safetensors files: a callable that builds the model, e.g. mypkg.models:resnet18.")]
InputShapeOpt = Annotated[Optional[str], typer.Option(
    "--input-shape", metavar="SHAPE", help="Input shape when the file records none (eager modules, TorchScript), "
                                           "e.g. 1,3,224,224 (';' between inputs): folds that depend on shapes "
                                           "are then proven rather than refused.")]
StrictInputsOpt = Annotated[bool, typer.Option(
    "--strict-inputs", help="ONNX: keep BN whose parameters are also graph inputs (onnxruntime's rule); "
                            "no effect on PyTorch models.")]


# Piped output (CI logs, files) has no terminal to size it: Rich would assume 80 columns and break layer
# names across lines. COLUMNS, when set, still decides.
PIPED_WIDTH = 120


def stdout_console() -> Console:
    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(soft_wrap=False, width=PIPED_WIDTH if piped else None)


def stderr_console() -> Console:
    return Console(stderr=True)


def emit(report: Report, as_json: bool) -> None:
    """Data to stdout: JSON for machines, a Rich rendering for people."""
    if as_json:
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    else:
        stdout_console().print(report)


def exit_code_for(report: Report) -> ExitCode:
    """The one place a report becomes an exit code."""
    return ExitCode.OK if report.passed else ExitCode.CHECK_FAILED


def data_source(data: Path | None, data_fn: str | None) -> object | None:
    """What --data or --data-fn names (None when neither); both at once is a usage error."""
    if data is not None and data_fn is not None:
        raise UsageError("pass exactly one of --data PATH and --data-fn MODULE:CALLABLE, not both")
    if data_fn is None:
        return data
    from bnfold.plugins import import_callable

    return import_callable(data_fn, "--data-fn")


def _option(name: str, default: Any, kind: Any, *flags: str, **info: Any) -> Parameter:
    return Parameter(name, Parameter.POSITIONAL_OR_KEYWORD, default=default,
                     annotation=Annotated[kind, typer.Option(*flags, **info)])


# The data layer's options (bnfold.data), declared once here for every command that reads data.
DATA_OPTIONS = (
    _option("data", None, Optional[Path], "--data", metavar="PATH",
            help=".npy (inputs of a one-input model), .npz (arrays named after the inputs) or a directory of "
                 "images."),
    _option("data_fn", None, Optional[str], "--data-fn", metavar="MODULE:CALLABLE",
            help="A function returning an iterable of batches (tensors, tuples or dicts), called once per pass; "
                 "under torchrun it gets rank= and world_size= keyword arguments and returns that rank's share."),
    _option("batch_size", 32, int, "--batch-size", help="Samples per forward pass."),
    _option("max_samples", None, Optional[int], "--max-samples", help="Use at most this many samples."),
    _option("seed", None, Optional[int], "--seed",
            help="Shuffle the samples with this seed before --max-samples (default: file order)."),
    _option("resize", None, Optional[int], "--resize", help="Images: resize the shorter side to this."),
    _option("crop", None, Optional[int], "--crop", help="Images: centre-crop to this square size."),
    _option("mean", ",".join(map(str, IMAGENET_MEAN)), str, "--mean", metavar="M,M,M",
            help="Images: per-channel mean, after scaling to [0, 1]."),
    _option("std", ",".join(map(str, IMAGENET_STD)), str, "--std", metavar="S,S,S",
            help="Images: per-channel standard deviation, after scaling to [0, 1]."),
)


def reads_data(*, sampling: bool = True) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the data options right after MODEL (`sampling=False`: without --max-samples and
    --seed); it receives them as keyword-only `data` (what --data or --data-fn names, or None) and
    `data_options`. Typer reads the command's `__signature__`, so the options are declared only here."""
    options = [option for option in DATA_OPTIONS if sampling or option.name not in ("max_samples", "seed")]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        model, *rest = (parameter for parameter in signature(command, eval_str=True).parameters.values()
                        if parameter.name not in ("data", "data_options"))

        @functools.wraps(command)
        def run(**arguments: Any) -> None:
            given = {option.name: arguments.pop(option.name) for option in options}
            source = data_source(given.pop("data"), given.pop("data_fn"))
            images = ImageOptions(resize=given.pop("resize"), crop=given.pop("crop"),
                                  mean=parse_channel_values(given.pop("mean"), "--mean"),
                                  std=parse_channel_values(given.pop("std"), "--std"))
            command(**arguments, data=source, data_options=DataOptions(**given, images=images))

        run.__signature__ = Signature([model, *options, *rest])  # type: ignore[attr-defined]
        return run

    return decorate


def check_report_path(path: Path | None, force: bool) -> None:
    """Refuse an unwritable --report (or --junit-xml) path before the analysis runs, not after."""
    if path is not None:
        from bnfold.output import check_output_path

        check_output_path(path, None, force=force)


def write_report(report: Report, path: Path | None, force: bool) -> None:
    """The --report HTML file, written whether or not the report passed (CI uploads it either way)."""
    if path is not None:
        from bnfold.reports.html import write_html

        size = write_html(report, path, force=force)
        stderr_console().print(f"HTML report written to {path} ({size:,} bytes)", highlight=False, soft_wrap=True)


def finish(report: Report, as_json: bool) -> None:
    emit(report, as_json)
    raise typer.Exit(int(exit_code_for(report)))


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help=f"Show tracebacks for every error (or set {DEBUG_ENV}=1).")] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"
    if version:
        typer.echo(f"bnfold {__version__}")
        raise typer.Exit(0)


@app.command()
@reads_data()
def inspect(
    model: ModelArg,
    as_json: JsonOpt = False,
    fail_on: Annotated[FailOn, typer.Option(
        "--fail-on", help="Exit 1 when a finding of this severity (or worse) is present.")] = FailOn.error,
    report_path: ReportOpt = None,
    force: ReportForceOpt = False,
    input_shape: InputShapeOpt = None,
    strict_inputs: StrictInputsOpt = False,
    allow_pickle: AllowPickleOpt = False,
    model_factory: FactoryOpt = None,
    *,
    data: object | None,
    data_options: DataOptions,
) -> None:
    """List every BN layer with its statistics, health findings and whether it can be folded.

    With --data, also how far each layer's statistics have drifted from the data (worst first)."""
    from bnfold.inspection import inspect as run_inspect

    check_report_path(report_path, force)
    report = run_inspect(model, data, fail_on=fail_on.value, allow_pickle=allow_pickle,
                         model_factory=model_factory, data_options=data_options, input_shape=input_shape,
                         strict_inputs=strict_inputs)
    write_report(report, report_path, force)
    finish(report, as_json)


@app.command()
@reads_data(sampling=False)
def fold(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", metavar="PATH",
        help="Where to write the folded model (the input's format; a state_dict or safetensors model becomes "
             "a .pt2 program). Without it, bnfold folds and verifies but writes nothing.")] = None,
    tolerance: Annotated[Optional[float], typer.Option(
        help="Maximum relative output error max|a-b|/max|a| (default 1e-4 for float32, 1e-2 for float16).")] = None,
    input_shape: InputShapeOpt = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Write without comparing outputs (not recommended).")] = False,
    strict_inputs: StrictInputsOpt = False,
    force: OutputForceOpt = False,
    in_place: Annotated[bool, typer.Option("--in-place", help="Allow the output to be the input file.")] = False,
    as_json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    model_factory: FactoryOpt = None,
    *,
    data: object | None,
    data_options: DataOptions,
) -> None:
    """Fold BN into neighbouring Conv/ConvTranspose/Linear/Gemm/MatMul weights, verify, and write.

    Verified on random inputs, or with --data on the first batches of the data."""
    from bnfold.folding import fold as run_fold

    report = run_fold(model, output, tolerance=tolerance, input_shape=input_shape, data=data,
                      data_options=data_options, verify=not no_verify, strict_inputs=strict_inputs, force=force,
                      in_place=in_place, allow_pickle=allow_pickle, model_factory=model_factory)
    finish(report, as_json)


class RecalibrationMethod(str, Enum):
    exact = "exact"
    fast = "fast"


@app.command()
@reads_data()
def recalibrate(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", metavar="PATH",
        help="Where to write the recalibrated model (same format as the input).")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Overwrite the input model file.")] = False,
    force: OutputForceOpt = False,
    method: Annotated[RecalibrationMethod, typer.Option(
        "--method", help="exact: each BN gets the statistics it sees at inference once the layers before it "
                         "are recalibrated (one pass per dependency level); fast: one pass with only the BN "
                         "layers normalizing by batch statistics.")] = RecalibrationMethod.exact,
    device: Annotated[str, typer.Option("--device", help="cpu, or cuda when a GPU is present.")] = "cpu",
    as_json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    model_factory: FactoryOpt = None,
    *,
    data: object | None,
    data_options: DataOptions,
) -> None:
    """Re-estimate every BN layer's running mean and variance on your data, exactly, and write the model.

    Under torchrun (torchrun --nproc-per-node N -m bnfold recalibrate ...) every process reads its share
    of the data, their statistics are merged exactly, and rank 0 writes the model and prints the report.
    """
    from bnfold.recalibration import recalibrate as run_recalibrate

    if data is None:
        raise UsageError("pass exactly one of --data PATH and --data-fn MODULE:CALLABLE")
    if output is None and not in_place:
        raise UsageError("say where to write the result: -o PATH, or --in-place to overwrite the input")
    report = run_recalibrate(
        model, data, method=method.value, output=output, force=force, in_place=in_place,
        batch_size=data_options.batch_size, max_samples=data_options.max_samples, seed=data_options.seed,
        images=data_options.images, device=device, allow_pickle=allow_pickle, model_factory=model_factory,
        progress=True)
    from bnfold.distributed import world

    if not world().root:  # under torchrun every rank has the same statistics; rank 0 alone prints them
        raise typer.Exit(int(exit_code_for(report)))
    finish(report, as_json)


def _limit_option(key: str, help_text: str):
    from bnfold.policy import LIMIT_KEYS, Policy

    built_in = getattr(Policy().limits, LIMIT_KEYS[key])
    return Annotated[Optional[float], typer.Option(f"--{key}", metavar="X", show_default=False,
                                                   help=f"{help_text} (config file, else {built_in:g}).")]


@app.command()
@reads_data()
def check(
    model: ModelArg,
    config: Annotated[Optional[Path], typer.Option(
        "--config", metavar="PATH",
        help="bnfold.toml, or pyproject.toml with [tool.bnfold] (default: the nearest one).")] = None,
    max_layer_kl: _limit_option("max-layer-kl", "Fail when a BN layer's channel-mean KL(data || running) exceeds X") = None,
    max_mean_shift: _limit_option("max-mean-shift", "Fail when a BN layer's channel-mean mean shift exceeds X") = None,
    max_output_kl: _limit_option("max-output-kl", "Fail when the softmax KL, running vs data statistics, exceeds X") = None,
    max_output_l2: _limit_option("max-output-l2", "Fail when the relative L2 output distance, running vs data "
                                                  "statistics, exceeds X") = None,
    require_folded: Annotated[Optional[bool], typer.Option(
        "--require-folded/--no-require-folded", show_default=False,
        help="Fail while a BN that could be folded exactly remains.")] = None,
    fail_on: Annotated[Optional[FailOn], typer.Option(
        "--fail-on", show_default=False, help="Static findings that fail the check (default: error).")] = None,
    junit_xml: Annotated[Optional[Path], typer.Option(
        "--junit-xml", metavar="PATH", help="Also write JUnit XML: one test case per policy and per BN layer. An "
                                            "existing file is replaced without --force (CI rewrites it every run).")] = None,
    report_path: ReportOpt = None,
    force: ReportForceOpt = False,
    input_shape: InputShapeOpt = None,
    strict_inputs: StrictInputsOpt = False,
    as_json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    model_factory: FactoryOpt = None,
    *,
    data: object | None,
    data_options: DataOptions,
) -> None:
    """Gate a model in CI: exit 1 when a policy fails (static findings, folding, statistics drift on --data)."""
    from bnfold.gate import check as run_check
    from bnfold.gate import publish_github, write_junit
    from bnfold.policy import load_policy

    flags = {"max-layer-kl": max_layer_kl, "max-mean-shift": max_mean_shift, "max-output-kl": max_output_kl,
             "max-output-l2": max_output_l2, "require-folded": require_folded,
             "fail-on": fail_on.value if fail_on else None}
    check_report_path(report_path, force)
    check_report_path(junit_xml, force=True)  # replaced every run, as write_junit does
    report = run_check(model, data, policy=load_policy(config, flags=flags),
                       data_options=data_options, allow_pickle=allow_pickle, model_factory=model_factory,
                       input_shape=input_shape, strict_inputs=strict_inputs)
    if junit_xml is not None:
        write_junit(report, junit_xml)
    write_report(report, report_path, force)
    publish_github(report, sys.stderr if as_json else sys.stdout)  # stdout must stay pure JSON
    finish(report, as_json)


@app.command()
def bench(
    model: ModelArg,
    folded: Annotated[Optional[Path], typer.Option(
        "--folded", metavar="OUT", help="The folded model to compare (bnfold fold MODEL -o OUT). "
                                        "Without it, bnfold folds MODEL in memory first.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", show_default=False, help="Samples per forward (default: 1, or --input-shape's).")] = None,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs of each model, interleaved.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs of each model first.")] = 3,
    input_shape: InputShapeOpt = None,
    as_json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    model_factory: FactoryOpt = None,
) -> None:
    """Time the model before and after folding (PyTorch eager, or onnxruntime with and without optimizations)."""
    from bnfold.benchmark import bench as run_bench

    report = run_bench(model, folded, batch_size=batch_size, runs=runs, warmup=warmup, input_shape=input_shape,
                       allow_pickle=allow_pickle, model_factory=model_factory)
    finish(report, as_json)


def _debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes") or "--debug" in sys.argv[1:]


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map every outcome to a documented exit code."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.exceptions import Abort, Exit

    # torch.export's own deserializer trips this deprecation on every .pt2; it is noise to users.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # bnfold finds NaN/Inf itself and names the layer; numpy's floating-point warnings about them are noise.
    warnings.filterwarnings("ignore", message=r"(invalid value|overflow|divide by zero) encountered",
                            category=RuntimeWarning)
    memory.map_large_blocks()  # freed weights go back to the OS at once (bnfold.memory)
    err = stderr_console()
    try:
        # Without standalone mode, click returns the code of a typer.Exit instead of raising it.
        code = app(args=argv, standalone_mode=False, prog_name="bnfold")
    except BnfoldError as error:
        if _debug_enabled():
            traceback.print_exc()
        if not error.reported_by_root:  # under torchrun, an error every rank shares is printed once
            err.print(Text.assemble(("error: ", "bold red"), error.message), highlight=False, soft_wrap=True)
            if error.hint:
                err.print(Text(f"hint: {error.hint}", style="dim"), highlight=False, soft_wrap=True)
        sys.exit(int(error.exit_code))
    except Exit as done:
        sys.exit(done.exit_code)
    except Abort:
        err.print("interrupted")
        sys.exit(int(ExitCode.INTERRUPTED))
    except NoArgsIsHelpError as error:
        error.show()
        sys.exit(int(ExitCode.OK))
    except ClickException as error:
        error.show()
        sys.exit(int(ExitCode.USAGE))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception:
        traceback.print_exc()
        err.print(Text.assemble(("internal error", "bold red"), f" (exit {int(ExitCode.INTERNAL)}): this is a "
                                "bug in bnfold; please report it with the traceback above"))
        sys.exit(int(ExitCode.INTERNAL))
    sys.exit(code if isinstance(code, int) else 0)
