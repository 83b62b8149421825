"""rapha.runtime.zoo: every catalogue entry builds a classifier giving (batch, labels) logits."""

from __future__ import annotations

import pytest
import torch

from rapha.errors import ManifestError
from rapha.runtime.manifest import BundleManifest, parse_manifest
from rapha.runtime.zoo import ZOO, build_model, check_zoo_kwargs, zoo_entry


def _manifest(name: str, *, channels: int, labels: int, kwargs: str = "{}") -> BundleManifest:
    names = ", ".join(f'"l{i}"' for i in range(labels))
    return parse_manifest(
        f"""
[bundle]
name = "zoo-test"
version = "0.1.0"
kind = "evaluate"
[model]
source = "zoo"
name = "{name}"
kwargs = {kwargs}
[input]
channels = {channels}
size = [32, 32]
[labels]
names = [{names}]
"""
    )


# One (channels, labels) pair per entry keeps this fast; together they cover 1 and 3 channels.
SHAPES = {
    "monai.DenseNet121": (1, 1),
    "monai.ResNet18": (3, 3),
    "monai.ResNet34": (1, 2),
    "rapha.SmallCNN": (3, 2),
}


def test_every_entry_is_exercised() -> None:
    assert set(SHAPES) == set(ZOO)


@pytest.mark.parametrize(("name", "channels", "labels"), [(n, *s) for n, s in SHAPES.items()])
def test_each_entry_gives_logits_per_label(name: str, channels: int, labels: int) -> None:
    torch.manual_seed(0)
    model = build_model(_manifest(name, channels=channels, labels=labels))
    model.eval()

    with torch.no_grad():
        out = model(torch.randn(2, channels, 32, 32))

    assert out.shape == (2, labels)
    assert torch.isfinite(out).all()


def test_small_cnn_honours_its_kwargs_and_trains_on_tiny_inputs() -> None:
    model = build_model(_manifest("rapha.SmallCNN", channels=1, labels=2, kwargs="{ width = 8 }"))

    out = model(torch.randn(3, 1, 8, 8))
    out.sum().backward()

    assert out.shape == (3, 2)
    assert model.head.in_features == 64  # type: ignore[union-attr]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_small_cnn_is_the_dp_entry() -> None:
    assert [n for n, e in ZOO.items() if e.dp_compatible] == ["rapha.SmallCNN"]


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("rapha.SmallCNN", {"depth": 3}, "model.kwargs.depth"),
        ("rapha.SmallCNN", {"width": 4}, "model.kwargs.width"),
        ("rapha.SmallCNN", {"width": 16.0}, "model.kwargs.width"),
        ("monai.DenseNet121", {"pretrained": True}, "model.kwargs.pretrained"),
        ("monai.DenseNet121", {"spatial_dims": 3}, "model.kwargs.spatial_dims"),
        ("monai.ResNet18", {"num_classes": 5}, "model.kwargs.num_classes"),
        ("monai.ResNet34", {"shortcut_type": "C"}, "model.kwargs.shortcut_type"),
        ("monai.ResNet18", {"no_max_pool": 1}, "model.kwargs.no_max_pool"),
    ],
)
def test_unknown_or_bad_kwargs_are_refused(
    name: str, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ManifestError) as info:
        check_zoo_kwargs(name, kwargs)

    assert field in str(info.value)


def test_kwargs_are_normalised() -> None:
    assert check_zoo_kwargs("monai.ResNet18", {"widen_factor": 1}) == {"widen_factor": 1.0}


def test_an_unknown_name_lists_the_catalogue() -> None:
    with pytest.raises(ManifestError, match=r"rapha\.SmallCNN"):
        zoo_entry("torchvision.resnet18")


def test_build_model_refuses_custom_bundles() -> None:
    manifest = parse_manifest(
        "[bundle]\nname='c'\nversion='1'\nkind='evaluate'\n[model]\nsource='custom'\n"
        "[input]\nsize=[8, 8]\n[labels]\nnames=['a']\n"
    )

    with pytest.raises(ManifestError, match="zoo models only"):
        build_model(manifest)


def test_small_cnn_passes_opacus_validation() -> None:
    from opacus.validators import ModuleValidator

    model = build_model(_manifest("rapha.SmallCNN", channels=1, labels=1))

    assert ModuleValidator.validate(model, strict=False) == []
