"""Calibration data: one layer shared by `recalibrate`, `inspect --data` and `fold --data`.

`open_data` turns what the user has into a `DataSource`, a re-iterable stream of validated batches
(`Batch`: numpy arrays keyed by model input name):

- `.npy`: one array of inputs for a single-input model, memory-mapped (read one batch at a time);
- `.npz`: arrays named after the model's inputs (memory-mapped when stored uncompressed, as
  `np.savez` does; a compressed member is read whole);
- a directory of images (Pillow): resized, centre-cropped, scaled to [0, 1] and normalized;
- a callable returning an iterable of batches (tensors, tuples or dicts), for any pipeline; called
  once per pass, so it must yield the same data each time for `recalibrate --method exact`;
- in-memory arrays, mappings of arrays, or a list of batches.

Run as several processes (`DataOptions.world_size`, from torchrun), each process reads a disjoint
share: files, arrays and lists of batches are split into contiguous runs of whole batches (the batches
of one process, so batch composition does not change); a callable is called with `rank=` and
`world_size=` keyword arguments and must return that rank's share (one that takes neither is refused).

Every batch is checked against the model's inputs as far as they are known (names, rank, fixed
dimensions, dtype) and for NaN/Inf; problems raise `DataError` naming the input and the sample.
"""

from __future__ import annotations

import inspect
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.engine import Batch
from bnfold.errors import BnfoldError, DataError, MissingDependencyError, UsageError
from bnfold.model import InputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


@dataclass(frozen=True)
class ImageOptions:
    """How images become input tensors: resize the shorter side, centre-crop, normalize per channel.

    A 3-value mean/std (the ImageNet defaults) applied to a 1-channel model is averaged to one value.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@dataclass(frozen=True)
class DataOptions:
    """Batching and sampling. `seed` shuffles file and array data before `max_samples` takes its share;
    without it samples are used in order. A callable's pipeline keeps its own batches and order."""

    batch_size: int = 32
    max_samples: int | None = None
    seed: int | None = None
    images: ImageOptions = field(default_factory=ImageOptions)
    min_batch: int = 1  # a last batch smaller than this joins the one before it
    rank: int = 0  # this process's share of the data, when `world_size` processes split it
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"--max-samples must be at least 1, got {self.max_samples}")
        if not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} is not one of {self.world_size} processes")


class DataSource(ABC):
    """A re-iterable stream of validated batches; `num_samples` is None when only a pass can tell."""

    description: str
    num_samples: int | None = None
    num_batches: int | None = None
    notes: list[str]

    @abstractmethod
    def batches(self) -> Iterator[Batch]:
        """One pass over the data, batch by batch."""


def parse_channel_values(text: str, option: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406), for --mean and --std."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{option} needs at least one number")
    return values


def open_data(data: object, inputs: Sequence[InputSpec | str], options: DataOptions | None = None) -> DataSource:
    """A `DataSource` for `data`, checked against the model `inputs` (specs, or bare names when the
    format records nothing else)."""
    options = options or DataOptions()
    validator = _Validator(inputs)
    if isinstance(data, DataSource):
        return data
    if isinstance(data, (str, Path)):
        return _open_path(Path(data), validator, options)
    if isinstance(data, np.ndarray):
        return ArraySource({validator.single_name("an array"): data}, validator, options, "an array in memory")
    if isinstance(data, Mapping):
        return ArraySource(validator.match_arrays(dict(data), "the mapping"), validator, options, "arrays in memory")
    if callable(data):
        name = getattr(data, "__qualname__", type(data).__name__)
        return CallableSource(data, validator, options, f"batches from {name}()")
    if isinstance(data, Iterable):
        return CallableSource(_reusable(data), validator, options, f"{type(data).__name__} of batches")
    raise DataError(f"cannot use a {type(data).__name__} as data",
                    "pass a .npy/.npz file, an image directory, arrays, or a function returning batches")


def _open_path(path: Path, validator: _Validator, options: DataOptions) -> DataSource:
    if not path.exists():
        raise DataError(f"no such data file or directory: {path}")
    if path.is_dir():
        name = validator.single_name(f"the images in {path}")
        images = _ImageFolder(path, validator.image_channels(), options.images)
        return ArraySource({name: images}, validator, options, f"{path} ({len(images)} images)")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as error:  # numpy's header parser raises ValueError, SyntaxError, TokenError...
            raise DataError(f"{path} is not a readable .npy array ({error})") from None
        arrays = {validator.single_name(str(path)): array}
    elif suffix == ".npz":
        arrays = validator.match_arrays(_load_npz(path), str(path))
    else:
        raise DataError(f"{path}: data must be a .npy or .npz file or a directory of images",
                        "or pass --data-fn package.module:function returning batches")
    return ArraySource(arrays, validator, options, str(path))


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz, memory-mapped where stored uncompressed (np.savez), else read whole."""
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as handle:
            arrays = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[: -len(".npy")]
                mapped = _memmap_member(path, handle, info) if info.compress_type == zipfile.ZIP_STORED else None
                if mapped is None:
                    with archive.open(info) as member:
                        mapped = np.lib.format.read_array(member, allow_pickle=False)
                arrays[name] = mapped
    except Exception as error:  # zip and numpy header parsers raise many types on damaged files
        raise DataError(f"{path} is not a readable .npz archive ({error})") from None
    if not arrays:
        raise DataError(f"{path} holds no arrays")
    return arrays


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _memmap_member(path: Path, handle: Any, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A stored (uncompressed) member mapped in place; None for a header version it cannot map."""
    handle.seek(info.header_offset)
    local_header = handle.read(30)  # fixed part of a zip local file header
    name_length = int.from_bytes(local_header[26:28], "little")
    extra_length = int.from_bytes(local_header[28:30], "little")
    handle.seek(info.header_offset + 30 + name_length + extra_length)
    reader = _HEADER_READERS.get(np.lib.format.read_magic(handle))
    if reader is None:
        return None
    shape, fortran_order, dtype = reader(handle)
    if dtype.hasobject:
        raise DataError(f"{path}: array {info.filename} holds Python objects, not numbers")
    return np.memmap(path, dtype=dtype, mode="r", offset=handle.tell(), shape=shape,
                     order="F" if fortran_order else "C")


class _Validator:
    """Checks batches against the model's inputs, as far as the model format records them."""

    def __init__(self, inputs: Sequence[InputSpec | str]) -> None:
        self.names = [item if isinstance(item, str) else item.name for item in inputs]
        self.specs = {item.name: item for item in inputs if isinstance(item, InputSpec)}
        if not self.names:
            raise DataError("the model declares no inputs to feed data to")

    def single_name(self, what: str) -> str:
        if len(self.names) != 1:
            raise DataError(f"{what} can feed one input, but the model has {len(self.names)}: "
                            f"{', '.join(self.names)}", "use an .npz with one array per input name")
        return self.names[0]

    def image_channels(self) -> int:
        spec = self.specs.get(self.names[0])
        channels = spec.shape[1] if spec is not None and len(spec.shape) == 4 else None
        return channels if channels in (1, 3) else 3

    def fixed_batch(self) -> int | None:
        """The batch size the model was exported with, when its batch dimension is static."""
        sizes = {spec.shape[0] for spec in self.specs.values() if spec.shape and isinstance(spec.shape[0], int)}
        return sizes.pop() if len(sizes) == 1 else None

    def match_arrays(self, arrays: dict[str, Any], what: str) -> dict[str, Any]:
        """Pick the array for each model input: by name, or the only array for a one-input model."""
        if all(name in arrays for name in self.names):
            return {name: arrays[name] for name in self.names}
        if len(arrays) == 1 and len(self.names) == 1:
            return {self.names[0]: next(iter(arrays.values()))}
        missing = [name for name in self.names if name not in arrays]
        raise DataError(f"{what} has arrays {', '.join(sorted(arrays))} but the model's inputs are "
                        f"{', '.join(self.names)} (missing: {', '.join(missing)})",
                        "name the arrays after the model inputs (np.savez(path, **{name: array}))")

    def check(self, batch: Mapping[str, Any], where: str) -> Batch:
        """The batch as numpy arrays in the model's dtypes, or a DataError saying what is wrong."""
        checked: Batch = {}
        rows = None
        for name in self.names:
            if name not in batch:
                raise DataError(f"{where} has no value for the model input {name!r} "
                                f"(it has {', '.join(map(str, batch)) or 'nothing'})")
            array = self._check_array(name, _to_numpy(batch[name], f"{where}, input {name!r}"), where)
            if rows is not None and array.shape[0] != rows:
                raise DataError(f"{where}: inputs have different numbers of samples "
                                f"({rows} and {array.shape[0]} for {name!r})")
            rows = array.shape[0]
            checked[name] = array
        return checked

    def _check_array(self, name: str, array: np.ndarray, where: str) -> np.ndarray:
        label = f"{where}, input {name!r}"
        if array.ndim == 0 or array.shape[0] == 0:
            raise DataError(f"{label} is empty (shape {array.shape})")
        if array.dtype.kind not in "biuf":
            raise DataError(f"{label} has dtype {array.dtype}; inputs must be numbers")
        spec = self.specs.get(name)
        if spec is not None:
            array = self._match_spec(spec, array, label)
        if array.dtype.kind == "f":
            finite = np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise DataError(f"{label} holds NaN or Inf in {bad.size} sample(s), first at row {int(bad[0])}",
                                "clean the data; statistics of non-finite values are meaningless")
        return array

    @staticmethod
    def _match_spec(spec: InputSpec, array: np.ndarray, label: str) -> np.ndarray:
        expected = "(" + ", ".join("?" if d is None else str(d) for d in spec.shape) + ")"
        fixed_mismatch = any(d is not None and d != actual
                             for d, actual in zip(spec.shape[1:], array.shape[1:]))
        if spec.shape and (array.ndim != len(spec.shape) or fixed_mismatch):
            raise DataError(f"{label} has shape {tuple(array.shape)}, the model expects {expected}",
                            "the first dimension is the batch; the others must match the model")
        try:
            wanted = np.dtype(spec.dtype)
        except TypeError:
            return array  # a dtype numpy does not name (e.g. bfloat16): leave it to the framework
        if wanted.kind == "f" and array.dtype.kind != "f":
            raise DataError(f"{label} holds {array.dtype} values, the model expects {wanted}",
                            "convert (and scale) the data to floating point first")
        if wanted.kind in "iu" and array.dtype.kind == "f":
            raise DataError(f"{label} holds {array.dtype} values, the model expects {wanted}")
        return array.astype(wanted, copy=False)


def _to_numpy(value: Any, label: str) -> np.ndarray:
    """A numpy array from an array, a (CPU or GPU) tensor or nested lists, without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as error:
        raise DataError(f"{label} is not an array ({error})") from None


class ArraySource(DataSource):
    """Indexable inputs (arrays, memory maps, an image folder) read one batch at a time.

    `num_samples` and `num_batches` count this process's share; `description` names the whole data.
    """

    def __init__(self, arrays: Mapping[str, Any], validator: _Validator, options: DataOptions,
                 description: str) -> None:
        scalars = [name for name, array in arrays.items() if getattr(array, "ndim", 1) == 0]
        if scalars:
            raise DataError(f"{description}: {scalars[0]!r} is a single number, not an array of samples")
        lengths = {name: len(array) for name, array in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{description}: inputs have different numbers of samples ({lengths})")
        available = next(iter(lengths.values()))
        if available == 0:
            raise DataError(f"{description} holds no samples")
        self.arrays = arrays
        self.validator = validator
        self.description = description
        self.notes = []
        self.shuffled = options.seed is not None
        order = np.random.default_rng(options.seed).permutation(available) if self.shuffled else np.arange(available)
        self.order = order[: options.max_samples]
        batch_size = options.batch_size
        fixed = validator.fixed_batch()
        if fixed is not None and fixed != batch_size:
            self.notes.append(f"the model takes batches of exactly {fixed}; using --batch-size {fixed}")
            batch_size = fixed
        self.bounds = _batch_bounds(len(self.order), batch_size, options.min_batch, exact=fixed is not None)
        used = self.bounds[-1][1] if self.bounds else 0
        if used < len(self.order):
            self.notes.append(f"{len(self.order) - used} samples left over from full batches of {batch_size} "
                              "are not used")
        if not self.bounds:
            raise DataError(f"{description}: {len(self.order)} samples do not fill one batch of {batch_size}")
        first, last = share(len(self.bounds), options.rank, options.world_size)
        self.bounds = self.bounds[first:last]
        self.num_samples = sum(stop - start for start, stop in self.bounds)
        self.num_batches = len(self.bounds)

    def batches(self) -> Iterator[Batch]:
        for start, stop in self.bounds:
            rows = self.order[start:stop] if self.shuffled else slice(start, stop)  # slices read mmaps in order
            batch = {name: _rows(array, rows) for name, array in self.arrays.items()}
            yield self.validator.check(batch, f"{self.description}, samples {start}..{stop - 1}")


def _rows(array: Any, rows: slice | np.ndarray) -> np.ndarray:
    """Some rows of an input in memory: of an array in memory, a read-only view (no copy: nothing may write
    the user's data, and the engines that may write their inputs copy them); of anything else (a memory
    map, an image folder, a tensor), read into memory."""
    if type(array) is np.ndarray:
        view = array[rows].view()
        view.flags.writeable = False
        return view
    return np.array(array[rows])


def share(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[first, last) of `rank`'s contiguous share of `total` items; lower ranks take one more if uneven."""
    base, extra = divmod(total, world_size)
    first = rank * base + min(rank, extra)
    return first, first + base + (rank < extra)


def _batch_bounds(total: int, size: int, min_last: int, exact: bool) -> list[tuple[int, int]]:
    """[start, stop) of each batch; a short last batch joins the previous one (or is dropped if exact)."""
    bounds = [(start, min(start + size, total)) for start in range(0, total, size)]
    short = bool(bounds) and bounds[-1][1] - bounds[-1][0] < (size if exact else min_last)
    if short and exact:
        bounds.pop()
    elif short and len(bounds) > 1:
        bounds[-2:] = [(bounds[-2][0], total)]
    return bounds


class CallableSource(DataSource):
    """Batches from the user's own pipeline: a function called once per pass.

    A function taking `rank` and `world_size` keyword arguments gets them (0 and 1 for one process);
    split between processes, it must return only its rank's share, and `max_samples` is split too.
    """

    def __init__(self, function: Callable[..., Iterable[Any]], validator: _Validator, options: DataOptions,
                 description: str) -> None:
        self.function = function
        self.validator = validator
        self.options = options
        self.description = description
        self.notes = []
        self.sharded = _takes_shard(function)
        if options.world_size > 1 and not self.sharded:
            raise UsageError(f"{description} is read by {options.world_size} processes, but the function takes "
                             "no rank= and world_size= keyword arguments, so every process would read the same "
                             "data", "add both parameters and return only that rank's share of the batches")

    def batches(self) -> Iterator[Batch]:
        options = self.options
        with self._user_code():
            produced = (self.function(rank=options.rank, world_size=options.world_size) if self.sharded
                        else self.function())
        if not isinstance(produced, Iterable):
            raise DataError(f"{self.description} returned a {type(produced).__name__}, not an iterable of batches")
        remaining = options.max_samples
        if remaining is not None:
            first, last = share(remaining, options.rank, options.world_size)
            remaining = last - first
            if remaining == 0:
                return
        index = -1
        for index, item in enumerate(self._items(produced)):
            batch = self.validator.check(self._as_mapping(item, index), f"{self.description}, batch {index}")
            if remaining is not None:
                rows = next(iter(batch.values())).shape[0]
                if rows > remaining:
                    batch = {name: array[:remaining] for name, array in batch.items()}
                remaining -= min(rows, remaining)
            yield batch
            if remaining == 0:
                return
        if index < 0 and options.world_size == 1:  # one of several processes may have no share
            raise DataError(f"{self.description} produced no batches")

    def _items(self, produced: Iterable[Any]) -> Iterator[Any]:
        iterator = iter(produced)
        while True:
            with self._user_code():
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    @contextmanager
    def _user_code(self) -> Iterator[None]:
        """An exception inside the user's pipeline is a data problem to report, not a bug in bnfold."""
        try:
            yield
        except BnfoldError:
            raise
        except Exception as error:
            line = (str(error).strip().splitlines() or [""])[0][:300]
            raise DataError(f"{self.description} raised {type(error).__name__}: {line}",
                            "run with --debug to see its traceback") from error

    def _as_mapping(self, item: Any, index: int) -> Mapping[str, Any]:
        names = self.validator.names
        if isinstance(item, Mapping):
            return item
        if isinstance(item, (tuple, list)):
            if len(item) < len(names):
                raise DataError(f"{self.description}, batch {index} has {len(item)} values for "
                                f"{len(names)} model inputs ({', '.join(names)})")
            return dict(zip(names, item))  # extra trailing values (labels) are ignored
        return {self.validator.single_name(f"{self.description}, batch {index}"): item}


def _takes_shard(function: Callable[..., Any]) -> bool:
    """Whether `function` accepts `rank` and `world_size` as keyword arguments (by name, not **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters and parameters[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                  inspect.Parameter.KEYWORD_ONLY)
               for name in ("rank", "world_size"))


def _reusable(batches: Iterable[Any]) -> Callable[..., Iterable[Any]]:
    """A function giving the batches again on every pass (a one-shot iterator works only once); split
    between processes, a list of batches gives each its contiguous share."""
    used = False

    def again(rank: int = 0, world_size: int = 1) -> Iterable[Any]:
        nonlocal used
        if iter(batches) is batches and used:
            raise DataError("the batches came from a one-shot iterator, which cannot feed a second pass",
                            "pass a list, or a function that returns a fresh iterable each time")
        used = True
        if world_size == 1:
            return batches
        if not isinstance(batches, Sequence):
            raise UsageError(f"a {type(batches).__name__} of batches cannot be split between {world_size} "
                             "processes", "pass a list, or a function taking rank= and world_size=")
        first, last = share(len(batches), rank, world_size)
        return batches[first:last]

    return again


class _ImageFolder:
    """The images under a directory as an indexable (N, C, H, W) float32 array, decoded on access."""

    def __init__(self, root: Path, channels: int, options: ImageOptions) -> None:
        try:
            from PIL import Image
        except ImportError:
            raise MissingDependencyError("reading a directory of images needs Pillow",
                                         "pip install 'bnfold[images]'") from None
        self.image = Image
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.mode = "L" if channels == 1 else "RGB"
        self.options = options
        self.mean = self._per_channel(options.mean, channels, "--mean")
        self.std = self._per_channel(options.std, channels, "--std")
        if np.any(self.std == 0):
            raise UsageError("--std must not contain 0")

    @staticmethod
    def _per_channel(values: tuple[float, ...], channels: int, option: str) -> np.ndarray:
        array = np.asarray(values, dtype=np.float32)
        if array.size == channels:
            return array.reshape(channels, 1, 1)
        if channels == 1:
            return np.float32(array.mean()).reshape(1, 1, 1)
        if array.size == 1:
            return np.repeat(array, channels).reshape(channels, 1, 1)
        raise UsageError(f"{option} has {array.size} values for {channels}-channel images")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        images = [self._load(self.files[i]) for i in np.arange(len(self.files))[rows]]
        sizes = {image.shape for image in images}
        if len(sizes) > 1:
            raise DataError(f"images have different sizes ({', '.join(str(s[1:]) for s in sorted(sizes))})",
                            "pass --resize and --crop (e.g. --resize 256 --crop 224)")
        return np.stack(images)

    def _load(self, path: Path) -> np.ndarray:
        try:
            with self.image.open(path) as opened:
                picture = opened.convert(self.mode)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read image {path} ({error})") from None
        if self.options.resize:
            width, height = picture.size
            scale = self.options.resize / min(width, height)
            picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                     self.image.Resampling.BILINEAR)
        if self.options.crop:
            width, height = picture.size
            side = self.options.crop
            if side > min(width, height):
                raise DataError(f"--crop {side} is larger than image {path} ({width}x{height})",
                                "pass --resize at least as large as --crop")
            left, top = (width - side) // 2, (height - side) // 2
            picture = picture.crop((left, top, left + side, top + side))
        pixels = np.asarray(picture, dtype=np.float32) / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return (pixels - self.mean) / self.std


__all__ = ["ArraySource", "CallableSource", "DataOptions", "DataSource", "IMAGENET_MEAN", "IMAGENET_STD",
           "ImageOptions", "open_data", "parse_channel_values", "share"]
