"""rapha.errors: one tree, distinct and stable exit codes."""

from __future__ import annotations

import rapha.errors as errors
from rapha.errors import ExitCode, RaphaError


def _error_classes() -> list[type[RaphaError]]:
    return [
        obj
        for name in errors.__all__
        if isinstance(obj := getattr(errors, name), type) and issubclass(obj, RaphaError)
    ]


def test_every_exported_error_derives_from_rapha_error() -> None:
    classes = _error_classes()

    assert RaphaError in classes
    assert len(classes) >= 10
    assert all(issubclass(cls, Exception) for cls in classes)


def test_every_error_has_a_documented_exit_code() -> None:
    for cls in _error_classes():
        assert isinstance(cls.exit_code, ExitCode)
        assert cls.exit_code != ExitCode.OK
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} missing from the tree"


def test_exit_codes_are_stable() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0,
        "ERROR": 1,
        "CONFIG": 2,
        "KEY_FILE": 3,
        "INTEGRITY": 4,
        "SCOPE": 5,
        "DATA": 6,
        "POLICY": 7,
        "SANDBOX": 8,
        "REMOTE": 9,
        "DEPENDENCY": 10,
        "INTERRUPTED": 130,
    }
