"""``rapha job dry-run`` end to end: real archive, real view, real sandbox, real guard.

The learning tests train on the synthetic archive's easiest finding (effusion) and need
the test AUROC, computed by the node, to reach 0.8. The evaluation test re-runs the trained
weights as an evaluate-only job on the same view and must reproduce the node's metrics.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapha.cli import app
from rapha.node.synthetic import CACHE_ENV
from rapha.runtime.sandbox import Sandbox

# Calibrated on 2 CPU cores: the effusion signal needs a few thousand images and about ten
# epochs before it shows (below that every model here stays near AUROC 0.5).
STUDIES = "3000"


def _sandbox_or_skip() -> None:
    try:
        Sandbox().ensure_available()
    except Exception as exc:  # any reason is shown in the skip
        pytest.skip(f"no usable sandbox here: {exc}")


def rapha(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _set(manifest: Path, **values: str) -> None:
    text = manifest.read_text()
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        assert count == 1, key
    manifest.write_text(text)


def make_bundle(root: Path, key: Path, *init: str, size: str = "64", **manifest: str) -> Path:
    code, out = rapha("job", "init", str(root), "--size", size, *init)
    assert code == 0, out
    if manifest:
        _set(root / "bundle.toml", **manifest)
        code, out = rapha("job", "weights", str(root))  # the model may have changed
        assert code == 0, out
    code, out = rapha("job", "sign", str(root), "--key", str(key))
    assert code == 0, out
    return root


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Iterator[Path]:
    """One synthetic archive per (studies, seed, side) for the whole run, all workers."""
    base = tmp_path_factory.getbasetemp()
    cache = (base if worker_id == "master" else base.parent) / "synthetic-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        yield cache


@pytest.fixture(scope="module")
def company_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("company") / "company.key"
    code, out = rapha("keygen", "--out", str(key))
    assert code == 0, out
    return key


def metrics_of(out: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((out / "outbox" / "metrics.json").read_text())
    return data


def effusion_auroc(out: Path) -> float:
    labels = metrics_of(out)["labels"]
    assert isinstance(labels, dict)
    auroc = labels["effusion"]["auroc"]
    assert isinstance(auroc, float)
    return auroc


def test_without_bubblewrap_nothing_runs(tmp_path: Path, company_key: Path) -> None:
    bundle = make_bundle(tmp_path / "b", company_key, "--zoo", "rapha.SmallCNN")

    code, out = rapha(
        "job", "dry-run", str(bundle), "--synthetic", "--out", str(tmp_path / "out"),
        "--bwrap", str(tmp_path / "no-such-bwrap"),
    )  # fmt: skip

    assert code == 10, out
    assert "never run without a sandbox" in " ".join(out.split())
    assert not (tmp_path / "out" / "work" / "synthetic").exists()
    assert not (tmp_path / "out" / "outbox").exists()


def test_a_node_whose_configured_bwrap_is_missing_refuses(
    tmp_path: Path, company_key: Path
) -> None:
    from rapha.node import init_node

    init_node(tmp_path / "node", name="no-sandbox")
    config = tmp_path / "node" / "node.toml"
    missing = tmp_path / "gone" / "bwrap"
    text = config.read_text()
    assert 'bwrap = "/usr/bin/bwrap"' in text  # node init writes the [sandbox] table
    config.write_text(text.replace('bwrap = "/usr/bin/bwrap"', f'bwrap = "{missing}"'))
    bundle = make_bundle(tmp_path / "b", company_key, "--zoo", "rapha.SmallCNN")

    code, out = rapha(
        "job", "dry-run", str(bundle), "--synthetic", "--config", str(config),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip

    assert code == 10, out
    assert "bwrap" in out
    assert "never run without a sandbox" in " ".join(out.split())
    assert not (tmp_path / "out" / "outbox").exists()


@pytest.mark.slow
def test_a_batchnorm_model_is_refused_for_dp_with_the_fix(
    tmp_path: Path, company_key: Path
) -> None:
    _sandbox_or_skip()
    bundle = make_bundle(tmp_path / "b", company_key, "--custom", epochs="1")
    model = bundle / "model.py"
    model.write_text(model.read_text().replace("nn.GroupNorm(8, c_out)", "nn.BatchNorm2d(c_out)"))
    assert rapha("job", "weights", str(bundle))[0] == 0
    assert rapha("job", "sign", str(bundle), "--key", str(company_key))[0] == 0

    code, out = rapha(
        "job", "dry-run", str(bundle), "--synthetic", "--studies", "300",
        "--out", str(tmp_path / "out"), "--dp-epsilon", "8",
    )  # fmt: skip

    flat = " ".join(out.split())
    assert code == 8, out
    assert "dp_incompatible" in flat
    assert "ModuleValidator.fix(model)" in flat
    assert "BatchNorm" in flat
    assert not (tmp_path / "out" / "outbox").exists()


@pytest.mark.slow
def test_a_dp_run_reports_its_epsilon(tmp_path: Path, company_key: Path) -> None:
    _sandbox_or_skip()
    bundle = make_bundle(
        tmp_path / "b", company_key, "--zoo", "rapha.SmallCNN", epochs="2", batch_size="32"
    )
    out = tmp_path / "out"

    code, text = rapha(
        "job", "dry-run", str(bundle), "--synthetic", "--studies", "300", "--out", str(out),
        "--dp-epsilon", "4",
    )  # fmt: skip

    assert code == 0, text
    dp = metrics_of(out)["dp"]
    assert isinstance(dp, dict)
    assert 0 < dp["epsilon"] <= 4.0
    assert dp["delta"] == pytest.approx(1e-5)
    assert dp["noise_multiplier"] > 0
    assert "DP-SGD: ε =" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("init", "size", "manifest"),
    [
        # DenseNet121's block layout (6, 12, 24, 16) with fewer features per layer, so it
        # trains on two CPU cores in minutes; the catalogue allows these kwargs.
        (
            ("--zoo", "monai.DenseNet121"),
            "64",
            {
                "epochs": "10",
                "learning_rate": "0.003",
                "kwargs": "{ init_features = 16, growth_rate = 8, bn_size = 2 }",
            },
        ),
        # The scaffold's custom CNN: at 10 epochs and lr 0.003 it reached 0.89-0.92 here,
        # but 0.72 once in CI (each run draws fresh node keys, hence a fresh split, and
        # fresh initial weights); 14 epochs at lr 0.002 gave 0.94, a margin for the tail.
        (("--custom",), "32", {"epochs": "14", "learning_rate": "0.002"}),
    ],
    ids=["zoo-densenet121", "custom-model"],
)
def test_a_model_learns_effusion_and_an_evaluation_job_reproduces_its_metrics(
    tmp_path: Path,
    company_key: Path,
    init: tuple[str, ...],
    size: str,
    manifest: dict[str, str],
) -> None:
    _sandbox_or_skip()
    bundle = make_bundle(tmp_path / "train", company_key, *init, size=size, **manifest)
    out = tmp_path / "out"

    code, text = rapha(
        "job", "dry-run", str(bundle), "--synthetic", "--studies", STUDIES, "--seed", "1",
        "--out", str(out),
    )  # fmt: skip

    assert code == 0, text
    assert sorted(p.name for p in (out / "outbox").iterdir()) == [
        "metrics.json",
        "weights.safetensors",
    ]
    assert effusion_auroc(out) >= 0.8

    # The same weights as an evaluate-only job on the same view: only metrics leave.
    evaluate = make_bundle(
        tmp_path / "evaluate", company_key, *init, "--kind", "evaluate", size=size,
        **({"kwargs": manifest["kwargs"]} if "kwargs" in manifest else {}),
    )  # fmt: skip
    shutil.copyfile(out / "outbox" / "weights.safetensors", evaluate / "weights.safetensors")
    rapha("job", "sign", str(evaluate), "--key", str(company_key))
    view = out / "work" / "synthetic" / "view"
    again = tmp_path / "again"

    code, text = rapha(
        "job", "dry-run", str(evaluate), "--view", str(view),
        "--private", str(view.with_name("private")), "--out", str(again),
    )  # fmt: skip

    assert code == 0, text
    assert [p.name for p in (again / "outbox").iterdir()] == ["metrics.json"]
    first, second = metrics_of(out), metrics_of(again)
    assert second["labels"] == first["labels"]
    assert second["overall"] == first["overall"]
    assert second["subgroups"] == first["subgroups"]
