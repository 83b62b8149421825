"""rapha.node.settings: node.toml parsing, path resolution, and the unsafe values refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rapha import crypto
from rapha.errors import ConfigError, KeyFileError
from rapha.node.settings import (
    BasicAuth,
    BearerAuth,
    DicomWebSource,
    FolderSource,
    NoAuth,
    PolicySettings,
    TlsAuth,
    load_node_settings,
)

FOLDER = '[source]\nkind = "folder"\npath = "archive/dicom"\n'

BASE = """\
name = "st-elsewhere"
opt_out = "opt-out.txt"
state_dir = "state"
audit_log = "state/audit.jsonl"

[scope]
modalities = ["DX", "CR"]
body_parts = ["CHEST"]
date_from = 2020-01-01
date_to = 2024-12-31
max_studies = 1000

[keys]
hmac_key = "keys/hmac.key"
split_key = "keys/split.key"
signing_key = "keys/node.key"
"""


def _config(tmp_path: Path, source: str = FOLDER, extra: str = "", top: str = "") -> Path:
    """A node.toml: ``top`` holds top-level keys, ``extra`` more tables."""
    base = BASE
    if top.startswith("name"):
        base = base.replace('name = "st-elsewhere"\n', "")
    path = tmp_path / "conf" / "node.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(top + base + extra + source, encoding="utf-8")
    return path


def _dicomweb(url: str, auth: str = "", extra: str = "") -> str:
    text = f'[source]\nkind = "dicomweb"\nurl = "{url}"\n{extra}'
    return text + (f"[source.auth]\n{auth}" if auth else "")


# --- loading and paths -------------------------------------------------------------------


def test_a_folder_node_loads_with_paths_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter

    settings = load_node_settings(config, env={})

    base = config.parent.resolve()
    assert settings.name == "st-elsewhere"
    assert settings.source == FolderSource(kind="folder", path=base / "archive/dicom")
    assert settings.keys.hmac_key == base / "keys/hmac.key"
    assert settings.keys.signing_key == base / "keys/node.key"
    assert settings.opt_out == base / "opt-out.txt"
    assert settings.audit_log == base / "state/audit.jsonl"
    assert settings.labels is None
    assert settings.scope.to_scope().modalities == frozenset({"DX", "CR"})
    assert settings.view.size == (224, 224)
    assert settings.ocr_modalities() == frozenset({"DX", "CR"})


def test_absolute_paths_are_kept_and_env_paths_resolve_against_the_config(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, top='labels = "/srv/labels.csv"\n')
    env = {"RAPHA_NODE_OPT_OUT": "lists/opt-out.txt", "RAPHA_NODE_SCOPE__MAX_STUDIES": "5"}

    settings = load_node_settings(config, env=env)

    assert settings.labels == Path("/srv/labels.csv")
    assert settings.opt_out == config.parent.resolve() / "lists/opt-out.txt"
    assert settings.scope.max_studies == 5


def test_a_dicomweb_source_with_basic_auth_loads(tmp_path: Path) -> None:
    source = _dicomweb(
        "https://pacs.example.org/dicom-web/",
        auth='kind = "basic"\nusername = "rapha"\npassword_file = "pacs-password"\n',
    )

    settings = load_node_settings(_config(tmp_path, source), env={})

    assert isinstance(settings.source, DicomWebSource)
    assert settings.source.url == "https://pacs.example.org/dicom-web"
    assert settings.source.auth == BasicAuth(
        kind="basic",
        username="rapha",
        password_file=_config(tmp_path, source).parent.resolve() / "pacs-password",
    )


@pytest.mark.parametrize(
    ("auth", "kind"),
    [
        ("", NoAuth),
        ('kind = "bearer"\ntoken_file = "t"\n', BearerAuth),
        ('kind = "tls"\ncert = "c.pem"\nkey = "c.key"\nca = "ca.pem"\n', TlsAuth),
    ],
)
def test_every_auth_kind_loads(tmp_path: Path, auth: str, kind: type) -> None:
    source = _dicomweb("https://pacs.example.org/dicom-web", auth=auth)

    settings = load_node_settings(_config(tmp_path, source), env={})

    assert isinstance(settings.source, DicomWebSource)
    assert isinstance(settings.source.auth, kind)


def test_plain_http_is_allowed_to_loopback_and_when_explicitly_allowed(tmp_path: Path) -> None:
    loopback = _dicomweb("http://127.0.0.1:8042/dicom-web")
    remote = _dicomweb("http://pacs.local/dicom-web", extra="allow_insecure_http = true\n")

    for source in (loopback, remote):
        settings = load_node_settings(_config(tmp_path, source), env={})
        assert isinstance(settings.source, DicomWebSource)


# --- what is refused ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "field", "match"),
    [
        (_dicomweb("https://rapha:hunter22@pacs.example.org/"), "source.dicomweb.url", "creden"),
        (_dicomweb("http://pacs.example.org/dicom-web"), "source.dicomweb", "in clear"),
        (
            _dicomweb("http://127.0.0.1/dw", auth='kind = "tls"\ncert = "c"\nkey = "k"\n'),
            "source.dicomweb",
            "https",
        ),
        (_dicomweb("ftp://pacs.example.org/"), "source.dicomweb.url", "http"),
        (_dicomweb("https://pacs.example.org/dw?PatientID=1"), "source.dicomweb.url", "query"),
        (
            _dicomweb("https://p.example.org", auth='kind = "basic"\nusername = "a:b"\n'),
            "source.dicomweb.auth.basic.username",
            "cannot contain ':'",
        ),
        ('[source]\nkind = "dimse"\n', "source", "kind"),
        ('[source]\nkind = "folder"\n', "source.folder.path", "Field required"),
    ],
)
def test_unsafe_or_malformed_sources_are_refused(
    tmp_path: Path, source: str, field: str, match: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_settings(_config(tmp_path, source), env={})

    message = str(info.value)
    assert field in message
    assert match in message
    assert "hunter22" not in message


@pytest.mark.parametrize(
    ("extra", "field", "match"),
    [
        ('name = "St Elsewhere"\n', "name", "lower-case"),
        ("[view]\nratios = [0.5, 0.2, 0.2]\n", "view.ratios", "sum to 1"),
        ("[view]\nratios = [0.8, 0.2, 0.0]\n", "view.ratios", "above 0"),
        ("[view]\nsize = [4, 224]\n", "view.size", "between"),
        ('[view]\ndtype = "float64"\n', "view.dtype", ""),
        ('[ocr.disabled]\nDX = "not needed"\n', "ocr.disabled", "justification"),
        ('[ocr.disabled]\ndx = "our DX readers never burn in any text at all"\n', "ocr", "upper"),
        ('[ocr.disabled]\nCT = "our CT scanners never burn in any text at all"\n', "", "CT"),
        ("[extra]\nkey = 1\n", "extra", "not permitted"),
        ("[policy]\nk_anonymity = 1\n", "policy.k_anonymity", "greater than or equal to 2"),
        ("[policy]\ndp_epsilon = 0\n", "policy.dp_epsilon", "greater than 0"),
        ("[policy]\ndp_delta = 1.5\n", "policy.dp_delta", "less than 1"),
        ("[policy]\nmax_output_bytes = 0\n", "policy.max_output_bytes", "greater than"),
        ("[policy]\nevaluation_quota = -1\n", "policy.evaluation_quota", "greater than"),
        ("[policy]\nsurprise = true\n", "policy.surprise", "not permitted"),
    ],
)
def test_unsafe_values_are_refused_with_the_field_named(
    tmp_path: Path, extra: str, field: str, match: str
) -> None:
    is_top = extra.startswith("name")
    config = _config(tmp_path, top=extra if is_top else "", extra="" if is_top else extra)

    with pytest.raises(ConfigError) as info:
        load_node_settings(config, env={})

    assert field in str(info.value)
    assert match in str(info.value)


def test_a_config_without_a_policy_table_gets_the_default_policies(tmp_path: Path) -> None:
    settings = load_node_settings(_config(tmp_path), env={})

    assert settings.policy == PolicySettings()
    assert settings.policy.admission is None  # the policies shipped with Rapha
    assert settings.policy.output is None
    assert settings.policy.policy_input() == {
        "k_anonymity": 10,
        "allow_custom_code": True,
        "dp_required": False,
        "dp_epsilon": 8.0,
        "dp_delta": 1e-5,
        "max_output_bytes": 512 << 20,
        "evaluation_quota": 20,
        "allowed_orgs": [],
        "allowed_kinds": ["train", "evaluate"],
        "min_price_per_record": 0,
        "epsilon_budget": 0.0,
    }


def test_policy_files_resolve_against_the_config_directory(tmp_path: Path) -> None:
    extra = (
        '[policy]\nadmission = "policies/admission.rego"\noutput = "/srv/output.rego"\n'
        "dp_required = true\nallow_custom_code = false\n"
    )
    config = _config(tmp_path, extra=extra)

    settings = load_node_settings(config, env={"RAPHA_NODE_POLICY__K_ANONYMITY": "20"})

    assert settings.policy.admission == config.parent.resolve() / "policies/admission.rego"
    assert settings.policy.output == Path("/srv/output.rego")
    assert settings.policy.dp_required is True
    assert settings.policy.allow_custom_code is False
    assert settings.policy.k_anonymity == 20


def test_scope_errors_surface_with_their_field(tmp_path: Path) -> None:
    config = _config(tmp_path)

    with pytest.raises(ConfigError, match=r"scope\.max_studies"):
        load_node_settings(config, env={"RAPHA_NODE_SCOPE__MAX_STUDIES": "0"})
    with pytest.raises(ConfigError, match=r"scope\.modalities"):
        load_node_settings(config, env={"RAPHA_NODE_SCOPE__MODALITIES": '["*"]'})


def test_a_missing_opt_out_list_setting_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(BASE.replace('opt_out = "opt-out.txt"\n', "") + FOLDER)

    with pytest.raises(ConfigError, match="opt_out"):
        load_node_settings(config, env={})


def test_one_file_used_as_two_keys_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)

    with pytest.raises(ConfigError, match="three different files"):
        load_node_settings(config, env={"RAPHA_NODE_KEYS__SPLIT_KEY": "./keys/hmac.key"})


def test_ocr_disabled_in_writing_is_taken_off_the_ocr_modalities(tmp_path: Path) -> None:
    extra = '[ocr.disabled]\nCR = "CR readers here cannot burn in text (DPO review 2025-01)"\n'

    settings = load_node_settings(_config(tmp_path, extra=extra), env={})

    assert settings.ocr_modalities() == frozenset({"DX"})


# --- keys and credential files -----------------------------------------------------------


def _write_keys(base: Path) -> None:
    (base / "keys").mkdir(exist_ok=True)
    crypto.write_secret(base / "keys/hmac.key", os.urandom(32))
    crypto.write_secret(base / "keys/split.key", os.urandom(32))
    crypto.save_private_key(crypto.generate_private_key(), base / "keys/node.key")


def test_keys_load_and_hide_their_bytes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _write_keys(config.parent)
    settings = load_node_settings(config, env={})

    keys = settings.keys.load()

    assert len(keys.hmac_key) == 32
    assert keys.hmac_key != keys.split_key
    assert keys.hmac_key.hex() not in repr(keys)
    assert keys.split_key.hex() not in repr(keys)


def test_a_split_key_equal_to_the_hmac_key_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _write_keys(config.parent)
    (config.parent / "keys/split.key").unlink()
    crypto.write_secret(
        config.parent / "keys/split.key", (config.parent / "keys/hmac.key").read_bytes()
    )
    settings = load_node_settings(config, env={})

    with pytest.raises(KeyFileError, match="separate secret"):
        settings.keys.load()


def test_a_short_or_loose_hmac_key_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _write_keys(config.parent)
    settings = load_node_settings(config, env={})
    hmac_key = config.parent / "keys/hmac.key"

    os.chmod(hmac_key, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        settings.keys.load()
    hmac_key.unlink()
    crypto.write_secret(hmac_key, os.urandom(16))
    with pytest.raises(KeyFileError, match="exactly 32"):
        settings.keys.load()


def test_pacs_credentials_are_read_from_private_files(tmp_path: Path) -> None:
    password = tmp_path / "pacs-password"
    token = tmp_path / "pacs-token"
    crypto.write_private_file(password, b"s3cret-pass\n")
    crypto.write_private_file(token, b"tok-123")
    basic = BasicAuth(kind="basic", username="rapha", password_file=password)
    bearer = BearerAuth(kind="bearer", token_file=token)

    assert basic.password() == "s3cret-pass"
    assert bearer.token() == "tok-123"
    os.chmod(token, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        bearer.token()
