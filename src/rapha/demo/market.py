"""A whole marketplace on one machine: a hub on loopback and hospital nodes for it.

:class:`LocalHub` runs the hub (:func:`rapha.hub.server.build_server`: SQLite, the
settlement service, the background loop) under uvicorn in a thread on a loopback port,
over a chain the caller holds (the embedded EVM, so the caller can deposit on it).
:func:`configure_node` lays out a hospital node for it (``rapha node init`` and a
``[hub]`` table) and :func:`agent_command` is the command that runs its agent.
``rapha demo`` and the integration tests use all three.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rapha import crypto
from rapha.errors import RaphaError

if TYPE_CHECKING:
    import uvicorn

    from rapha.hub.server import HubServer
    from rapha.ledger import ClearingVault, EmbeddedChain

__all__ = ["HospitalSite", "LocalHub", "agent_command", "configure_node"]


class LocalHub:
    """The hub on ``127.0.0.1:port`` in this process; :meth:`restart` keeps its database."""

    def __init__(
        self,
        root: Path,
        *,
        chain: EmbeddedChain,
        vault: ClearingVault,
        port: int,
        lease_seconds: float = 60.0,
        max_attempts: int = 3,
        loop_interval: float = 0.5,
        pepper: str | None = None,
        log: Path | None = None,
        ek_ca_certificates: Sequence[Path] = (),
        ek_intermediates: Sequence[Path] = (),
    ) -> None:
        from rapha.hub.settings import HubSettings

        root.mkdir(parents=True, exist_ok=True)
        key = root / "hub.key"
        if not key.exists():
            crypto.save_private_key(crypto.generate_private_key(), key)
        self.settings = HubSettings(
            port=port,
            database_url=f"sqlite:///{root / 'hub.db'}",
            api_key_pepper=pepper or secrets.token_hex(32),
            signing_key=key,
            artifacts=root / "artifacts",
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            loop_interval=loop_interval,
            ek_ca_certificates=list(ek_ca_certificates),
            ek_intermediates=list(ek_intermediates),
        )
        self.url = f"http://127.0.0.1:{port}"
        self.chain = chain
        self.vault = vault
        self.hub_key = crypto.load_private_key(key)
        self._log = log
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.server: HubServer | None = None
        self.start()

    @property
    def parts(self) -> HubServer:
        if self.server is None:
            raise RaphaError("the hub is not running")
        return self.server

    def start(self) -> None:
        import uvicorn

        from rapha.hub.server import build_server

        server = build_server(self.settings, chain=(self.chain, self.vault, self.chain.operator))
        config = uvicorn.Config(
            server.app,
            host="127.0.0.1",
            port=self.settings.port,
            log_level="info" if self._log else "warning",
            log_config=None if self._log else uvicorn.config.LOGGING_CONFIG,
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, name="hub", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                server.close()
                raise RaphaError(f"the hub did not start on port {self.settings.port}")
            time.sleep(0.02)
        server.worker.start()
        self.server = server

    def stop(self) -> None:
        if self.server is not None:
            self.server.worker.stop()
        if self._uvicorn is not None and self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout=15)
        if self.server is not None:
            self.server.hub.db.close()
        self.server = None

    def restart(self, *, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@contextlib.contextmanager
def log_to_file(path: Path, names: Sequence[str] = ("rapha", "uvicorn")) -> Iterator[None]:
    """Send the named loggers (INFO and up) to ``path``, and only there, for a while."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        handler.close()


@dataclass(frozen=True)
class HospitalSite:
    """What a node's ``[hub]`` table says about its hospital and its terms."""

    node_id: str
    hospital_id: bytes
    payout: str
    settlement_key: bytes
    price_per_record: int


def configure_node(
    root: Path,
    *,
    site: HospitalSite,
    hub_url: str,
    source: str,
    labels: Path,
    modality: str,
    uid: int,
    trusted: Mapping[str, Path],
    approvals: bool = False,
    ocr_disabled: str | None = None,
    policy: Mapping[str, Any] | None = None,
    ratios: tuple[float, float, float] | None = None,
    keep_views: bool = False,
    link: Mapping[str, Any] | None = None,
    max_studies: int | None = None,
) -> Path:
    """Lay out a node for ``site`` over ``source`` (folder or DICOMweb URL); its node.toml.

    The scope is ``modality`` CHEST from 2000 on; ``trusted`` pins company keys;
    ``ocr_disabled`` (a reason) switches burned-in text OCR off for ``modality``;
    ``policy`` sets more ``[policy]`` values, ``ratios`` the view's splits, ``link`` more
    ``[hub]`` values (the polling and heartbeat periods default to short ones),
    ``max_studies`` the scope's cap.
    """
    from rapha.node import init_node

    init_node(root, name=site.node_id, source=source)
    key_file = root / "keys" / "settlement.key"
    crypto.write_private_file(key_file, site.settlement_key.hex().encode(), overwrite=True)
    config = root / "node.toml"
    text = config.read_text(encoding="utf-8")
    text = text.replace('# labels = "labels.csv"', f'labels = "{labels}"')
    text = re.sub(r"(?m)^date_from = \S+", "date_from = 2000-01-01", text)
    text = re.sub(r"(?m)^modalities = .*$", f'modalities = ["{modality}"]', text)
    text = re.sub(r"(?m)^uid = \d+", f"uid = {uid}", text)
    if max_studies is not None:
        text = re.sub(r"(?m)^max_studies = \d+", f"max_studies = {max_studies}", text)
    if ratios is not None:
        text = re.sub(r"(?m)^ratios = .*$", f"ratios = {list(ratios)}", text)
    if ocr_disabled is not None:
        text = text.replace("[ocr.disabled]", f'[ocr.disabled]\n{modality} = "{ocr_disabled}"', 1)
    pinned = ", ".join(f'"{org}" = ["{path}"]' for org, path in trusted.items())
    extra = "".join(f"{name} = {_toml(value)}\n" for name, value in (policy or {}).items())
    for name in policy or {}:  # a value set here replaces the commented default
        text = re.sub(rf"(?m)^{re.escape(name)} = .*\n", "", text)
    text = text.replace("[policy]\n", f"[policy]\ntrusted_keys = {{ {pinned} }}\n{extra}", 1)
    values: dict[str, Any] = {
        "url": hub_url,
        "node_id": site.node_id,
        "environment": "demo",
        "attestation": "dev",
        "hospital_id": "0x" + site.hospital_id.hex(),
        "settlement_key": "keys/settlement.key",
        "payout": site.payout,
        "price_per_record": site.price_per_record,
        "poll_wait": 1,
        "heartbeat_seconds": 1,
        "backoff_initial": 0.2,
        "backoff_max": 1,
        "approvals": approvals,
        "keep_views": keep_views,
        **(link or {}),
    }
    text += "\n[hub]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
    config.write_text(text, encoding="utf-8")
    return config


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def agent_command(config: Path) -> list[str]:
    """``rapha node run --config CONFIG`` with this interpreter's ``rapha``."""
    return [str(Path(sys.executable).with_name("rapha")), "node", "run", "--config", str(config)]
