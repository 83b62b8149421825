"""DP-SGD parameters the node computes itself: the noise for a target ε, and the ε achieved.

The sandbox is told the noise multiplier; it is never asked what ε it reached. The node
knows the schedule it imposed (Poisson sampling at rate ``q = 1 / steps_per_epoch``,
``epochs * steps_per_epoch`` steps, where ``steps_per_epoch = ceil(records / batch)``, as
Opacus's ``DPDataLoader`` does) and runs Opacus's RDP accountant over it, so the ε in
``metrics.json`` is the node's figure, not the model code's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from rapha.errors import PolicyError

__all__ = ["DPPlan", "plan_dp"]


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD schedule of one training run and the guarantee it gives."""

    target_epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    epsilon: float

    def to_json(self) -> dict[str, float | int | str]:
        return {
            "mechanism": "dp-sgd",
            "accountant": "rdp",
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "epsilon": round(self.epsilon, 4),
            "noise_multiplier": round(self.noise_multiplier, 6),
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }


def plan_dp(
    *,
    records: int,
    batch_size: int,
    epochs: int,
    target_epsilon: float,
    delta: float,
    max_grad_norm: float,
) -> DPPlan:
    """The noise multiplier reaching ``target_epsilon`` at ``delta``, and the ε it gives."""
    if records < 1 or batch_size < 1 or epochs < 1:
        raise PolicyError("DP-SGD needs at least one training record, batch and epoch")
    if not (0 < target_epsilon <= 100 and 0 < delta < 1):
        raise PolicyError("the DP policy needs 0 < epsilon <= 100 and 0 < delta < 1")
    if delta >= 1 / records:
        raise PolicyError(
            f"the DP policy's delta ({delta:g}) must be below 1/records (1/{records}); "
            "lower dp_delta in the hospital policy"
        )
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    steps_per_epoch = math.ceil(records / batch_size)
    sample_rate = 1 / steps_per_epoch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                epochs=epochs,
                accountant="rdp",
            )
        )
        accountant = RDPAccountant()
        accountant.history = [(sigma, sample_rate, epochs * steps_per_epoch)]
        epsilon = float(accountant.get_epsilon(delta))
    return DPPlan(
        target_epsilon=target_epsilon,
        delta=delta,
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        steps=epochs * steps_per_epoch,
        epsilon=epsilon,
    )
