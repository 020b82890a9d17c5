"""EMA of the weights: the model that is sampled, exported and evaluated.

``EMA`` is EDM's (App. F): β per step from a half-life in images, β = 0.5^(batch/half-life),
or a fixed per-step ``decay``. Every EMA kind has the same small interface — ``module`` (the
averaged copy), ``update(model, step)``, ``state_dict()``/``load_state_dict()`` — so the trainer
and the checkpoint treat them alike.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["EMA", "PowerEMA", "build_ema"]


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

    def snapshot_due(self, step: int, checkpoint_due: bool) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        return {"kind": "standard", "beta": self.beta}


class PowerEMA:
    """EDM2's power-function EMA (§3.1, eq. 127): one profile per σ_rel in ``std``, snapshots of
    all of them in ``RUN/phema/`` every ``snapshot_every`` images for post-hoc reconstruction
    (``vdmpp-eval phema``, EDM2 App. C.3). ``module`` (sampled, exported) is the first profile.
    The math and the snapshot files live in :mod:`vdmpp.train.phema`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        std: list[float],
        batch_images: int,
        snapshot_every: float,
        directory: Path,
    ) -> None:
        from .phema import PowerFunctionEMA

        self.inner = PowerFunctionEMA(model, std)
        self.module = self.inner.emas[0]
        self.batch_images = batch_images
        self.snapshot_every = snapshot_every
        self.directory = directory

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in ``model`` after optimizer step ``step`` (images seen: step × batch)."""
        self.inner.update(model, step * self.batch_images, self.batch_images)

    def snapshot_due(self, step: int, checkpoint_due: bool) -> bool:
        """Whether step ``step`` crosses a snapshot boundary (or, with no interval, checkpoints)."""
        if self.inner.cur_nimg <= 0:
            return False
        if self.snapshot_every <= 0:
            return checkpoint_due
        n, b = step * self.batch_images, self.batch_images
        return int(n // self.snapshot_every) > int((n - b) // self.snapshot_every)

    def save_snapshot(self) -> Path:
        """``RUN/phema/phema-<images>.pt`` written atomically (rank 0)."""
        from .phema import save_snapshot

        return save_snapshot(self.directory, self.inner.snapshot())

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        """What model.json records about the exported EMA."""
        return {"kind": "power", "std": self.inner.std[0], "tracked_std": list(self.inner.std)}


def build_ema(cfg: Any, model: nn.Module, batch_images: int, out: Path) -> EMA | PowerEMA:
    """The EMA ``cfg.ema.kind`` names."""
    e = cfg.ema
    if e.kind == "power":
        return PowerEMA(
            model,
            std=list(e.std),
            batch_images=batch_images,
            snapshot_every=e.snapshot_every_images,
            directory=out / "phema",
        )
    return EMA(model, batch_images=batch_images, halflife_images=e.halflife_images, decay=e.decay)
