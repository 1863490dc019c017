"""Validated YAML catalogues (rules, plans): parse, validate, and say what is wrong and what to do."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from models.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def parse_yaml_model(text: str | bytes, model: type[M], source: str, keys: str, outcome: str) -> M:
    """Validate YAML text as `model`; ConfigError names the source, field and problem, then `outcome`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc}); fix the syntax and load it again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with {keys}, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{source}: {loc + ': ' if loc else ''}{msg}; {outcome}") from None


def read_text(path: Path, what: str, setting: str) -> str:
    """Read a catalogue file; ConfigError says which setting points elsewhere."""
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}; set {setting}") from None


__all__ = ["parse_yaml_model", "read_text"]
