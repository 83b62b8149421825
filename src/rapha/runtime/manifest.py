"""``bundle.toml``: the manifest of a bundle, parsed once into frozen, typed objects.

The format (DESIGN.md, "Formats: Bundle")::

    [bundle]
    name = "effusion-densenet"      # [a-z0-9][a-z0-9._-]{0,63}                   required
    version = "0.1.0"               # 1 to 3 dot-separated numbers, optional -/+ suffix  required
    kind = "train"                  # "train" | "evaluate"                         required
    [model]
    source = "zoo"                  # "zoo" | "custom"                             required
    name = "monai.DenseNet121"      # zoo only: a catalogue name (rapha.runtime.zoo) required
    kwargs = { }                    # zoo only: allowlisted per architecture        default {}
    [input]
    channels = 1                    # 1 or 3 (the grey-scale view is repeated)     default 1
    size = [64, 64]                 # height, width, each 8..1024                  required
    [labels]
    names = ["effusion"]            # non-empty, unique, [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}
    uncertain = "ignore"            # label value -1: "ignore" | "positive" | "negative"
    missing = "ignore"              # label absent: "ignore" | "negative"
    [train]                         # required for kind = "train", refused for "evaluate"
    loop = "trusted"                # "trusted" | "custom" (custom models with train() only)
    optimizer = "adam"              # "adam" | "adamw" | "sgd"
    learning_rate = 0.001           # (0, 10]
    weight_decay = 0.0              # [0, 1]
    momentum = 0.9                  # sgd only, [0, 1); default 0.9 for sgd
    epochs = 5                      # 1..1000
    batch_size = 32                 # 1..4096
    seed = 1                        # 0..2**31-1 (default 0)
    [privacy]                       # optional
    dp = false                      # the company asks for DP-SGD (train only)
    max_grad_norm = 1.0             # (0, 100]
    [outputs]                       # optional
    files = ["weights.safetensors"] # default ["weights.safetensors"] (train), [] (evaluate)

Validation is strict: unknown tables and keys are refused, and every
:class:`~rapha.errors.ManifestError` names the field (``train.epochs``). Cross-field rules:
``loop = "custom"`` needs ``source = "custom"``; ``dp = true`` needs a train job and, for a
zoo model, a DP-compatible entry; the input size must suit the zoo entry; evaluate jobs
declare no output files (the node writes their metrics itself).

:meth:`BundleManifest.to_json` gives the same structure as plain JSON (defaults filled in,
absent optional values left out); :meth:`BundleManifest.from_json` reads it back through
the same validation, so ``from_json(m.to_json()) == m``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from rapha import crypto
from rapha.errors import ManifestError
from rapha.runtime._fields import MISSING, Table
from rapha.runtime.zoo import ZOO, KwargValue, check_zoo_kwargs, zoo_entry

__all__ = [
    "MANIFEST_NAME",
    "MAX_LABELS",
    "BundleInfo",
    "BundleManifest",
    "InputSpec",
    "JobKind",
    "LabelSpec",
    "MissingPolicy",
    "ModelSource",
    "ModelSpec",
    "Normalize",
    "Optimizer",
    "OutputSpec",
    "PrivacySpec",
    "TrainLoop",
    "TrainSpec",
    "UncertainPolicy",
    "load_manifest",
    "parse_manifest",
]

MANIFEST_NAME: Final = "bundle.toml"
MAX_LABELS: Final = 64
_MAX_OUTPUTS: Final = 16
_MAX_MANIFEST_BYTES: Final = 64 * 1024

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VERSION_RE: Final = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){0,2}(?:[-+][0-9A-Za-z.-]{1,32})?")
_LABEL_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_FILE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class JobKind(StrEnum):
    """What the job does with hospital data."""

    TRAIN = "train"
    EVALUATE = "evaluate"


class ModelSource(StrEnum):
    """Where the network comes from: the node's zoo, or the bundle's ``model.py``."""

    ZOO = "zoo"
    CUSTOM = "custom"


class TrainLoop(StrEnum):
    """Who runs the training loop: the node's trusted loop or the bundle's ``train()``."""

    TRUSTED = "trusted"
    CUSTOM = "custom"


class Optimizer(StrEnum):
    """Optimizers the trusted loop offers."""

    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"


class Normalize(StrEnum):
    """How the loader scales each image before the model sees it."""

    PER_IMAGE = "per_image"  # zero mean, unit variance per image (the default)
    NONE = "none"  # the view's [0, 1] grey values as stored


class UncertainPolicy(StrEnum):
    """How a label value of -1 (uncertain) is used."""

    IGNORE = "ignore"
    POSITIVE = "positive"
    NEGATIVE = "negative"


class MissingPolicy(StrEnum):
    """How an absent label (no value) is used."""

    IGNORE = "ignore"
    NEGATIVE = "negative"


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """``[bundle]``: the bundle's name, version and job kind."""

    name: str
    version: str
    kind: JobKind


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """``[model]``: a zoo name with checked kwargs, or a custom ``model.py`` (name None)."""

    source: ModelSource
    name: str | None = None
    kwargs: Mapping[str, KwargValue] = field(default_factory=lambda: MappingProxyType({}))

    def __hash__(self) -> int:
        return hash((self.source, self.name, tuple(sorted(self.kwargs.items()))))


@dataclass(frozen=True, slots=True)
class InputSpec:
    """``[input]``: channels the model expects, the image size ``(height, width)`` and the
    per-image scaling the loader applies (``normalize``)."""

    channels: int
    size: tuple[int, int]
    normalize: Normalize = Normalize.PER_IMAGE

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return self.size[0]

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return self.size[1]


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """``[labels]``: label names (the model's output order) and the -1 / absent policies."""

    names: tuple[str, ...]
    uncertain: UncertainPolicy = UncertainPolicy.IGNORE
    missing: MissingPolicy = MissingPolicy.IGNORE


@dataclass(frozen=True, slots=True)
class TrainSpec:
    """``[train]``: hyper-parameters; ``momentum`` is set for SGD only."""

    loop: TrainLoop = TrainLoop.TRUSTED
    optimizer: Optimizer = Optimizer.ADAM
    learning_rate: float = 0.001
    weight_decay: float = 0.0
    momentum: float | None = None
    epochs: int = 5
    batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True, slots=True)
class PrivacySpec:
    """``[privacy]``: whether the company asks for DP-SGD, and its clipping norm."""

    dp: bool = False
    max_grad_norm: float = 1.0


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """``[outputs]``: file names the model code may write for the guard to check."""

    files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BundleManifest:
    """A validated ``bundle.toml``. ``train`` is set exactly when ``kind`` is train."""

    bundle: BundleInfo
    model: ModelSpec
    input: InputSpec
    labels: LabelSpec
    train: TrainSpec | None
    privacy: PrivacySpec
    outputs: OutputSpec

    def to_json(self) -> dict[str, Any]:
        """The manifest as a plain JSON-able dict, keyed like ``bundle.toml``."""
        model: dict[str, Any] = {"source": self.model.source.value}
        if self.model.name is not None:
            model |= {"name": self.model.name, "kwargs": dict(self.model.kwargs)}
        data: dict[str, Any] = {
            "bundle": {
                "name": self.bundle.name,
                "version": self.bundle.version,
                "kind": self.bundle.kind.value,
            },
            "model": model,
            "input": {
                "channels": self.input.channels,
                "size": list(self.input.size),
                "normalize": self.input.normalize.value,
            },
            "labels": {
                "names": list(self.labels.names),
                "uncertain": self.labels.uncertain.value,
                "missing": self.labels.missing.value,
            },
            "privacy": {"dp": self.privacy.dp, "max_grad_norm": self.privacy.max_grad_norm},
            "outputs": {"files": list(self.outputs.files)},
        }
        if self.train is not None:
            t = self.train
            train: dict[str, Any] = {
                "loop": t.loop.value,
                "optimizer": t.optimizer.value,
                "learning_rate": t.learning_rate,
                "weight_decay": t.weight_decay,
                "epochs": t.epochs,
                "batch_size": t.batch_size,
                "seed": t.seed,
            }
            if t.momentum is not None:
                train["momentum"] = t.momentum
            data["train"] = train
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BundleManifest:
        """Rebuild (and re-validate) a manifest from :meth:`to_json` output."""
        return _parse(data)


def parse_manifest(text: str) -> BundleManifest:
    """Parse and validate the text of a ``bundle.toml``; ManifestError names the field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{MANIFEST_NAME} is not valid TOML: {exc}") from exc
    return _parse(data)


def load_manifest(path: Path) -> BundleManifest:
    """Read and validate a ``bundle.toml`` file (at most 64 KiB, UTF-8)."""
    raw = crypto.read_bounded(
        path, limit=_MAX_MANIFEST_BYTES, what=MANIFEST_NAME, error=ManifestError
    )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{MANIFEST_NAME} is not UTF-8 text") from exc
    return parse_manifest(text)


# --- validation --------------------------------------------------------------------------

_TABLES: Final = ("bundle", "model", "input", "labels", "train", "privacy", "outputs")


def _parse(data: Mapping[str, Any]) -> BundleManifest:
    unknown = sorted(set(data) - set(_TABLES))
    loose = [k for k in unknown if not isinstance(data[k], Mapping)]
    if loose:
        raise ManifestError(
            f"unknown top-level key {loose[0]} in {MANIFEST_NAME}; every key belongs in a "
            f"table ({', '.join(f'[{t}]' for t in _TABLES)})"
        )
    if unknown:
        raise ManifestError(
            f"unknown table [{unknown[0]}] in {MANIFEST_NAME} (allowed: {', '.join(_TABLES)})"
        )
    for required in ("bundle", "model", "input", "labels"):
        if required not in data:
            raise ManifestError(f"[{required}] is required in {MANIFEST_NAME}")
    info = _parse_bundle(Table("bundle", data["bundle"]))
    model = _parse_model(Table("model", data["model"]))
    inputs = _parse_input(Table("input", data["input"]))
    labels = _parse_labels(Table("labels", data["labels"]))
    train = _parse_train(data, info.kind, model)
    privacy = _parse_privacy(Table("privacy", data.get("privacy", {})))
    outputs = _parse_outputs(Table("outputs", data.get("outputs", {})), info.kind)
    manifest = BundleManifest(info, model, inputs, labels, train, privacy, outputs)
    _check_cross_fields(manifest)
    return manifest


def _parse_bundle(t: Table) -> BundleInfo:
    name = t.string("name", _NAME_RE, what="lower-case letters, digits, '.', '_' or '-' (max 64)")
    version = t.string("version", _VERSION_RE, what='a version such as "0.1.0"')
    kind = t.choice("kind", JobKind)
    t.done()
    return BundleInfo(name, version, kind)


def _parse_model(t: Table) -> ModelSpec:
    source = t.choice("source", ModelSource)
    if source is ModelSource.CUSTOM:
        for key in ("name", "kwargs"):
            if t.has(key):
                raise ManifestError(
                    f"{t.field(key)} is only for zoo models; a custom model is built by model.py"
                )
        t.done()
        return ModelSpec(source)
    name = t.raw("name")
    if not isinstance(name, str):
        raise ManifestError("model.name must be a string naming a zoo model")
    zoo_entry(name)
    kwargs = t.raw("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise ManifestError("model.kwargs must be a table")
    t.done()
    return ModelSpec(source, name, MappingProxyType(check_zoo_kwargs(name, kwargs)))


def _parse_input(t: Table) -> InputSpec:
    channels = t.integer("channels", 1, 3, default=1)
    if channels not in (1, 3):
        raise ManifestError("input.channels must be 1 or 3")
    size = t.raw("size")
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise ManifestError("input.size must be [height, width], two integers")
    if not all(8 <= v <= 1024 for v in size):
        raise ManifestError("input.size values must be between 8 and 1024")
    normalize = t.choice("normalize", Normalize, Normalize.PER_IMAGE)
    t.done()
    return InputSpec(channels, (size[0], size[1]), normalize)


def _parse_labels(t: Table) -> LabelSpec:
    names = t.names("names", _LABEL_RE, limit=MAX_LABELS, default=MISSING)
    if not names:
        raise ManifestError("labels.names must name at least one label")
    uncertain = t.choice("uncertain", UncertainPolicy, UncertainPolicy.IGNORE)
    missing = t.choice("missing", MissingPolicy, MissingPolicy.IGNORE)
    t.done()
    return LabelSpec(tuple(names), uncertain, missing)


def _parse_train(data: Mapping[str, Any], kind: JobKind, model: ModelSpec) -> TrainSpec | None:
    if kind is JobKind.EVALUATE:
        if "train" in data:
            raise ManifestError('[train] is not allowed when bundle.kind = "evaluate"')
        return None
    if "train" not in data:
        raise ManifestError('[train] is required when bundle.kind = "train"')
    t = Table("train", data["train"])
    loop = t.choice("loop", TrainLoop, TrainLoop.TRUSTED)
    if loop is TrainLoop.CUSTOM and model.source is not ModelSource.CUSTOM:
        raise ManifestError('train.loop = "custom" needs model.source = "custom" (a model.py)')
    optimizer = t.choice("optimizer", Optimizer, Optimizer.ADAM)
    learning_rate = t.number("learning_rate", 0.001, low=0.0, high=10.0, low_open=True)
    weight_decay = t.number("weight_decay", 0.0, low=0.0, high=1.0)
    momentum: float | None = None
    if optimizer is Optimizer.SGD:
        momentum = t.number("momentum", 0.9, low=0.0, high=1.0)
        if momentum >= 1.0:
            raise ManifestError("train.momentum must be in [0, 1)")
    elif t.has("momentum"):
        raise ManifestError('train.momentum is only used with train.optimizer = "sgd"')
    epochs = t.integer("epochs", 1, 1000, default=5)
    batch_size = t.integer("batch_size", 1, 4096, default=32)
    seed = t.integer("seed", 0, 2**31 - 1, default=0)
    t.done()
    return TrainSpec(
        loop, optimizer, learning_rate, weight_decay, momentum, epochs, batch_size, seed
    )


def _parse_privacy(t: Table) -> PrivacySpec:
    dp = t.boolean("dp", False)
    max_grad_norm = t.number("max_grad_norm", 1.0, low=0.0, high=100.0, low_open=True)
    t.done()
    return PrivacySpec(dp, max_grad_norm)


def _parse_outputs(t: Table, kind: JobKind) -> OutputSpec:
    default = ["weights.safetensors"] if kind is JobKind.TRAIN else []
    files = t.names("files", _FILE_RE, limit=_MAX_OUTPUTS, default=default)
    if kind is JobKind.EVALUATE and files:
        raise ManifestError(
            "outputs.files must be empty for an evaluate job: the node computes and "
            "writes the metrics itself"
        )
    t.done()
    return OutputSpec(tuple(files))


def _check_cross_fields(m: BundleManifest) -> None:
    entry = zoo_entry(m.model.name) if m.model.name is not None else None
    if entry is not None and min(m.input.size) < entry.min_size:
        raise ManifestError(
            f"input.size must be at least {entry.min_size}x{entry.min_size} for {entry.name}"
        )
    if m.privacy.dp and m.bundle.kind is not JobKind.TRAIN:
        raise ManifestError('privacy.dp = true is only meaningful when bundle.kind = "train"')
    if m.privacy.dp and entry is not None and not entry.dp_compatible:
        dp_ready = ", ".join(sorted(n for n, e in ZOO.items() if e.dp_compatible))
        raise ManifestError(
            f"privacy.dp = true cannot train {entry.name} (BatchNorm mixes samples); "
            f"use {dp_ready} or a custom model with GroupNorm"
        )
