"""PyTorch model adapters: ExportedProgram (.pt2), TorchScript, pickled module, state_dict + factory."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import (BnfoldError, InputError, MissingDependencyError, UnsafePickleError, UsageError,
                           first_line)
from bnfold.formats import FileKind
from bnfold.layers import BNLayer
from bnfold.model import InputSpec, LoadOptions, Model, ModelFormat
from bnfold.pickle_scan import (ArchiveScan, archive_pickle_imports, foreign_imports, scan_exported_program,
                                scan_torchscript, storage_records)
from bnfold.plugins import import_callable, search_working_directory
from bnfold.pytorch.capture import holding
from bnfold.pytorch.discover import constant_values, discover_exported, discover_module

# Keys under which training checkpoints commonly nest the weights.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


class ExportedProgramModel(Model):
    """A torch.export ExportedProgram loaded from a .pt2 archive."""

    format = ModelFormat.EXPORTED_PROGRAM

    def __init__(self, path: Path, program: torch.export.ExportedProgram) -> None:
        super().__init__(path)
        self.program = program

    def bn_layers(self) -> list[BNLayer]:
        return discover_exported(self.program)

    def input_specs(self) -> list[InputSpec]:
        specs = []
        user_inputs = set(self.program.graph_signature.user_inputs)
        for node in self.program.graph.nodes:
            if node.op == "placeholder" and node.name in user_inputs:
                value = node.meta.get("val")
                if isinstance(value, torch.Tensor):
                    shape = tuple(d if isinstance(d, int) else None for d in value.shape)
                    specs.append(InputSpec(node.name, shape, str(value.dtype).removeprefix("torch.")))
        return specs

    def parameter_count(self) -> int:
        return _numel({**self.program.state_dict, **self.program.constants})

    def save(self, path: Path) -> None:
        torch.export.save(self.program, str(path))


def program_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """`program.module()`, which shares the program's tensors; an InputError where torch cannot turn the
    program back into a module (a top-level module named `code` or `graph`, which a GraphModule reserves)."""
    try:
        return program.module()
    except Exception as error:  # torch raises RuntimeError and AttributeError alike here
        raise InputError(f"torch cannot run this program: it does not turn back into a module "
                         f"({first_line(error, 200)})") from None


class _ModuleBacked(Model):
    """A model held as a module (TorchScript or eager): its BN layers are submodules, and it records no
    inputs. A base of its own, not ModuleModel: the engines tell eager modules from TorchScript by type."""

    def __init__(self, path: Path, module: nn.Module) -> None:
        super().__init__(path)
        self.module = module

    def bn_layers(self) -> list[BNLayer]:
        return discover_module(self.module)

    def input_specs(self) -> list[InputSpec]:
        return []

    def parameter_count(self) -> int:
        return _numel(self.module.state_dict())


class TorchScriptModel(_ModuleBacked):
    """A TorchScript archive (torch.jit.save)."""

    format = ModelFormat.TORCHSCRIPT
    module: torch.jit.ScriptModule

    def parameter_count(self) -> int:
        # a frozen module (torch.jit.freeze) keeps its weights as constants of its graph, not in its state_dict
        return super().parameter_count() + constant_values(self.module)

    def save(self, path: Path) -> None:
        torch.jit.save(self.module, str(path))


class ModuleModel(_ModuleBacked):
    """An eager nn.Module: unpickled (with consent) or built by a factory and given a state_dict.

    `owned`: bnfold loaded it from a file, so its captures may share its tensors (see `private_copy`);
    a caller's module is never shared with what bnfold builds or hands back. `key_prefix`: what the
    state_dict's keys had before the module's own names (`module.` from nn.DataParallel); saved weights
    get it back, so they load where the input did. `nesting`: the keys under which a training checkpoint
    in the file at `path` holds the state_dict (`("state_dict",)`); saved weights go back there, beside
    the checkpoint's other entries (epoch, optimizer state).
    """

    def __init__(self, path: Path, module: nn.Module, fmt: ModelFormat, safetensors: bool = False,
                 owned: bool = False, key_prefix: str = "", nesting: tuple[str, ...] = ()) -> None:
        super().__init__(path, module)
        self.format = fmt
        self.safetensors = safetensors
        self.owned = owned
        self.key_prefix = key_prefix
        self.nesting = nesting

    def bn_layers(self) -> list[BNLayer]:
        inner, path = inner_model(self.module)
        layers = discover_module(inner, self.owned)
        return [dataclasses.replace(layer, name=_path_in(inner, path, layer.name)) for layer in layers] if path \
            else layers

    def save(self, path: Path) -> None:
        if self.format is ModelFormat.PICKLE:
            torch.save(self.module, str(path))
            return
        weights = {self.key_prefix + key: tensor for key, tensor in self.module.state_dict().items()}
        if self.safetensors:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
        else:
            torch.save(self._checkpoint_holding(weights), str(path))

    def _checkpoint_holding(self, weights: dict[str, torch.Tensor]) -> Any:
        """`weights`, in the checkpoint the input file held them in: read again from the file, which is
        cheaper than holding its optimizer state in memory while bnfold works."""
        if not self.nesting:
            return weights
        checkpoint = _torch_load(self.path, weights_only=True)
        holder = checkpoint
        for key in self.nesting[:-1]:
            holder = holder[key]
        holder[self.nesting[-1]] = weights
        return checkpoint


def _numel(tensors: Mapping[str, Any]) -> int:
    return sum(t.numel() for t in tensors.values() if isinstance(t, torch.Tensor))


def load_torch_model(path: Path, kind: str, options: LoadOptions) -> Model:
    """Load a torch file of a sniffed kind, never unpickling code without `allow_pickle`."""
    if kind == FileKind.EXPORTED_PROGRAM:
        with _damaged_zip(path):
            scan = scan_exported_program(path)
        _require_no_code(path, scan, options)
        with _torch_export_log() as failures:
            return ExportedProgramModel(path, _guarded(lambda: torch.export.load(str(path)), path, "torch.export",
                                                       failures))
    if kind == FileKind.TORCHSCRIPT:
        with _damaged_zip(path):
            scan = scan_torchscript(path)
            _check_records(path)
        _require_no_code(path, scan, options)
        return TorchScriptModel(path, _guarded(lambda: torch.jit.load(str(path), map_location="cpu"),
                                               path, "TorchScript"))
    if kind == FileKind.SAFETENSORS:
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MissingDependencyError("reading safetensors needs the safetensors package",
                                         "pip install 'bnfold[safetensors]'") from None
        weights = _guarded(lambda: load_file(str(path)), path, "safetensors")
        return _from_state_dict(path, weights, options, safetensors=True)
    return _load_torch_pickle(path, options)


def _load_torch_pickle(path: Path, options: LoadOptions) -> Model:
    try:
        loaded = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        loaded = None  # needs code: a pickled module (or other objects)
    except Exception as error:  # a damaged file makes torch raise almost any type (TypeError, KeyError...)
        raise InputError(f"{path} is not a readable torch file ({first_line(error)})") from None
    if loaded is not None:
        return _from_state_dict(path, loaded, options)
    _require_consent(path, "is a pickled module; loading it runs code from", archive_pickle_imports(path), options)
    search_working_directory()  # its classes import as they would under `python -m bnfold`
    module = _guarded(lambda: _torch_load(path, weights_only=False), path, "pickled", import_hint=(
        "the classes it names must be importable: run bnfold where their package is, or install it"))
    if isinstance(module, Mapping):
        module = next((v for v in module.values() if isinstance(v, nn.Module)), module)
    if not isinstance(module, nn.Module):
        raise InputError(f"{path} holds a {type(module).__name__}, not an nn.Module")
    return ModuleModel(path, module.eval(), ModelFormat.PICKLE, owned=True)


_SAFER = "save a state_dict or .pt2 instead"


def _torch_load(path: Path, weights_only: bool) -> Any:
    """torch.load by content: given a path, torch would pick its loader by the file's extension."""
    with open(path, "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=weights_only)


def _require_consent(path: Path, what: str, imports: list[str], options: LoadOptions, safer: str = _SAFER) -> None:
    """Refuse to run code from a file without --allow-pickle, and always under TORCH_FORCE_WEIGHTS_ONLY_LOAD."""
    shown = foreign_imports(imports) or imports  # the user's classes first; torch's own when that is all
    if not options.allow_pickle:
        listed = ", ".join(shown[:8]) + (f" (+{len(shown) - 8} more)" if len(shown) > 8 else "")
        raise UnsafePickleError(f"{path} {what}: {listed or 'unknown globals'}",
                                f"pass --allow-pickle only if you trust this file, or {safer}", shown)
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "").lower() in ("1", "true", "yes", "on"):
        raise UnsafePickleError(f"{path} {what.partition(';')[0]} and TORCH_FORCE_WEIGHTS_ONLY_LOAD is set",
                                f"unset it to allow --allow-pickle, or {safer}", shown)


def _require_no_code(path: Path, scan: ArchiveScan, options: LoadOptions) -> None:
    """Refuse an archive whose loading or running would execute more than tensor arithmetic."""
    runs = dict(scan.code)
    for member, data in scan.pickles.items():
        if not _loads_weights_only(data):
            runs[member] = archive_pickle_imports(data)
    if runs:
        members = ", ".join(sorted(runs))
        imports = sorted({name for names in runs.values() for name in names})
        what = (f"embeds code ({members}); loading or running it executes" if any(n[0] != "<" for n in imports)
                else f"has damaged members that cannot be proven harmless ({members}); loading them may execute")
        _require_consent(path, what, imports, options, "re-export the model with code you trust")


@contextmanager
def _damaged_zip(path: Path) -> Iterator[None]:
    """Reading members of a damaged zip raises many types (CRC, header, compression); all mean damaged."""
    try:
        yield
    except BnfoldError:
        raise
    except Exception as error:
        raise InputError(f"{path} is a damaged zip archive ({first_line(error)})") from None


def _check_records(path: Path) -> None:
    """Every tensor of a TorchScript archive has the bytes it claims: torch.jit.load does not check, and
    reading past a short record crashes the process or returns other memory."""
    with zipfile.ZipFile(path) as archive:
        sizes = {info.filename.split("/", 1)[-1]: info.file_size for info in archive.infolist()}
        for name in archive.namelist():
            folder = {"data.pkl": "data/", "constants.pkl": "constants/"}.get(name.split("/", 1)[-1])
            if folder is None:
                continue
            try:
                records = storage_records(archive.read(name))
            except ValueError as error:
                raise InputError(f"{path}: {name.split('/', 1)[-1]} is damaged ({error})") from None
            for storage, key, count in records:
                itemsize, stored = _storage_itemsize(storage), sizes.get(folder + key)
                if itemsize is None or stored is None or stored < count * itemsize:
                    raise InputError(f"{path}: tensor data {folder}{key} holds {stored} bytes, but the model "
                                     f"claims {count} elements of {storage}; the file is damaged")


def _storage_itemsize(name: str) -> int | None:
    with warnings.catch_warnings():  # typed storage classes are deprecated; their names in files are not
        warnings.simplefilter("ignore")
        dtype = getattr(getattr(torch, name.removeprefix("torch."), None), "dtype", None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None


def _loads_weights_only(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise on the way to a refusal
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # any failure: torch.export.load would retry without weights_only
        return False
    return True


@contextmanager
def _torch_export_log() -> Iterator[list[BaseException]]:
    """Keep torch.export's logged load failures (with tracebacks) off stderr; collect their exceptions."""
    failures: list[BaseException] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                failures.append(record.exc_info[1])

    names = [name for name in logging.root.manager.loggerDict if name.split(".")[:2] in (["torch", "export"],
                                                                                       ["torch", "_export"])]
    loggers = [logging.getLogger(name) for name in {"torch.export", *names}]  # torch gives some their own handlers
    saved = [(logger.propagate, logger.handlers[:]) for logger in loggers]
    for logger in loggers:
        logger.propagate, logger.handlers = False, [Collect()]
    try:
        yield failures
    finally:
        for logger, (propagate, handlers) in zip(loggers, saved):
            logger.propagate, logger.handlers = propagate, handlers


def _from_state_dict(path: Path, loaded: Any, options: LoadOptions, safetensors: bool = False) -> Model:
    found = _find_state_dict(loaded)
    if found is None:
        raise InputError(f"{path} holds no state_dict (a mapping of names to tensors)")
    state_dict, nesting = found
    if not options.model_factory:
        raise UsageError(f"{path} holds weights but no architecture",
                         "pass --model-factory package.module:callable that builds the model")
    factory = import_callable(options.model_factory, "--model-factory")
    module = factory()
    if not isinstance(module, nn.Module):
        raise UsageError(f"--model-factory {options.model_factory} returned {type(module).__name__}, "
                         "not an nn.Module")
    prefix = _saved_prefix(state_dict, module)
    state_dict = {key.removeprefix(prefix): tensor for key, tensor in state_dict.items()}
    _materialize_lazy(module, state_dict)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:  # its first line names only the class; the keys follow on the next lines
        keys = " ".join(line.strip() for line in str(error).splitlines())
        raise InputError(f"the weights in {path} do not fit the factory's model: {keys[:400]}") from None
    return ModuleModel(path, module.eval(), ModelFormat.STATE_DICT, safetensors=safetensors, owned=True,
                       key_prefix=prefix, nesting=nesting)


# nn.DataParallel and DistributedDataParallel hold the model as `module`, torch.compile's OptimizedModule as
# `_orig_mod`: the weights of a wrapped model are saved under these prefixes.
_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
_KEY_PREFIXES = ("module.", "_orig_mod.")
DISTRIBUTED_UNWRAPPED = ("the model came wrapped in DistributedDataParallel; the result is the bare model it held "
                         "(its `.module`), since wrapping it again is a call every process of its group must "
                         "make: wrap it on each rank")
COMPILED_UNWRAPPED = ("the model came compiled by torch.compile; the result is the model it compiled (its "
                      "`._orig_mod`), since compiling is done where the model runs: compile it there")


def _held_attribute(module: nn.Module) -> str | None:
    """The attribute under which a wrapper holds the model it runs, or None for any other module.
    torch.compile's wrapper is recognised by its class name and `_orig_mod`: importing torch._dynamo to
    name the class costs a second."""
    if isinstance(module, _WRAPPERS):
        return "module"
    if type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
        return "_orig_mod"
    return None


def inner_model(module: nn.Module) -> tuple[nn.Module, str]:
    """The model that wrappers ((Distributed)DataParallel, torch.compile's, one inside another) hold, and
    its path in the outermost wrapper; any other module itself, at ''. bnfold captures, folds and runs the
    held model in the wrapper's place: a wrapper's own forward (scatter over devices, buffers synchronized
    across processes, a compiled frame) computes nothing to fold, and neither torch.fx nor torch.export
    captures it. Layer names stay paths in the wrapper (`module.1`, `_orig_mod.1`), which is what a
    pickled wrapper is named by and what its state_dict keys start with."""
    path = []
    while (attribute := _held_attribute(module)) is not None:
        module = getattr(module, attribute)
        path.append(attribute)
    return module, ".".join(path)


def _path_in(model: nn.Module, path: str, name: str) -> str:
    """A layer name in the held `model` as a name in its wrapper. Layers on the held model's own tensors
    (itself a BN: '', a root F.batch_norm: `<root>` or its buffer's name) are the wrapper's child `module`,
    as fold names them."""
    own = name in ("", "<root>") or ("." not in name and name not in model._modules)
    return path if own else f"{path}.{name}"


def like_input(given: nn.Module, result: nn.Module) -> nn.Module:
    """`result`, made from `inner_model(given)`, as the kind of object the user gave: inside a copy of a
    DataParallel wrapper (its device ids and hooks), bare from DistributedDataParallel and torch.compile
    (`wrapper_notes`)."""
    attribute = _held_attribute(given)
    if attribute is None:
        return result
    held = like_input(getattr(given, attribute), result)
    return holding(given, held) if isinstance(given, nn.DataParallel) else held


def wrapper_notes(given: nn.Module) -> list[str]:
    """What the report says of a result that `like_input` hands back bare: wrapping a model in
    DistributedDataParallel is a collective call, and bnfold may run on one rank alone, where it would wait
    forever; a compiled model is compiled for the machine it runs on."""
    notes = []
    while (attribute := _held_attribute(given)) is not None:
        if isinstance(given, nn.parallel.DistributedDataParallel):
            notes.append(DISTRIBUTED_UNWRAPPED)
        elif attribute == "_orig_mod":
            notes.append(COMPILED_UNWRAPPED)
        given = getattr(given, attribute)
    return notes


def _saved_prefix(state_dict: Mapping[str, torch.Tensor], module: nn.Module) -> str:
    """What the weights' keys have before the keys of the model the factory builds, else '': wrappers'
    prefixes (`module.`, `_orig_mod.`, or both), or the attribute a training module held the model under
    (PyTorch Lightning's `model.`), where removing it leaves exactly the model's keys."""
    saved, own = _shared_prefix(list(state_dict)), _shared_prefix(list(module.state_dict()))
    if saved != own and saved.endswith(own):
        return saved.removesuffix(own)
    keys, wanted = list(state_dict), set(module.state_dict())
    parts = keys[0].split(".") if keys and set(keys) != wanted else []
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth]) + "."
        if not all(key.startswith(prefix) for key in keys):
            break
        if {key.removeprefix(prefix) for key in keys} == wanted:
            return prefix
    return ""


def _shared_prefix(keys: list[str]) -> str:
    """The wrapper prefixes every key starts with, outermost first."""
    prefix = ""
    while keys and (step := next((step for step in _KEY_PREFIXES
                                  if all(key.startswith(prefix + step) for key in keys)), None)):
        prefix += step
    return prefix


def _materialize_lazy(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give lazy modules (LazyBatchNorm, LazyConv) the shapes the weights carry, so loading works."""
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if isinstance(tensor, (UninitializedParameter, UninitializedBuffer)) and name in state_dict:
            tensor.materialize(state_dict[name].shape, dtype=state_dict[name].dtype)


def _find_state_dict(loaded: Any) -> tuple[Mapping[str, torch.Tensor], tuple[str, ...]] | None:
    """The state_dict a file holds, and the keys of the checkpoint entries it is nested in."""
    if isinstance(loaded, Mapping):
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return loaded, ()
        for key in _CHECKPOINT_KEYS:
            found = _find_state_dict(loaded.get(key))
            if found is not None:
                return found[0], (key, *found[1])
    return None


def _guarded(load, path: Path, what: str, causes: list[BaseException] = (), import_hint: str | None = None):
    """Run a framework loader, turning its many exception types into one clean InputError.

    `causes` are exceptions the loader logged before failing with a vaguer one; the first is the reason.
    `import_hint` is the hint when the reason is a module the file names that cannot be imported.
    """
    try:
        return load()
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # torch raises RuntimeError, ValueError, KeyError, zip errors...
        cause = causes[0] if causes else error
        reason = first_line(cause)
        hint = import_hint if isinstance(cause, ImportError) else None
        if "version" in reason.lower():
            hint = "it may come from another torch version: re-export it with torch " + torch.__version__
        raise InputError(f"{path} could not be loaded as a {what} model ({reason})", hint) from None



def wrap_torch_object(source: object) -> Model:
    """An in-memory torch object as a Model (library use: `bnfold.inspect(my_module)`)."""
    memory = Path("<memory>")
    if isinstance(source, torch.export.ExportedProgram):
        return ExportedProgramModel(memory, source)
    if isinstance(source, torch.jit.ScriptModule):
        return TorchScriptModel(memory, source)
    if isinstance(source, nn.Module):
        return ModuleModel(memory, source, ModelFormat.PICKLE)
    raise UsageError(f"cannot use a {type(source).__name__} as a model")
