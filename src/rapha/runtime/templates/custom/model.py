"""A custom Rapha model: the node imports this file inside its sandbox.

Contract (DESIGN.md, "Formats: Bundle"):

* ``build_model(spec)`` returns a ``torch.nn.Module`` mapping images
  ``(batch, channels, height, width)`` to logits ``(batch, number of labels)``. ``spec`` is
  the bundle manifest as a dict: ``spec["input"]["channels"]``, ``spec["input"]["size"]``,
  ``spec["labels"]["names"]`` …
* ``weights.safetensors`` in the bundle holds this model's ``state_dict()``; only tensors
  with exactly these names, shapes and dtypes may leave the hospital.
* Use GroupNorm (or no normalisation), never BatchNorm: DP-SGD needs per-sample gradients,
  and a hospital may require DP for every job.
* The sandbox has no network and no files beyond the job's view; import only torch, numpy
  and the standard library.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Net(nn.Module):
    """Four conv blocks (conv3x3, GroupNorm, ReLU, max-pool), global pool, linear."""

    def __init__(self, in_channels: int, num_labels: int, width: int = 32) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in (width, 2 * width, 4 * width, 8 * width):
            blocks += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(8, c_out),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x).mean(dim=(2, 3)))
        return logits


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The network for this bundle; called once per job with the manifest as a dict."""
    return Net(spec["input"]["channels"], len(spec["labels"]["names"]))


# Owning the training loop (only with `[train] loop = "custom"` in bundle.toml, and only
# where the hospital allows it). Uncomment and adapt to the harness interface; otherwise
# the node runs its own trusted loop with the [train] hyper-parameters.
#
# def train(model, data, hparams, ctx):
#     """Train `model` in place. `data.train` / `data.val` are RaphaDatasets yielding
#     (images, labels) with NaN labels where the bundle's policy says "ignore"; the node
#     keeps only the weights this leaves in `model`."""
#     from rapha.runtime.loader import masked_bce
#     optimizer = torch.optim.Adam(model.parameters(), lr=hparams["learning_rate"])
#     loader = data.loader("train", batch_size=hparams["batch_size"], shuffle=True,
#                          seed=hparams["seed"])
#     steps, step = hparams["epochs"] * len(loader), 0
#     for epoch in range(1, hparams["epochs"] + 1):
#         for images, labels in loader:
#             step += 1
#             optimizer.zero_grad()
#             loss = masked_bce(model(images), labels)
#             loss.backward()
#             optimizer.step()
#             ctx.progress(epoch=epoch, epochs=hparams["epochs"], step=step, steps=steps,
#                          loss=float(loss.detach()))
