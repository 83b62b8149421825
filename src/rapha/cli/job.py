"""``rapha job …``: what an AI company types to prepare and sign a bundle.

``init`` scaffolds a working bundle (a commented ``bundle.toml``, initial
``weights.safetensors`` and, for ``--custom``, a ``model.py``); ``sign`` writes
``bundle.sig``. Exit codes are those of :class:`rapha.errors.ExitCode`: 2 for a usage
problem (a non-empty directory), 3 for a key file, 4 for a bundle the node would refuse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Annotated, Any

import typer
from rich.console import Console

from rapha import crypto
from rapha.cli._app import new_app
from rapha.cli.company import cancel, fetch, list_jobs, refund, status, submit, watch
from rapha.cli.dryrun import dry_run
from rapha.cli.job_report import report
from rapha.cli.verify import verify
from rapha.errors import UsageError
from rapha.runtime.bundle import (
    MODEL_NAME,
    SIGNATURE_NAME,
    WEIGHTS_NAME,
    key_fingerprint,
    sign_bundle,
)
from rapha.runtime.manifest import (
    MANIFEST_NAME,
    BundleManifest,
    JobKind,
    load_manifest,
    parse_manifest,
)
from rapha.runtime.zoo import ZOO

__all__ = ["app"]

console = Console()

app = new_app("AI companies: scaffold, sign and check a bundle before submitting it.")

_DEFAULT_ZOO = "monai.DenseNet121"
_TEMPLATES = "templates"

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout instead of text.")
]


@dataclass(frozen=True, slots=True)
class _Scaffold:
    manifest_text: str
    model_source: str | None


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Directory to create the bundle in (empty).")],
    zoo: Annotated[
        str | None,
        typer.Option(
            "--zoo",
            help=f"Zoo architecture ({', '.join(sorted(ZOO))}). Default: {_DEFAULT_ZOO}.",
        ),
    ] = None,
    custom: Annotated[
        bool, typer.Option("--custom", help="Write a model.py of your own instead of a zoo name.")
    ] = False,
    labels: Annotated[
        str, typer.Option("--labels", help="Comma-separated label names, in output order.")
    ] = "effusion",
    size: Annotated[int, typer.Option("--size", help="Image height and width in pixels.")] = 64,
    channels: Annotated[int, typer.Option("--channels", help="Input channels: 1 or 3.")] = 1,
    kind: Annotated[
        JobKind, typer.Option("--kind", help="train: train the model; evaluate: score it.")
    ] = JobKind.TRAIN,
    name: Annotated[
        str | None, typer.Option("--name", help="Bundle name. Default: from DIRECTORY.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Scaffold a working bundle: bundle.toml, weights.safetensors, and model.py (--custom)."""
    if custom and zoo is not None:
        raise UsageError("give either --zoo NAME or --custom, not both")
    scaffold = _render(
        name=name or _name_from(directory),
        kind=kind,
        zoo=None if custom else (zoo or _DEFAULT_ZOO),
        labels=[s.strip() for s in labels.split(",")],
        size=size,
        channels=channels,
        directory=directory,
    )
    manifest = parse_manifest(scaffold.manifest_text)
    _prepare(directory)
    written: list[Path] = []
    try:
        written.append(_write(directory / MANIFEST_NAME, scaffold.manifest_text))
        if scaffold.model_source is not None:
            written.append(_write(directory / MODEL_NAME, scaffold.model_source))
        with console.status("building the model and its initial weights …"):
            written.append(_write_weights(directory, manifest))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    files = sorted(p.name for p in written)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "directory": str(directory),
                    "files": files,
                    "kind": manifest.bundle.kind.value,
                    "model": manifest.model.name or "custom",
                },
                indent=2,
            )
        )
        return
    console.print(f"bundle scaffolded in {directory}: {', '.join(files)}", soft_wrap=True)
    if kind is JobKind.EVALUATE:
        console.print(
            f"[yellow]note:[/] replace {WEIGHTS_NAME} with your trained weights "
            "(same names, shapes and dtypes)",
            soft_wrap=True,
        )
    console.print("next steps:")
    console.print("  1. edit bundle.toml (and model.py) as you need", highlight=False)
    console.print(
        f"  2. rapha job sign {directory} --key company.key   "
        "(make a key with `rapha keygen --out company.key`)",
        soft_wrap=True,
        highlight=False,
    )
    console.print(
        f"  3. rapha job dry-run {directory}   (checks it as a node would)",
        soft_wrap=True,
        highlight=False,
    )


@app.command("sign")
def sign(
    directory: Annotated[Path, typer.Argument(help="Bundle directory to sign.")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key (PKCS#8 PEM, 0600).")],
    as_json: JsonOption = False,
) -> None:
    """Check the bundle as a node would, then write bundle.sig over its digest."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a bundle directory")
    private = crypto.load_private_key(key)
    digest = sign_bundle(directory, private)
    public = private.public_key()
    result: dict[str, Any] = {
        "digest": digest,
        "fingerprint": key_fingerprint(public),
        "public_key": crypto.public_key_bytes(public).hex(),
        "signature": str(directory / SIGNATURE_NAME),
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(f"signed {directory}: wrote {SIGNATURE_NAME}", soft_wrap=True)
    console.print(f"bundle digest:   {digest}", soft_wrap=True, highlight=False)
    console.print(f"key fingerprint: {result['fingerprint']}", highlight=False)
    console.print(f"public key (hex) for hospitals to pin: {result['public_key']}", soft_wrap=True)


@app.command("weights")
def weights(
    directory: Annotated[Path, typer.Argument(help="Bundle directory whose model changed.")],
) -> None:
    """Rebuild weights.safetensors from bundle.toml (and model.py), after you changed them.

    The initial weights are the bundle's contract: only tensors with their names, shapes
    and dtypes may come back. Run this after editing the model or its kwargs, then sign
    again. Trained weights for an evaluate job are yours to copy in instead.
    """
    manifest = load_manifest(directory / MANIFEST_NAME)
    path = _write_weights(directory, manifest)
    console.print(f"wrote {path}; sign the bundle again: rapha job sign {directory} --key …")


# --- helpers -----------------------------------------------------------------------------


def _name_from(directory: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", directory.resolve().name.lower()).strip("-._")
    return name[:64] or "my-bundle"


def _template(*parts: str) -> str:
    return resources.files("rapha.runtime").joinpath(_TEMPLATES, *parts).read_text("utf-8")


def _render(
    *,
    name: str,
    kind: JobKind,
    zoo: str | None,
    labels: list[str],
    size: int,
    channels: int,
    directory: Path,
) -> _Scaffold:
    if zoo is None:
        model_block = '# the network is built by model.py\nsource = "custom"\n'
    else:
        allowed = ", ".join(sorted(ZOO[zoo].params)) if zoo in ZOO else ""
        model_block = (
            '# "zoo" | "custom"\nsource = "zoo"\n'
            f"name = {json.dumps(zoo)}\n"
            f"# optional; allowed: {allowed}\nkwargs = {{}}\n"
        )
    train = kind is JobKind.TRAIN
    text = Template(_template("bundle.toml")).substitute(
        directory=directory,
        name=name,
        kind=kind.value,
        model_block=model_block,
        channels=channels,
        size=size,
        labels=", ".join(json.dumps(label) for label in labels),
        train_block=_template("train.toml") if train else "",
        outputs=json.dumps(WEIGHTS_NAME) if train else "",
    )
    model_source = _template("custom", MODEL_NAME) if zoo is None else None
    return _Scaffold(text, model_source)


def _prepare(directory: Path) -> None:
    if directory.exists():
        if not directory.is_dir():
            raise UsageError(f"{directory} exists and is not a directory")
        if any(directory.iterdir()):
            raise UsageError(f"{directory} is not empty; give a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _write_weights(directory: Path, manifest: BundleManifest) -> Path:
    """Build the model with the bundle's seed and save its state_dict (no metadata)."""
    import torch
    from safetensors.torch import save_file

    from rapha.runtime._custom import build_custom_model, load_custom_module
    from rapha.runtime.zoo import build_model

    torch.manual_seed(manifest.train.seed if manifest.train is not None else 0)
    if manifest.model.name is None:
        # The company's own code on the company's own machine: importing it is fine here.
        model = build_custom_model(load_custom_module(directory / MODEL_NAME), manifest)
    else:
        model = build_model(manifest)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = directory / WEIGHTS_NAME
    save_file(state, str(path))
    return path


app.command("dry-run")(dry_run)
app.command("verify")(verify)
app.command("report")(report)
app.command("submit")(submit)
app.command("watch")(watch)
app.command("fetch")(fetch)
app.command("refund")(refund)
app.command("list")(list_jobs)
app.command("status")(status)
app.command("cancel")(cancel)
