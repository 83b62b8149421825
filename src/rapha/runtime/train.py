"""The trusted training loop, with DP-SGD (Opacus) when the job or the hospital asks for it.

Runs inside the sandbox. For ``zoo`` models nothing but this code and the catalogue's runs;
for ``custom`` models the company's ``build_model`` shares the process, which is why
anything computed here is untrusted by the node: it uses only the weights written out,
and it computes the billed record count and the achieved ε itself
(:func:`rapha.runtime.dp.achieved_epsilon`) from the parameters it chose.

DP: the node picks the noise multiplier for the policy's target ε and δ
(:func:`rapha.runtime.dp.noise_multiplier`) and passes it in with the clipping norm.
Opacus then trains with Poisson sampling at rate ``1 / steps_per_epoch`` for exactly
``epochs * steps_per_epoch`` steps, the schedule the node's accountant assumes. A model
Opacus cannot train (BatchNorm, for instance) raises :class:`DPIncompatibleError` before
any step; it is never rewritten here, since that would change the weight names and
shapes the output guard checks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rapha.runtime.loader import RaphaDataLoader, RaphaDataset, masked_bce
from rapha.runtime.progress import ProgressWriter

__all__ = [
    "DPIncompatibleError",
    "DPSettings",
    "TrainReport",
    "evaluate_loss",
    "train_trusted",
    "validate_dp",
]


class DPIncompatibleError(Exception):
    """The model has layers DP-SGD cannot train; ``problems`` names them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class DPSettings:
    """What the node decided: the noise multiplier and the per-sample clipping norm."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass
class TrainReport:
    """Per-epoch mean training loss and validation loss (untrusted; for the operator only)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


def validate_dp(model: nn.Module) -> None:
    """Raise :class:`DPIncompatibleError` if Opacus cannot train ``model`` as it is."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise DPIncompatibleError(sorted({str(p) for p in problems}))


def _optimizer(model: nn.Module, hp: Mapping[str, Any]) -> torch.optim.Optimizer:
    name = hp["optimizer"]
    lr = float(hp["learning_rate"])
    decay = float(hp.get("weight_decay", 0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=float(hp.get("momentum", 0.0)), weight_decay=decay
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=decay)


def evaluate_loss(model: nn.Module, dataset: RaphaDataset, batch_size: int) -> float:
    """Mean masked BCE of ``model`` over ``dataset`` (NaN when it is empty)."""
    if len(dataset) == 0:
        return math.nan
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for images, targets in RaphaDataLoader(dataset, batch_size=batch_size):
            total += float(masked_bce(model(images), targets)) * len(images)
            count += len(images)
    return total / count


def train_trusted(
    model: nn.Module,
    train: RaphaDataset,
    val: RaphaDataset,
    hp: Mapping[str, Any],
    progress: ProgressWriter,
    *,
    dp: DPSettings | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> TrainReport:
    """Train ``model`` in place with the bundle's hyper-parameters ``hp`` (its ``[train]``)."""
    seed = int(hp["seed"])
    torch.manual_seed(seed)
    epochs = int(hp["epochs"])
    batch_size = int(hp["batch_size"])
    loader: Any = RaphaDataLoader(train, batch_size=batch_size, shuffle=True, seed=seed)
    optimizer = _optimizer(model, hp)
    trained: nn.Module = model
    if dp is not None:
        validate_dp(model)
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure RNG; noted in docs
            trained, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
            )
    steps_per_epoch = max(1, len(loader))
    total = epochs * steps_per_epoch
    report = TrainReport()
    step = 0
    for epoch in range(1, epochs + 1):
        trained.train()
        running, seen = 0.0, 0
        for images, targets in loader:
            step += 1
            if len(images) == 0:
                continue  # Poisson sampling drew an empty batch; it still counts as a step
            optimizer.zero_grad(set_to_none=True)
            loss = masked_bce(trained(images), targets)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            value = float(loss.detach())
            running += value * len(images)
            seen += len(images)
            progress.emit(epoch=epoch, epochs=epochs, step=step, steps=total, loss=value)
        report.train_loss.append(running / seen if seen else math.nan)
        report.val_loss.append(evaluate_loss(model, val, batch_size))
        progress.emit(epoch=epoch, epochs=epochs, step=step, steps=total, loss=report.val_loss[-1])
        if on_epoch is not None:
            on_epoch(epoch)
    return report
