"""EMA of the weights: the model that is sampled, exported and evaluated.

``EMA`` is EDM's (App. F): β per step from a half-life in images, β = 0.5^(batch/half-life),
or a fixed per-step ``decay``. Every EMA kind has the same small interface — ``module`` (the
averaged copy), ``update(model, step)``, ``state_dict()``/``load_state_dict()`` — so the trainer
and the checkpoint treat them alike.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """θ_ema ← β·θ_ema + (1 − β)·θ after every optimizer step; buffers are copied."""

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_images: int,
        halflife_images: float | None = None,
        decay: float = 0.9999,
    ) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        if halflife_images is not None:
            self.beta = 0.5 ** (batch_images / halflife_images)
        else:
            self.beta = float(decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """One EMA step towards ``model`` (``step``: the optimizer steps done, unused here)."""
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - self.beta)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (the checkpoint's ``ema`` entry, and what is exported)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
