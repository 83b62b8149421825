"""The model zoo: architectures a company can name in ``bundle.toml`` instead of sending code.

A zoo bundle (``[model] source = "zoo"``) ships no Python, only a catalogue name, a few
allowlisted keyword arguments and ``weights.safetensors``; the node builds the network
itself with :func:`build_model`. Every entry builds a 2-D classifier that returns **logits**
of shape ``(batch, len(labels.names))`` for images ``(batch, input.channels, H, W)``.

``spatial_dims``, the input channels and the number of outputs come from ``[input]`` and
``[labels]``; they may not be given in ``model.kwargs``. Any other keyword argument must
be in the entry's allowlist, with the type and range stated there (:func:`check_zoo_kwargs`).

The zoo is MONAI-only (plus our own :class:`~rapha.runtime._smallcnn.SmallCNN`): torchvision
cannot be installed beside the CPU torch build we ship. MONAI is imported lazily inside the
builders because importing it takes seconds, and reading the catalogue (the hub, manifest
validation) must not need torch at all. ``pretrained`` weights are never downloaded: the
initial weights are always the bundle's ``weights.safetensors``.

DP-SGD (Opacus) needs per-sample gradients, which BatchNorm mixes across a batch: only
entries with ``dp_compatible`` set (``rapha.SmallCNN``) can be trained with ``dp = true``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from rapha.errors import ManifestError

if TYPE_CHECKING:
    from torch import nn

    from rapha.runtime.manifest import BundleManifest

__all__ = [
    "RESERVED_KWARGS",
    "ZOO",
    "KwargValue",
    "ZooEntry",
    "ZooParam",
    "build_model",
    "check_zoo_kwargs",
    "zoo_entry",
]

KwargValue = int | float | bool | str
"""The value types ``model.kwargs`` may hold (TOML scalars)."""

RESERVED_KWARGS: Final = frozenset(
    {
        "spatial_dims",
        "in_channels",
        "out_channels",
        "n_input_channels",
        "num_classes",
        "pretrained",
    }
)
"""Keyword arguments the node fills (or forbids); a bundle may never set them."""


@dataclass(frozen=True, slots=True)
class ZooParam:
    """One allowlisted keyword argument: its type, default and allowed values.

    ``kind`` is ``int``, ``float``, ``bool`` or ``str``. Numbers must lie in
    ``[low, high]``; strings must be one of ``choices``. An int is accepted for a float
    parameter; a bool is never accepted as a number.
    """

    kind: type
    default: KwargValue
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, field: str, value: object) -> KwargValue:
        """Return ``value`` (an int widened to float where needed) or raise ManifestError."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ManifestError(f"{field} must be true or false")
            return value
        if self.kind is str:
            if not isinstance(value, str) or value not in self.choices:
                raise ManifestError(f"{field} must be one of {', '.join(map(repr, self.choices))}")
            return value
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.kind is int and not is_int:
            raise ManifestError(f"{field} must be an integer")
        if self.kind is float and not (is_int or isinstance(value, float)):
            raise ManifestError(f"{field} must be a number")
        assert isinstance(value, int | float)
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise ManifestError(f"{field} must be between {self.low} and {self.high}")
        return float(value) if self.kind is float else value


Builder = Callable[[int, int, Mapping[str, KwargValue]], "nn.Module"]


@dataclass(frozen=True, slots=True)
class ZooEntry:
    """A catalogue entry: what it is, its allowlisted kwargs and how to build it.

    ``builder(in_channels, num_classes, kwargs)`` receives kwargs already checked by
    :func:`check_zoo_kwargs`. ``min_size`` is the smallest height or width the network
    accepts (its total down-sampling).
    """

    name: str
    description: str
    params: Mapping[str, ZooParam]
    builder: Builder
    min_size: int = 8
    dp_compatible: bool = False


def _any(kwargs: Mapping[str, KwargValue]) -> dict[str, Any]:
    """Checked kwargs, typed loosely for the third-party constructors they are passed to."""
    return dict(kwargs)


def _small_cnn(in_channels: int, num_classes: int, kwargs: Mapping[str, KwargValue]) -> nn.Module:
    from rapha.runtime._smallcnn import SmallCNN

    return SmallCNN(in_channels=in_channels, num_classes=num_classes, **_any(kwargs))


def _densenet121(in_channels: int, num_classes: int, kwargs: Mapping[str, KwargValue]) -> nn.Module:
    from monai.networks.nets.densenet import DenseNet121

    module: nn.Module = DenseNet121(
        spatial_dims=2, in_channels=in_channels, out_channels=num_classes, **_any(kwargs)
    )
    return module


def _resnet(depth: int) -> Builder:
    def build(in_channels: int, num_classes: int, kwargs: Mapping[str, KwargValue]) -> nn.Module:
        from monai.networks.nets.resnet import resnet18, resnet34

        factory = {18: resnet18, 34: resnet34}[depth]
        module: nn.Module = factory(
            spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes, **_any(kwargs)
        )
        return module

    return build


_DENSENET_PARAMS: Final = MappingProxyType(
    {
        "init_features": ZooParam(int, 64, 8, 128),
        "growth_rate": ZooParam(int, 32, 8, 64),
        "bn_size": ZooParam(int, 4, 1, 8),
        "dropout_prob": ZooParam(float, 0.0, 0.0, 0.9),
    }
)
_RESNET_PARAMS: Final = MappingProxyType(
    {
        "widen_factor": ZooParam(float, 1.0, 0.25, 4.0),
        "conv1_t_size": ZooParam(int, 7, 3, 7),
        "conv1_t_stride": ZooParam(int, 1, 1, 2),
        "no_max_pool": ZooParam(bool, False),
        "shortcut_type": ZooParam(str, "B", choices=("A", "B")),
    }
)

ZOO: Final[Mapping[str, ZooEntry]] = MappingProxyType(
    {
        "monai.DenseNet121": ZooEntry(
            "monai.DenseNet121",
            "MONAI DenseNet-121 (BatchNorm, ~7M parameters); inputs at least 32x32",
            _DENSENET_PARAMS,
            _densenet121,
            min_size=32,
        ),
        "monai.ResNet18": ZooEntry(
            "monai.ResNet18",
            "MONAI ResNet-18 (BatchNorm, ~11M parameters at widen_factor 1)",
            _RESNET_PARAMS,
            _resnet(18),
        ),
        "monai.ResNet34": ZooEntry(
            "monai.ResNet34",
            "MONAI ResNet-34 (BatchNorm, ~21M parameters at widen_factor 1)",
            _RESNET_PARAMS,
            _resnet(34),
        ),
        "rapha.SmallCNN": ZooEntry(
            "rapha.SmallCNN",
            "Rapha's 4-block GroupNorm CNN (~0.4M parameters at width 32); trains under DP-SGD",
            MappingProxyType(
                {
                    "width": ZooParam(int, 32, 8, 128),
                    "dropout": ZooParam(float, 0.0, 0.0, 0.9),
                }
            ),
            _small_cnn,
            dp_compatible=True,
        ),
    }
)
"""The catalogue, by the name a bundle uses in ``[model] name``."""


def zoo_entry(name: str) -> ZooEntry:
    """The catalogue entry called ``name``; ManifestError listing the names if unknown."""
    try:
        return ZOO[name]
    except KeyError:
        raise ManifestError(
            f"model.name {name!r} is not in the model zoo; use one of: {', '.join(sorted(ZOO))}"
        ) from None


def check_zoo_kwargs(name: str, kwargs: Mapping[str, object]) -> dict[str, KwargValue]:
    """Validate ``model.kwargs`` for zoo entry ``name``; return them (types normalised).

    Refuses reserved keys (:data:`RESERVED_KWARGS`), keys outside the entry's allowlist and
    values of the wrong type or range, naming the field ``model.kwargs.<key>``.
    """
    entry = zoo_entry(name)
    checked: dict[str, KwargValue] = {}
    for key, value in kwargs.items():
        field = f"model.kwargs.{key}"
        if key in RESERVED_KWARGS:
            raise ManifestError(
                f"{field} may not be given: the node fills it from [input] and [labels]"
            )
        param = entry.params.get(key)
        if param is None:
            allowed = ", ".join(sorted(entry.params)) or "none"
            raise ManifestError(f"{field} is not allowed for {name} (allowed: {allowed})")
        checked[key] = param.check(field, value)
    return checked


def build_model(manifest: BundleManifest) -> nn.Module:
    """Build the zoo network a manifest names, with freshly initialised weights.

    Only for ``[model] source = "zoo"`` (custom models are built inside the sandbox from
    the bundle's ``model.py``); load the bundle's weights into the result afterwards. The
    network returns logits ``(batch, len(manifest.labels.names))``.
    """
    if manifest.model.source.value != "zoo" or manifest.model.name is None:
        raise ManifestError(
            "build_model is for zoo models only; a custom model is built from model.py"
        )
    entry = zoo_entry(manifest.model.name)
    kwargs = check_zoo_kwargs(entry.name, manifest.model.kwargs)
    return entry.builder(manifest.input.channels, len(manifest.labels.names), kwargs)
