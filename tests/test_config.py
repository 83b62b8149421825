"""rapha.config: TOML settings, environment overrides, validation, default secrets."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import field_validator

from rapha.config import Settings, load_settings, refuse_default_secret
from rapha.errors import ConfigError


class Scope(Settings):
    modalities: tuple[str, ...] = ("DX",)
    max_studies: int = 100


class ExampleSettings(Settings):
    env_prefix: ClassVar[str] = "RAPHA_TEST"

    name: str = "node-a"
    api_secret: str = "changethis"
    scope: Scope = Scope()

    @field_validator("api_secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        return refuse_default_secret("api_secret", value)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_file_values_are_parsed_into_typed_fields(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path / "node.toml",
        'api_secret = "s3cr3t-value"\n[scope]\nmodalities = ["DX", "CR"]\nmax_studies = 7\n',
    )

    settings = load_settings(ExampleSettings, cfg, env={})

    assert settings.scope.modalities == ("DX", "CR")
    assert settings.scope.max_studies == 7
    assert settings.name == "node-a"


def test_environment_overrides_file_and_overrides_win_over_environment(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "node.toml", 'api_secret = "from-file-1"\n[scope]\nmax_studies = 7\n')
    env = {
        "RAPHA_TEST_SCOPE__MAX_STUDIES": "50",
        "RAPHA_TEST_SCOPE__MODALITIES": '["CT"]',
        "RAPHA_TEST_NAME": "from env",
        "UNRELATED": "x",
    }

    from_env = load_settings(ExampleSettings, cfg, env=env)
    from_flags = load_settings(ExampleSettings, cfg, env=env, overrides={"name": "flag"})

    assert from_env.scope.max_studies == 50
    assert from_env.scope.modalities == ("CT",)
    assert from_env.name == "from env"
    assert from_env.api_secret == "from-file-1"
    assert from_flags.name == "flag"


def test_default_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_secret"):
        load_settings(ExampleSettings, None, env={})


def test_unknown_key_is_refused_with_its_name(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "node.toml", 'api_secret = "ok-secret"\nmax_studeis = 3\n')

    with pytest.raises(ConfigError, match="max_studeis"):
        load_settings(ExampleSettings, cfg, env={})


def test_validation_error_does_not_echo_the_value(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path / "node.toml", 'api_secret = "ok-secret"\n[scope]\nmax_studies = "DOE^JOHN"\n'
    )

    with pytest.raises(ConfigError) as info:
        load_settings(ExampleSettings, cfg, env={})

    assert "scope.max_studies" in str(info.value)
    assert "DOE^JOHN" not in str(info.value)


def test_missing_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(ExampleSettings, tmp_path / "absent.toml", env={})
    bad = _write(tmp_path / "bad.toml", "this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(ExampleSettings, bad, env={})


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(ExampleSettings, None, env={"RAPHA_TEST_API_SECRET": "real-one"})

    with pytest.raises(ValueError, match="frozen"):
        settings.name = "other"
