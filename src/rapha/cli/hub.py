"""``rapha hub …``: what the hub's operator types.

``init`` writes a ``hub.toml`` with fresh secrets; ``serve`` runs the API (uvicorn);
``admin …`` acts on the hub's database directly, as the operator on the hub's host. Every
admin action is recorded in the hub's audit trail (``admin audit`` prints it).
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rapha import crypto
from rapha.cli._app import new_app
from rapha.config import load_settings
from rapha.errors import UsageError

__all__ = ["app"]

console = Console()
app = new_app("The hub's operator: set up, serve, and administer the hub.")
admin = new_app("Operator actions on the hub's database (each one is audited).")
app.add_typer(admin, name="admin")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="hub.toml (see rapha hub init).")
]
DbOption = Annotated[str | None, typer.Option("--db", help="Database URL (overrides hub.toml).")]
EnvOption = Annotated[str, typer.Option("--env", help="demo or production.")]


def _settings(config: Path | None, **overrides: Any) -> Any:
    from rapha.hub.settings import HubSettings

    given = {k: v for k, v in overrides.items() if v is not None}
    settings = load_settings(HubSettings, config, overrides=given)
    if config is not None and not settings.signing_key.is_absolute():
        settings = settings.model_copy(
            update={"signing_key": (config.parent / settings.signing_key).resolve()}
        )
    return settings


def _hub(config: Path | None, db: str | None) -> Any:
    from rapha.hub.db import open_database
    from rapha.hub.services import Hub

    settings = _settings(config, database_url=db)
    return Hub(open_database(settings.database_url), pepper=settings.api_key_pepper)


def _environment(value: str) -> Any:
    if value not in ("demo", "production"):
        raise UsageError("--env must be demo or production")
    return value


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Directory for hub.toml and the hub key.")],
) -> None:
    """Write hub.toml with a random API-key pepper and a new hub signing key (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "hub.toml"
    if config.exists():
        raise UsageError(f"{config} exists already; edit it instead")
    key_path = directory / "hub.key"
    crypto.save_private_key(crypto.generate_private_key(), key_path)
    pepper = secrets.token_urlsafe(48)
    crypto.write_private_file(
        config,
        (
            "# Rapha hub settings (docs/operator.md). Keep this file private: it holds the\n"
            "# API-key pepper; losing it invalidates every API key.\n"
            'host = "127.0.0.1"\n'
            "port = 8700\n"
            f'database_url = "sqlite:///{(directory / "hub.db").resolve()}"\n'
            'chain = "embedded"\n'
            f'api_key_pepper = "{pepper}"\n'
            'signing_key = "hub.key"\n'
            f'artifacts = "{(directory / "artifacts").resolve()}"\n'
        ).encode(),
    )
    console.print(f"wrote {config} and {key_path}")
    console.print(f"next: rapha hub admin create-org OPERATOR --role operator --config {config}")


@app.command("serve")
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option("--host", help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Listen port.")] = None,
    db: DbOption = None,
    chain: Annotated[
        str | None, typer.Option("--chain", help="embedded or a JSON-RPC URL.")
    ] = None,
) -> None:
    """Run the hub's HTTP API and its background loop (migrating the database first)."""
    import uvicorn

    from rapha.hub.server import build_server

    settings = _settings(config, host=host, port=port, database_url=db, chain=chain)
    server = build_server(settings)
    terms = f"chain {server.chain.chain_id}, vault {server.vault.address}"
    console.print(
        f"rapha hub on http://{settings.host}:{settings.port} ({server.hub.db.dialect}; {terms})",
        highlight=False,
    )
    server.worker.start()
    try:
        uvicorn.run(server.app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        server.close()


@admin.command("create-org")
def create_org(
    name: Annotated[str, typer.Argument(help="Organisation name.")],
    role: Annotated[str, typer.Option("--role", help="company, hospital or operator.")],
    wallet: Annotated[
        str | None, typer.Option("--wallet", help="Company wallet or hospital payout address.")
    ] = None,
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """Create an organisation."""
    from rapha.hub.db import Role
    from rapha.hub.services import SYSTEM

    try:
        parsed = Role(role)
    except ValueError as exc:
        raise UsageError("--role must be company, hospital or operator") from exc
    org_id = _hub(config, db).create_org(SYSTEM, name, parsed, wallet=wallet)
    console.print(f"created {parsed.value} {name} ({org_id})")


@admin.command("create-key")
def create_key(
    org: Annotated[str, typer.Argument(help="Organisation name.")],
    env: EnvOption = "demo",
    label: Annotated[str, typer.Option("--label", help="What the key is for.")] = "",
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """Create an API key; its token is printed once and never stored."""
    from rapha.hub.services import SYSTEM

    key = _hub(config, db).create_key(SYSTEM, org, _environment(env), label=label)
    console.print(f"key {key.key_id} for {org} ({key.environment}); store it now:")
    typer.echo(key.token)


@admin.command("revoke-key")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="The key id (the part after rk_ENV_).")],
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """Revoke an API key at once."""
    from rapha.hub.services import SYSTEM

    _hub(config, db).revoke_key(SYSTEM, key_id)
    console.print(f"revoked {key_id}")


@admin.command("enroll-node")
def enroll_node(
    node_id: Annotated[str, typer.Argument(help="The node's id.")],
    org: Annotated[str, typer.Option("--org", help="The hospital organisation.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The node's key (PEM).")],
    env: EnvOption = "demo",
    kind: Annotated[str, typer.Option("--kind", help="dev (demo only), tpm2 or sgx-dcap.")] = "dev",
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """Enrol a node's attestation identity (tpm2 nodes enrol from the node agent)."""
    from rapha.hub.services import SYSTEM

    if kind not in ("dev", "sgx-dcap"):
        raise UsageError(
            "only dev and sgx-dcap nodes enrol from here; a tpm2 node must answer a "
            "credential challenge, which its agent does when it first connects"
        )
    try:
        pem = public_key.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {public_key}: {exc.strerror}") from exc
    _hub(config, db).enroll_node(
        SYSTEM,
        node_id=node_id,
        org_name=org,
        public_key_pem=pem,
        environment=_environment(env),
        kind=kind,
    )
    console.print(f"enrolled {node_id} ({kind}, {env}) for {org}")


@admin.command("allow-measurement")
def allow_measurement(
    measurement: Annotated[str, typer.Argument(help="Digest from rapha node measure.")],
    env: EnvOption = "production",
    note: Annotated[str, typer.Option("--note", help="Which release this is.")] = "",
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """Allowlist a golden measurement for an environment."""
    from rapha.hub.services import SYSTEM

    _hub(config, db).allow_measurement(SYSTEM, _environment(env), measurement, note)
    console.print(f"allowed {measurement[:16]}… for {env}")


@admin.command("list-nodes")
def list_nodes(
    config: ConfigOption = None,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List enrolled nodes."""
    from rapha.hub.services import SYSTEM

    nodes = _hub(config, db).list_nodes(SYSTEM)
    if as_json:
        typer.echo(json.dumps([n.to_json() for n in nodes], indent=2))
        return
    table = Table("node", "hospital", "environment", "kind", "activated")
    for node in nodes:
        table.add_row(node.id, node.org, node.environment, node.kind, str(node.activated))
    console.print(table)


@admin.command("list-jobs")
def list_jobs(
    config: ConfigOption = None,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every job of every company, with its state and node (an audited read)."""
    from rapha.hub.jobs import JobService
    from rapha.hub.services import SYSTEM

    jobs = JobService(_hub(config, db).db).list_jobs(SYSTEM)
    if as_json:
        typer.echo(json.dumps([j.to_json() for j in jobs], indent=2))
        return
    table = Table("job", "state", "environment", "kind", "node", "attempts", "detail")
    for job in jobs:
        table.add_row(job.id, job.state.value, job.environment, job.kind, job.node_id or "—",
                      str(job.attempts), job.failure or job.explanation)  # fmt: skip
    console.print(table)


@admin.command("register-hospital-payout")
def register_hospital_payout(
    hospital: Annotated[str, typer.Argument(help="The hospital organisation.")],
    payout: Annotated[str, typer.Option("--payout", help="Its payout address (0x…).")],
    signer: Annotated[
        str, typer.Option("--signer", help="Address of its settlement key (the node signs).")
    ],
    owner_key: Annotated[
        Path, typer.Option("--owner-key", help="The vault owner's key file (hex, 0600).")
    ],
    hospital_id: Annotated[
        str | None,
        typer.Option("--hospital-id", help="0x + 64 hex; default keccak256(hospital name)."),
    ] = None,
    rpc: Annotated[
        str | None, typer.Option("--rpc", help="The chain's JSON-RPC URL (default: chain).")
    ] = None,
    vault: Annotated[
        str | None, typer.Option("--vault", help="The vault's address (default: vault).")
    ] = None,
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """Register (or change) a hospital's payout and settlement signer in the vault.

    The change is proposed now and takes effect after the vault's registry timelock; the
    hub records the payout as the hospital's wallet at once (receipts must name it).
    """
    from eth_account import Account
    from eth_utils.crypto import keccak

    from rapha import crypto
    from rapha.client.escrow import rpc_chain
    from rapha.hub.services import SYSTEM
    from rapha.ledger import ClearingVault

    settings = _settings(config, database_url=db)
    url = rpc or (settings.chain if settings.chain != "embedded" else None)
    address = vault or settings.vault
    if url is None or address is None:
        raise UsageError("give --rpc and --vault (or chain and vault in hub.toml): the "
                         "embedded chain lives inside the hub process")  # fmt: skip
    if hospital_id is not None and not re.fullmatch(r"0x[0-9a-f]{64}", hospital_id):
        raise UsageError("--hospital-id must be 0x followed by 64 lower-case hex digits")
    ident = bytes.fromhex(hospital_id[2:]) if hospital_id else keccak(text=hospital)
    hub = _hub(config, db)
    hub.org_id(hospital)  # refuses an unknown organisation before any transaction
    owner = Account.from_key(crypto.load_secret_hex(owner_key, length=32, what="owner key"))
    chain = rpc_chain(url)
    contract = ClearingVault(chain, chain.contract("ClearingVault", address))
    result = contract.propose_hospital(owner, ident, payout=payout, signer=signer)
    delay = int(chain.call(contract.contract.functions.registry_delay()))
    hub.set_wallet(SYSTEM, hospital, payout)
    console.print(
        f"proposed {hospital} (id 0x{ident.hex()}): payout {payout}, signer {signer} in "
        f"transaction 0x{result.tx_hash.hex()}; it takes effect in {delay} s",
        highlight=False,
        soft_wrap=True,
    )


@admin.command("audit")
def audit(config: ConfigOption = None, db: DbOption = None) -> None:
    """Print the hub's audit trail of operator actions, oldest first (JSON lines)."""
    for action in _hub(config, db).operator_actions():
        typer.echo(json.dumps(action, sort_keys=True))
