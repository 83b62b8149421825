"""Load a custom bundle's ``model.py`` and build its network.

**This executes the company's code.** Call it only inside the sandbox (or on the company's
own machine, as ``rapha job init --custom`` does). On the node, :func:`check_model_source`
inspects the file without running it.

The contract of ``model.py`` (DESIGN.md, "Formats: Bundle"): a top-level
``build_model(spec) -> torch.nn.Module`` where ``spec`` is
:meth:`BundleManifest.to_json() <rapha.runtime.manifest.BundleManifest.to_json>`, returning
logits ``(batch, len(labels))``; optionally a top-level ``train(model, data, hparams, ctx)``
used when ``[train] loop = "custom"``.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Final

from rapha.errors import BundleFileError, ManifestError, SandboxError

if TYPE_CHECKING:
    from torch import nn

    from rapha.runtime.manifest import BundleManifest

__all__ = [
    "CUSTOM_MODULE_NAME",
    "build_custom_model",
    "check_model_source",
    "load_custom_module",
]

CUSTOM_MODULE_NAME: Final = "rapha_bundle_model"
_MAX_SOURCE_BYTES: Final = 1 << 20


def check_model_source(path: Path, *, needs_train: bool) -> None:
    """Check, without running it, that ``model.py`` parses and defines what is needed.

    Raises :class:`BundleFileError` (kind ``"invalid"``) for a file over 1 MiB, not UTF-8 or
    not valid Python, and :class:`ManifestError` when ``build_model`` (or, with
    ``needs_train``, ``train``) is not a top-level function.
    """
    raw = path.read_bytes()
    if len(raw) > _MAX_SOURCE_BYTES:
        raise BundleFileError(
            f"{path.name} is larger than {_MAX_SOURCE_BYTES} bytes", kind="invalid", path=path.name
        )
    try:
        tree = ast.parse(raw.decode("utf-8"), filename=path.name)
    except (UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise BundleFileError(
            f"{path.name} is not valid UTF-8 Python: {type(exc).__name__}; fix it and sign again",
            kind="invalid",
            path=path.name,
        ) from exc
    functions = {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    if "build_model" not in functions:
        raise ManifestError(
            f"{path.name} defines no top-level build_model(spec); a custom model needs one"
        )
    if needs_train and "train" not in functions:
        raise ManifestError(
            f'train.loop = "custom" but {path.name} defines no top-level '
            "train(model, data, hparams, ctx)"
        )


def load_custom_module(path: Path) -> ModuleType:
    """Import ``path`` as module :data:`CUSTOM_MODULE_NAME`, running its top-level code.

    Any exception the code raises becomes :class:`SandboxError` naming only its type (the
    message is the company's text and may be arbitrary).
    """
    spec = importlib.util.spec_from_file_location(CUSTOM_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise SandboxError(f"cannot load {path.name} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[CUSTOM_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(CUSTOM_MODULE_NAME, None)
        raise SandboxError(f"{path.name} raised {type(exc).__name__} while being imported") from exc
    return module


def build_custom_model(module: ModuleType, manifest: BundleManifest) -> nn.Module:
    """Call ``module.build_model(manifest.to_json())`` and check it returns an ``nn.Module``."""
    from torch import nn

    build = getattr(module, "build_model", None)
    if not callable(build):
        raise SandboxError("model.py defines no callable build_model(spec)")
    try:
        model = build(manifest.to_json())
    except Exception as exc:
        raise SandboxError(f"model.py build_model raised {type(exc).__name__}") from exc
    if not isinstance(model, nn.Module):
        raise SandboxError(
            f"model.py build_model returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model
