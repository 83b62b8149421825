"""Typed getters for one TOML table that name the field in every error (for the manifest)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Final, TypeVar

from rapha.errors import ManifestError

__all__ = ["MISSING", "Table"]

_E = TypeVar("_E", bound=StrEnum)
MISSING: Final = object()
"""Marks a required key (no default)."""


class Table:
    """One TOML table being read: typed getters that name the field, then :meth:`done`."""

    def __init__(self, name: str, value: object) -> None:
        if not isinstance(value, Mapping):
            raise ManifestError(f"[{name}] must be a table")
        self.name = name
        self.data: Mapping[str, object] = value
        self.seen: set[str] = set()

    def field(self, key: str) -> str:
        return f"{self.name}.{key}"

    def raw(self, key: str, default: object = MISSING) -> object:
        self.seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is MISSING:
            raise ManifestError(f"{self.field(key)} is required")
        return default

    def has(self, key: str) -> bool:
        return key in self.data

    def string(self, key: str, pattern: re.Pattern[str], *, what: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ManifestError(f"{self.field(key)} must be {what}")
        return value

    def choice(self, key: str, enum: type[_E], default: _E | None = None) -> _E:
        value = self.raw(key, MISSING if default is None else default.value)
        allowed = ", ".join(repr(e.value) for e in enum)
        if not isinstance(value, str) or value not in {e.value for e in enum}:
            raise ManifestError(f"{self.field(key)} must be one of {allowed}")
        return enum(value)

    def integer(self, key: str, low: int, high: int, default: int | None = None) -> int:
        value = self.raw(key, MISSING if default is None else default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ManifestError(f"{self.field(key)} must be an integer")
        if not low <= value <= high:
            raise ManifestError(f"{self.field(key)} must be between {low} and {high}")
        return value

    def number(
        self, key: str, default: float, *, low: float, high: float, low_open: bool = False
    ) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ManifestError(f"{self.field(key)} must be a number")
        number = float(value)
        below = number <= low if low_open else number < low
        if below or not number <= high:  # `not <=` also catches NaN
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise ManifestError(f"{self.field(key)} must be in {interval}")
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ManifestError(f"{self.field(key)} must be true or false")
        return value

    def names(
        self, key: str, pattern: re.Pattern[str], *, limit: int, default: object
    ) -> list[str]:
        value = self.raw(key, default)
        if not isinstance(value, list):
            raise ManifestError(f"{self.field(key)} must be a list of strings")
        if len(value) > limit:
            raise ManifestError(f"{self.field(key)} may hold at most {limit} entries")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not pattern.fullmatch(item):
                raise ManifestError(
                    f"{self.field(key)}[{i}] must be a string matching {pattern.pattern}"
                )
        duplicates = sorted({v for v in value if value.count(v) > 1})
        if duplicates:
            raise ManifestError(f"{self.field(key)} repeats {', '.join(duplicates)}")
        return list(value)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ManifestError(
                f"unknown key {self.field(unknown[0])} (allowed in [{self.name}]: "
                f"{', '.join(sorted(self.seen))})"
            )
