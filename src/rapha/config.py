"""Typed settings: TOML files with environment overrides, parsed once into frozen models.

Each process has one settings object (node, hub or client), a subclass of
:class:`Settings`. :func:`load_settings` reads it from a TOML file, then applies
environment variables, then validates the lot, so a typo or an unsafe value stops the
process at start-up with a message naming the field, never halfway through a job.

Environment overrides are named ``<PREFIX>_<SECTION>__<KEY>`` (double underscore between
nesting levels, case-insensitive), for example ``RAPHA_NODE_SCOPE__MAX_STUDIES=500``. A
value is read as a TOML value when it parses as one (``500``, ``true``, ``["DX", "CR"]``)
and as a plain string otherwise.

Validation errors name the field and the problem, never the value: a value may be a
secret, a path with a patient's name in it, or a PACS password.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from rapha.errors import ConfigError

__all__ = ["KNOWN_DEFAULT_SECRETS", "Settings", "load_settings", "refuse_default_secret"]

S = TypeVar("S", bound="Settings")

#: Values that show a secret was never set. A settings object refuses them at start-up.
KNOWN_DEFAULT_SECRETS: frozenset[str] = frozenset(
    {"", "changethis", "change-me", "changeme", "secret", "password", "admin", "default"}
)


class Settings(BaseModel):
    """Base of every settings model: frozen, unknown keys refused, defaults validated too
    (so a placeholder secret left as a default is refused like one set in a file).

    Subclasses set ``env_prefix`` (for example ``"RAPHA_NODE"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    env_prefix: ClassVar[str] = "RAPHA"


def refuse_default_secret(field: str, value: str) -> str:
    """Return ``value`` unless it is empty or a well-known placeholder.

    For use in ``field_validator``s of secret fields (STYLE.md rule 8).
    """
    if value.strip().lower() in KNOWN_DEFAULT_SECRETS:
        raise ValueError(f"{field} is unset or a default placeholder; set a real secret")
    return value


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(prefix: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Collect ``PREFIX_A__B=value`` variables into ``{"a": {"b": value}}``."""
    head = prefix.upper() + "_"
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.upper().startswith(head):
            continue
        path = [part.lower() for part in name[len(head) :].split("__")]
        if not all(path):
            raise ConfigError(f"environment variable {name} has an empty name part")
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name} conflicts with another override")
            node = child
        node[path[-1]] = _parse_env_value(raw)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_settings(
    cls: type[S],
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> S:
    """Build a ``cls`` from a TOML file, environment variables and explicit overrides.

    Precedence, lowest first: the model's defaults, the file, the environment, then
    ``overrides`` (command-line flags). ``env`` defaults to ``os.environ``.

    Raises :class:`ConfigError` for a missing or malformed file and for values that fail
    validation; the message lists every bad field.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    data = _merge(data, _env_overrides(cls.env_prefix, os.environ if env is None else env))
    if overrides:
        data = _merge(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        source = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid settings{source}:\n{_describe(exc)}") from exc
