"""rapha.runtime.manifest: bundle.toml parsed strictly into frozen, typed objects."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from rapha.errors import ManifestError
from rapha.runtime.manifest import (
    BundleManifest,
    JobKind,
    MissingPolicy,
    ModelSource,
    Optimizer,
    TrainLoop,
    UncertainPolicy,
    load_manifest,
    parse_manifest,
)

TRAIN_ZOO = """
[bundle]
name = "effusion-densenet"
version = "0.1.0"
kind = "train"
[model]
source = "zoo"
name = "monai.DenseNet121"
kwargs = { dropout_prob = 0.1 }
[input]
channels = 1
size = [64, 64]
[labels]
names = ["effusion", "edema"]
uncertain = "positive"
missing = "negative"
[train]
loop = "trusted"
optimizer = "sgd"
learning_rate = 0.01
weight_decay = 0.0001
momentum = 0.8
epochs = 3
batch_size = 16
seed = 7
[privacy]
dp = false
max_grad_norm = 2.0
"""

TRAIN_DP = """
[bundle]
name = "small"
version = "1.2"
kind = "train"
[model]
source = "zoo"
name = "rapha.SmallCNN"
kwargs = { width = 16 }
[input]
size = [32, 48]
[labels]
names = ["effusion"]
[train]
[privacy]
dp = true
"""

CUSTOM_LOOP = """
[bundle]
name = "own-loop"
version = "0.0.1-rc.1"
kind = "train"
[model]
source = "custom"
[input]
channels = 3
size = [128, 128]
[labels]
names = ["a", "b:c"]
[train]
loop = "custom"
optimizer = "adamw"
"""

EVALUATE = """
[bundle]
name = "effusion-eval"
version = "2.0.0"
kind = "evaluate"
[model]
source = "zoo"
name = "monai.ResNet18"
[input]
size = [64, 64]
[labels]
names = ["effusion"]
"""


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize("text", [TRAIN_ZOO, TRAIN_DP, CUSTOM_LOOP, EVALUATE])
def test_valid_manifests_round_trip_through_json(text: str) -> None:
    manifest = parse_manifest(text)

    data = manifest.to_json()

    assert json.loads(json.dumps(data)) == data
    assert BundleManifest.from_json(data) == manifest
    assert hash(BundleManifest.from_json(data)) == hash(manifest)


def test_fields_become_enums_and_typed_values() -> None:
    m = parse_manifest(TRAIN_ZOO)

    assert m.bundle.kind is JobKind.TRAIN
    assert m.model.source is ModelSource.ZOO
    assert dict(m.model.kwargs) == {"dropout_prob": 0.1}
    assert m.input.size == (64, 64)
    assert m.labels.names == ("effusion", "edema")
    assert m.labels.uncertain is UncertainPolicy.POSITIVE
    assert m.labels.missing is MissingPolicy.NEGATIVE
    assert m.train is not None
    assert m.train.optimizer is Optimizer.SGD
    assert m.train.momentum == 0.8
    assert m.outputs.files == ("weights.safetensors",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.bundle.name = "other"  # type: ignore[misc]


def test_defaults_are_filled_in() -> None:
    m = parse_manifest(TRAIN_DP)

    assert m.input.channels == 1
    assert m.labels.uncertain is UncertainPolicy.IGNORE
    assert m.train is not None
    assert (m.train.loop, m.train.optimizer, m.train.momentum) == (
        TrainLoop.TRUSTED,
        Optimizer.ADAM,
        None,
    )
    assert (m.train.learning_rate, m.train.epochs, m.train.batch_size) == (0.001, 5, 32)
    assert m.privacy.dp is True
    assert m.privacy.max_grad_norm == 1.0


def test_evaluate_has_no_train_and_no_output_files() -> None:
    m = parse_manifest(EVALUATE)

    assert m.train is None
    assert m.outputs.files == ()
    assert "train" not in m.to_json()


def test_load_manifest_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "bundle.toml"
    path.write_text(EVALUATE, encoding="utf-8")

    assert load_manifest(path) == parse_manifest(EVALUATE)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (_edit(TRAIN_ZOO, 'name = "effusion-densenet"', 'name = "Effusion"'), "bundle.name"),
        (_edit(TRAIN_ZOO, 'version = "0.1.0"', 'version = "v1"'), "bundle.version"),
        (_edit(TRAIN_ZOO, 'kind = "train"', 'kind = "predict"'), "bundle.kind"),
        (_edit(TRAIN_ZOO, 'source = "zoo"', 'source = "hub"'), "model.source"),
        (_edit(TRAIN_ZOO, '"monai.DenseNet121"', '"torchvision.resnet18"'), "model.name"),
        (_edit(TRAIN_ZOO, "dropout_prob = 0.1", "dropout_prob = 2.0"), "model.kwargs.dropout_prob"),
        (_edit(TRAIN_ZOO, "dropout_prob = 0.1", "act = 'relu'"), "model.kwargs.act"),
        (_edit(TRAIN_ZOO, "dropout_prob = 0.1", "in_channels = 3"), "model.kwargs.in_channels"),
        (_edit(TRAIN_ZOO, "dropout_prob = 0.1", "growth_rate = true"), "model.kwargs.growth_rate"),
        (_edit(TRAIN_ZOO, "channels = 1", "channels = 2"), "input.channels"),
        (_edit(TRAIN_ZOO, "size = [64, 64]", "size = [64]"), "input.size"),
        (_edit(TRAIN_ZOO, "size = [64, 64]", "size = [4, 64]"), "input.size"),
        (_edit(TRAIN_ZOO, "size = [64, 64]", "size = [16, 16]"), "input.size"),
        (_edit(TRAIN_ZOO, '["effusion", "edema"]', "[]"), "labels.names"),
        (_edit(TRAIN_ZOO, '["effusion", "edema"]', '["a", "a"]'), "labels.names"),
        (_edit(TRAIN_ZOO, '["effusion", "edema"]', '["bad name"]'), "labels.names[0]"),
        (_edit(TRAIN_ZOO, 'uncertain = "positive"', 'uncertain = "yes"'), "labels.uncertain"),
        (_edit(TRAIN_ZOO, 'missing = "negative"', 'missing = "positive"'), "labels.missing"),
        (_edit(TRAIN_ZOO, 'loop = "trusted"', 'loop = "custom"'), "train.loop"),
        (_edit(TRAIN_ZOO, 'optimizer = "sgd"', 'optimizer = "lbfgs"'), "train.optimizer"),
        (_edit(TRAIN_ZOO, "learning_rate = 0.01", "learning_rate = 0"), "train.learning_rate"),
        (_edit(TRAIN_ZOO, "learning_rate = 0.01", "learning_rate = nan"), "train.learning_rate"),
        (_edit(TRAIN_ZOO, "weight_decay = 0.0001", "weight_decay = 2"), "train.weight_decay"),
        (_edit(TRAIN_ZOO, "momentum = 0.8", "momentum = 1.0"), "train.momentum"),
        (_edit(TRAIN_DP, "[train]", "[train]\nmomentum = 0.5"), "train.momentum"),
        (_edit(TRAIN_ZOO, "epochs = 3", "epochs = 0"), "train.epochs"),
        (_edit(TRAIN_ZOO, "epochs = 3", "epochs = 3.0"), "train.epochs"),
        (_edit(TRAIN_ZOO, "batch_size = 16", "batch_size = 5000"), "train.batch_size"),
        (_edit(TRAIN_ZOO, "seed = 7", "seed = -1"), "train.seed"),
        (_edit(TRAIN_ZOO, "dp = false", 'dp = "no"'), "privacy.dp"),
        (_edit(TRAIN_ZOO, "dp = false", "dp = true"), "privacy.dp"),
        (_edit(TRAIN_ZOO, "max_grad_norm = 2.0", "max_grad_norm = 0.0"), "privacy.max_grad_norm"),
        (TRAIN_ZOO + '[outputs]\nfiles = ["../x"]\n', "outputs.files[0]"),
        (EVALUATE + '[outputs]\nfiles = ["weights.safetensors"]\n', "outputs.files"),
        (EVALUATE + "[train]\n", "[train]"),
        (_edit(TRAIN_ZOO, "[train]\n", "[trainer]\n"), "[trainer]"),
        (EVALUATE + "[privacy]\ndp = true\n", "privacy.dp"),
        (_edit(CUSTOM_LOOP, 'source = "custom"', 'source = "custom"\nname = "x"'), "model.name"),
        (_edit(EVALUATE, "[bundle]\n", ""), "top-level key kind"),
        (
            "[model]\nsource = 'custom'\n[input]\nsize = [8, 8]\n[labels]\nnames = ['a']\n",
            "[bundle]",
        ),
        (_edit(EVALUATE, 'version = "2.0.0"\n', ""), "bundle.version"),
    ],
)
def test_each_invalid_field_is_refused_by_name(text: str, field: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text)

    assert field in str(info.value)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (TRAIN_ZOO + "[extra]\nx = 1\n", "[extra]"),
        (_edit(TRAIN_ZOO, "channels = 1", "channels = 1\ncolour = true"), "input.colour"),
        (_edit(TRAIN_ZOO, "seed = 7", "seed = 7\nscheduler = 'cosine'"), "train.scheduler"),
        (_edit(EVALUATE, 'kind = "evaluate"', 'kind = "evaluate"\nowner = "x"'), "bundle.owner"),
    ],
)
def test_unknown_keys_are_refused(text: str, field: str) -> None:
    with pytest.raises(ManifestError, match="unknown") as info:
        parse_manifest(text)

    assert field in str(info.value)


def test_invalid_toml_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="not valid TOML"):
        parse_manifest("[bundle\nname = 1")


def test_from_json_validates_too() -> None:
    data = parse_manifest(EVALUATE).to_json()
    data["input"]["size"] = [64, 5000]

    with pytest.raises(ManifestError, match=r"input\.size"):
        BundleManifest.from_json(data)
