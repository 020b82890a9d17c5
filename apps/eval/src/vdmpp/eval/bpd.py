"""``vdmpp-eval bpd``: VDM's variational bound in bits/dim on held-out data (vdmpp.losses.vlb).

Estimator. For each image, ``draws`` independent draws of (t, ε) of
``vdmpp.losses.bits_per_dim`` (continuous time; discrete with ``steps``) are averaged; the
reported bound is the mean over images and its standard error is the standard deviation of the
per-image estimates over √N, so it covers both the Monte-Carlo noise and the finite data set.

Importance distribution. The continuous-time term ½∫‖ε − ε̂‖²dλ is estimated with λ uniform on
[λ_min, λ_max] of the model (``vdmpp.schedules.LinearLogSNR``): unbiased for any density, and
a flat one has no vanishing p(λ) at the ends where an imperfect model's error is large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vdmpp.schedules import LinearLogSNR

from .model import EvalError, from_uint8

__all__ = ["BPDResult", "estimate_bpd"]


@dataclass
class BPDResult:
    bpd: float
    stderr: float
    prior: float
    reconstruction: float
    diffusion: float
    images: int
    draws: int
    steps: int | None
    per_image: np.ndarray | None = field(default=None, repr=False)  # bits/dim of each image

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "per_image"}


@torch.no_grad()
def estimate_bpd(
    model: Any,
    x: Tensor,
    *,
    logsnr_min: float,
    logsnr_max: float,
    parameterization: str = "eps",
    process: str = "vp",
    class_labels: Tensor | None = None,
    sigma_data: float = 0.5,
    draws: int = 1,
    steps: int | None = None,
    bits: int = 8,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> BPDResult:
    """Bits/dim of ``x`` (values on the ``bits``-bit grid in [−1, 1], [N, C, H, W])."""
    from vdmpp.losses import bits_per_dim

    if draws < 1:
        raise EvalError(f"--draws must be >= 1, got {draws}")
    if len(x) < 2:
        raise EvalError("bits/dim needs at least 2 images (for a standard error)")
    if not logsnr_min < logsnr_max:
        raise EvalError(f"need logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
    schedule = LinearLogSNR(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    device = next(iter(getattr(model, "parameters", lambda: iter([x]))()), x).device
    gen = torch.Generator(device=device).manual_seed(seed)
    n = len(x)
    acc = torch.zeros(4, n, dtype=torch.float64)  # prior, recon, diffusion, total
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=draws * n, unit="img", desc="bits/dim", dynamic_ncols=True)
    for _ in range(draws):
        for i in range(0, n, batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = class_labels[i : i + batch_size].to(device) if class_labels is not None else None
            terms = bits_per_dim(
                model,
                xb,
                schedule,
                steps=steps,
                parameterization=parameterization,
                process=process,
                class_labels=yb,
                bits=bits,
                sigma_data=sigma_data,
                generator=gen,
            )
            for j, v in enumerate(terms):
                acc[j, i : i + len(xb)] += v.detach().double().cpu()
            if bar is not None:
                bar.update(len(xb))
    if bar is not None:
        bar.close()
    per_image = acc / draws
    total = per_image[3]
    if not bool(torch.isfinite(total).all()):
        raise EvalError("the bound is not finite for some images (a diverged model?)")
    return BPDResult(
        bpd=float(total.mean()),
        stderr=float(total.std(unbiased=True) / math.sqrt(n)),
        prior=float(per_image[0].mean()),
        reconstruction=float(per_image[1].mean()),
        diffusion=float(per_image[2].mean()),
        images=n,
        draws=draws,
        steps=steps,
        per_image=total.numpy(),
    )


def bpd_of_export(model: Any, meta: dict, images: np.ndarray, labels: np.ndarray, **kw: Any):
    """The bound for an exported model on uint8 images [N, H, W, C] (8-bit data)."""
    res, ch = int(meta["resolution"]), int(meta["channels"])
    if images.shape[1:] != (res, res, ch):
        raise EvalError(
            f"data images are {images.shape[1:]} but the model takes {(res, res, ch)} (H, W, C)"
        )
    x = from_uint8(images, tuple(meta.get("data_range", (-1.0, 1.0))))
    y = None
    if meta.get("num_classes"):
        if (labels < 0).any():
            raise EvalError("the model is class-conditional but the data have no labels")
        y = torch.from_numpy(labels)
    # A Preconditioned model's forward returns its own parameterization; eps/x/v/edm all work.
    lo = float(meta.get("logsnr_min", meta.get("schedule", {}).get("logsnr_range", [-20, 20])[0]))
    hi = float(meta.get("logsnr_max", meta.get("schedule", {}).get("logsnr_range", [-20, 20])[1]))
    return estimate_bpd(
        model,
        x,
        logsnr_min=lo,
        logsnr_max=hi,
        parameterization=meta["parameterization"],
        process=meta["process"],
        class_labels=y,
        sigma_data=float(meta.get("sigma_data", 0.5)),
        **kw,
    )
