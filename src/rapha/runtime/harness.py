"""The in-sandbox entry point: train or predict, as the node's job spec says.

The node starts it inside :class:`~rapha.runtime.sandbox.Sandbox` with
``--spec /job/spec.json --progress-fd N``. The spec (written by the node, read-only
here) is JSON::

    {"mode": "train" | "predict", "manifest": {...}, "bundle": "/bundle",
     "weights": "/bundle/weights.safetensors", "out": "/out", "threads": 2,
     "train_dir": "/view/train", "val_dir": "/view/val",   # train
     "predict_dir": "/predict",                              # predict: pixels only
     "dp": {"noise_multiplier": 1.1, "max_grad_norm": 1.0} | null}

* **train** builds the model (the zoo's, or the bundle's ``build_model``), loads the
  bundle's weights strictly, trains it (the trusted loop, or the bundle's ``train`` when
  the manifest says ``loop = "custom"`` and the node allowed it) and writes
  ``out/weights.safetensors``.
* **predict** builds the model, loads the weights the node gives it, and writes
  ``out/predictions.npy``: float32 probabilities, one row per image of ``predict_dir``.

Exit codes the node reads (everything else is a failure of the model code):
:data:`EXIT_SPEC` (the spec is unusable: a node bug), :data:`EXIT_DP_INCOMPATIBLE` (the
model has layers DP-SGD cannot train; the list is on stderr), :data:`EXIT_WEIGHTS`
(the weights do not fit the model). Tracebacks go to stderr: the node shows them in full
in a dry-run and only as a class and code in production.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final

__all__ = [
    "EXIT_DP_INCOMPATIBLE",
    "EXIT_SPEC",
    "EXIT_WEIGHTS",
    "TrainContext",
    "TrainData",
    "main",
]

EXIT_SPEC: Final = 64
EXIT_DP_INCOMPATIBLE: Final = 65
EXIT_WEIGHTS: Final = 66
_BATCH: Final = 64


@dataclass(frozen=True)
class TrainData:
    """What a bundle's own ``train(model, data, hparams, ctx)`` gets as ``data``."""

    train: Any
    val: Any

    def loader(self, split: str, *, batch_size: int, shuffle: bool = False, seed: int = 0) -> Any:
        """A :class:`~rapha.runtime.loader.RaphaDataLoader` over ``"train"`` or ``"val"``."""
        from rapha.runtime.loader import RaphaDataLoader

        dataset = {"train": self.train, "val": self.val}[split]
        return RaphaDataLoader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed)


@dataclass(frozen=True)
class TrainContext:
    """``ctx`` of a bundle's ``train``: progress reporting and the thread count."""

    writer: Any
    threads: int
    device: str = "cpu"

    def progress(
        self, *, epoch: int, epochs: int, step: int, steps: int, loss: float | None = None
    ) -> None:
        """Report progress (numbers only, at most one event a second reaches the node)."""
        self.writer.emit(epoch=epoch, epochs=epochs, step=step, steps=steps, loss=loss)


def _build(manifest: Any, bundle: Path) -> tuple[Any, ModuleType | None]:
    if manifest.model.source.value == "zoo":
        from rapha.runtime.zoo import build_model

        return build_model(manifest), None
    from rapha.runtime._custom import build_custom_model, load_custom_module

    module = load_custom_module(bundle / "model.py")
    return build_custom_model(module, manifest), module


def _load_weights(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"the weights do not fit the model: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_WEIGHTS) from exc


def _save_weights(model: Any, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))


def _train(spec: dict[str, Any], manifest: Any, writer: Any) -> None:
    from rapha.runtime.loader import RaphaDataset
    from rapha.runtime.train import DPIncompatibleError, DPSettings, train_trusted

    bundle = Path(spec["bundle"])
    model, module = _build(manifest, bundle)
    _load_weights(model, Path(spec["weights"]))
    labels = manifest.labels
    datasets = [
        RaphaDataset(
            Path(spec[key]),
            names=labels.names,
            uncertain=labels.uncertain.value,
            missing=labels.missing.value,
            channels=manifest.input.channels,
            normalize=manifest.input.normalize.value,
        )
        for key in ("train_dir", "val_dir")
    ]
    hparams = manifest.to_json()["train"]
    if hparams["loop"] == "custom":
        train = getattr(module, "train", None)
        if not callable(train):
            raise TypeError("loop = 'custom' needs model.py to define train(model, data, hp, ctx)")
        ctx = TrainContext(writer=writer, threads=int(spec["threads"]))
        train(model, TrainData(*datasets), dict(hparams), ctx)
    else:
        dp = spec.get("dp")
        settings = DPSettings(**dp) if dp else None
        try:
            train_trusted(model, datasets[0], datasets[1], hparams, writer, dp=settings)
        except DPIncompatibleError as exc:
            print("DP-SGD cannot train this model as it is:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
            raise SystemExit(EXIT_DP_INCOMPATIBLE) from exc
    _save_weights(model, Path(spec["out"]) / "weights.safetensors")


def _predict(spec: dict[str, Any], manifest: Any) -> None:
    import numpy as np
    import torch

    from rapha.runtime.loader import RaphaDataLoader, RaphaDataset

    model, _ = _build(manifest, Path(spec["bundle"]))
    _load_weights(model, Path(spec["weights"]))
    dataset = RaphaDataset(
        Path(spec["predict_dir"]),
        names=manifest.labels.names,
        channels=manifest.input.channels,
        with_labels=False,
        normalize=manifest.input.normalize.value,
    )
    model.eval()
    rows = []
    with torch.no_grad():
        for images, _ in RaphaDataLoader(dataset, batch_size=_BATCH):
            rows.append(torch.sigmoid(model(images)).float().numpy())
    width = len(manifest.labels.names)
    scores = np.concatenate(rows) if rows else np.zeros((0, width), np.float32)
    np.save(Path(spec["out"]) / "predictions.npy", scores.astype(np.float32), allow_pickle=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job spec; return the process exit code (module docstring)."""
    parser = argparse.ArgumentParser(prog="rapha-harness")
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--progress-fd", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
        import torch

        from rapha.runtime.manifest import BundleManifest
        from rapha.runtime.progress import ProgressWriter

        manifest = BundleManifest.from_json(spec["manifest"])
        torch.set_num_threads(int(spec["threads"]))
        writer = ProgressWriter(args.progress_fd)
        mode = spec["mode"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"unusable job spec: {exc}", file=sys.stderr)
        return EXIT_SPEC
    try:
        if mode == "train":
            _train(spec, manifest, writer)
        elif mode == "predict":
            _predict(spec, manifest)
        else:
            print(f"unknown mode {mode!r}", file=sys.stderr)
            return EXIT_SPEC
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0
