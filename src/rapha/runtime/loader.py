"""``RaphaDataset`` and ``RaphaDataLoader``: torch access to a view's splits, memory-mapped.

This runs inside the sandbox (it is what model code trains on) and on the node (to read
labels the same way). It reads only the view format (DESIGN.md, "Formats: View"):
``<split>/images.npy`` (N x H x W, uint8, uint16 or float16, value / scale in [0, 1]) and
``<split>/records.jsonl`` (row ``i`` is image ``i``), so it imports nothing of the node.

Labels become a float vector per record, one entry per finding the bundle names, under
its declared policies: 1 and 0 stay; an uncertain label (-1) becomes NaN (``ignore``), 1
(``positive``) or 0 (``negative``); a missing one (``None``) NaN (``ignore``) or 0
(``negative``). NaN means "not scored": :func:`masked_bce` leaves it out of the loss.

Batches are read with one fancy-indexing copy out of the memory map per batch
(``__getitems__``), not one Python call per image, so the loader costs the same as
indexing a numpy array; ``num_workers`` stays 0 (no worker processes to fork).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "SCALES",
    "RaphaDataLoader",
    "RaphaDataset",
    "encode_labels",
    "masked_bce",
]

SCALES: Final[Mapping[str, float]] = {"uint8": 255.0, "uint16": 65535.0, "float16": 1.0}
_UNCERTAIN: Final = {"ignore": np.nan, "positive": 1.0, "negative": 0.0}
_MISSING: Final = {"ignore": np.nan, "negative": 0.0}


def encode_labels(
    labels: Sequence[Mapping[str, Any] | None],
    names: Sequence[str],
    *,
    uncertain: str = "ignore",
    missing: str = "ignore",
) -> NDArray[np.float32]:
    """The (N, len(names)) float matrix of ``labels`` under the bundle's policies."""
    if uncertain not in _UNCERTAIN or missing not in _MISSING:
        raise ValueError("unknown label policy")
    out = np.full((len(labels), len(names)), np.nan, dtype=np.float32)
    for row, record in enumerate(labels):
        for col, name in enumerate(names):
            value = None if record is None else record.get(name)
            if value == 1:
                out[row, col] = 1.0
            elif value == 0:
                out[row, col] = 0.0
            elif value == -1:
                out[row, col] = _UNCERTAIN[uncertain]
            else:
                out[row, col] = _MISSING[missing]
    return out


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-record mean binary cross-entropy over the scored labels, averaged over records.

    Each record contributes the mean over its non-NaN labels (0 if none), so the batch loss
    is a mean of per-sample losses, which is what DP-SGD's per-sample clipping assumes.
    """
    mask = ~torch.isnan(targets)
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, safe, reduction="none")
    per_record = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_record.mean()


class RaphaDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One split of a view: ``(image C x H x W float32, labels float32[F])``.

    Images are the view's [0, 1] grey values, standardised per image (zero mean, unit
    variance) unless ``normalize="none"``: a faint finding then does not drown in the
    brightness differences between scanners. ``with_labels=False`` reads pixels only (the
    predict sandbox has no labels); its label tensors are all NaN. ``channels`` > 1
    repeats the grey channel.
    """

    def __init__(
        self,
        split_dir: Path,
        *,
        names: Sequence[str],
        uncertain: str = "ignore",
        missing: str = "ignore",
        channels: int = 1,
        with_labels: bool = True,
        normalize: str = "per_image",
    ) -> None:
        if normalize not in ("per_image", "none"):
            raise ValueError("normalize must be 'per_image' or 'none'")
        self.normalize = normalize
        split_dir = Path(split_dir)
        self.images: NDArray[Any] = np.load(
            split_dir / "images.npy", mmap_mode="r", allow_pickle=False
        )
        if self.images.ndim != 3 or self.images.dtype.name not in SCALES:
            raise ValueError(f"{split_dir}/images.npy is not an N x H x W view image array")
        self._scale = np.float32(SCALES[self.images.dtype.name])
        self.channels = channels
        self.names = tuple(names)
        if with_labels:
            rows = _read_labels(split_dir / "records.jsonl")
            if len(rows) != len(self.images):
                raise ValueError(f"{split_dir}: records.jsonl and images.npy disagree")
            self.labels = encode_labels(rows, self.names, uncertain=uncertain, missing=missing)
        else:
            self.labels = np.full((len(self.images), len(self.names)), np.nan, np.float32)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.asarray(indices, dtype=np.int64)
        pixels = np.asarray(self.images[np.sort(order)], dtype=np.float32) / self._scale
        pixels = pixels[np.argsort(np.argsort(order))]  # back to the requested order
        if self.normalize == "per_image":
            mean = pixels.mean(axis=(1, 2), keepdims=True)
            std = pixels.std(axis=(1, 2), keepdims=True)
            pixels = (pixels - mean) / np.maximum(std, np.float32(1e-3))
        batch = torch.from_numpy(pixels).unsqueeze(1)
        if self.channels > 1:
            batch = batch.expand(-1, self.channels, -1, -1).contiguous()
        return batch, torch.from_numpy(self.labels[order])


def _collate(batch: Any) -> Any:
    return batch  # __getitems__ already built the batch tensors


class RaphaDataLoader(DataLoader[tuple[torch.Tensor, torch.Tensor]]):
    """Batches of a :class:`RaphaDataset`, shuffled reproducibly from ``seed``."""

    def __init__(
        self,
        dataset: RaphaDataset,
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        generator = torch.Generator()
        generator.manual_seed(seed)
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
            num_workers=0,
            collate_fn=_collate,
        )


def _read_labels(path: Path) -> list[Mapping[str, Any] | None]:
    rows: list[Mapping[str, Any] | None] = []
    with path.open("rb") as fh:
        for line in fh:
            record = json.loads(line)
            labels = record.get("labels") if isinstance(record, dict) else None
            rows.append(labels if isinstance(labels, dict) else None)
    return rows
