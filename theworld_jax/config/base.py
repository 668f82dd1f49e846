"""What every config shares: the error type, closed sets of setting values, and the one JSON reader."""

from __future__ import annotations

import enum
import json
import os
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that this library cannot represent faithfully (names the file when one was read)."""


class Choice(enum.StrEnum):
    """A setting with a closed set of values. Members are their strings (equal, hashed, printed, repr'd
    and written to JSON as such); `parse` turns a string into a member or raises a one-line ConfigError."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def parse(cls, value: Any, name: str):
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not supported; expected one of "
                              f"{[m.value for m in cls]}") from None


def read_json_config(path: str, parse: Callable[[dict[str, Any]], T]) -> T:
    """`parse` of the JSON object in `path` (a config.json, or a directory holding one).

    A missing file is a FileNotFoundError, invalid JSON, a non-object or a field `parse` rejects a
    one-line ConfigError; each names the file.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields; got a JSON {type(raw).__name__}")
    try:
        return parse(raw)
    except (TypeError, ValueError, KeyError) as err:  # ConfigError, or a field of the wrong type
        raise ConfigError(f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
