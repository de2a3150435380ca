"""What `bnfold check` enforces: defaults, then a config file, then command-line flags, each overriding.

The config file is the first found walking up from the working directory: in each directory a
`bnfold.toml` (keys at the top level) wins over a `pyproject.toml` (keys under `[tool.bnfold]`; a
pyproject.toml without that table is passed over, as ruff and mypy do). Keys are the flag names:

    [tool.bnfold]
    max-layer-kl = 0.06        # channel-mean KL of any one BN layer
    max-mean-shift = 0.35      # channel-mean mean shift of any one BN layer
    max-output-kl = 0.05       # softmax KL of classifier outputs, running vs data statistics
    max-output-l2 = 0.5        # relative L2 distance of all outputs, running vs data statistics
    require-folded = false     # fail while an exactly-foldable BN remains
    fail-on = "error"          # static findings that fail: "error", "warning" or "never"

`max_layer_kl` (underscores) is read as `max-layer-kl`. Unknown keys are errors, so a typo never
silently turns a policy off.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bnfold.discrepancy import DriftLimits
from bnfold.errors import InputError, UsageError
from bnfold.layers import Severity

LIMIT_KEYS = {f.name.replace("_", "-"): f.name for f in fields(DriftLimits)}
KEYS = (*LIMIT_KEYS, "require-folded", "fail-on")
FAIL_ON = ("error", "warning", "never")


@dataclass(frozen=True)
class Policy:
    """The gate's rules; `sources` says where they came from, for the report."""

    limits: DriftLimits = DriftLimits()
    require_folded: bool = False
    fail_on: Severity | None = Severity.ERROR
    sources: tuple[str, ...] = field(default=("defaults",))

    def to_dict(self) -> dict[str, Any]:
        return {**{key: getattr(self.limits, name) for key, name in LIMIT_KEYS.items()},
                "require-folded": self.require_folded,
                "fail-on": self.fail_on.value if self.fail_on else "never", "sources": list(self.sources)}

    def updated(self, settings: dict[str, Any], source: str) -> Policy:
        """A policy with `settings` (config keys; None means not given) applied on top of this one."""
        given = {key.replace("_", "-"): value for key, value in settings.items() if value is not None}
        if not given:
            return self
        unknown = sorted(set(given) - set(KEYS))
        if unknown:
            raise UsageError(f"{source}: unknown bnfold setting {', '.join(map(repr, unknown))}",
                             f"known settings: {', '.join(KEYS)}")
        limits = {LIMIT_KEYS[key]: _limit(value, key, source) for key, value in given.items() if key in LIMIT_KEYS}
        policy = replace(self, limits=replace(self.limits, **limits), sources=(*self.sources, source))
        if "require-folded" in given:
            if not isinstance(given["require-folded"], bool):
                raise UsageError(f"{source}: require-folded must be true or false, got {given['require-folded']!r}")
            policy = replace(policy, require_folded=given["require-folded"])
        if "fail-on" in given:
            policy = replace(policy, fail_on=parse_fail_on(given["fail-on"], source))
        return policy


def parse_fail_on(value: Any, source: str = "--fail-on") -> Severity | None:
    value = getattr(value, "value", value)
    if value not in FAIL_ON:
        raise UsageError(f"{source}: fail-on must be one of {', '.join(FAIL_ON)}, got {value!r}")
    return None if value == "never" else Severity(value)


def _limit(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise UsageError(f"{source}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def find_config(start: Path) -> Path | None:
    """The nearest bnfold.toml, or pyproject.toml with a [tool.bnfold] table, at or above `start`."""
    for directory in (start.resolve(), *start.resolve().parents):
        if (directory / "bnfold.toml").is_file():
            return directory / "bnfold.toml"
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and "bnfold" in _read_toml(pyproject).get("tool", {}):
            return pyproject
    return None


def read_config(path: Path) -> dict[str, Any]:
    """The bnfold settings in a config file: [tool.bnfold] of a pyproject.toml, else the top level."""
    document = _read_toml(path)
    settings = document.get("tool", {}).get("bnfold", {}) if path.name == "pyproject.toml" else document
    if not isinstance(settings, dict):
        raise UsageError(f"{path}: [tool.bnfold] must be a table")
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise InputError(f"cannot read config {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path} is not valid TOML: {error}") from None


def load_policy(config: str | Path | None = None, *, flags: dict[str, Any] | None = None,
                search_from: Path | None = None) -> Policy:
    """Defaults, overridden by `config` (or the nearest config file), overridden by `flags`.

    `flags` maps setting names (as in the config file) to values, None meaning "not given".
    """
    path = Path(config) if config is not None else find_config(search_from or Path.cwd())
    if config is not None and not path.is_file():
        raise InputError(f"no such config file: {path}")
    policy = Policy()
    if path is not None:
        label = f"{path} [tool.bnfold]" if path.name == "pyproject.toml" else str(path)
        policy = policy.updated(read_config(path), label)
    return policy.updated(flags or {}, "flags")


__all__ = ["KEYS", "Policy", "find_config", "load_policy", "parse_fail_on", "read_config"]
