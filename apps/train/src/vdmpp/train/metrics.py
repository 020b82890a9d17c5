"""The metrics of a run: one row per log interval in ``RUN/metrics.jsonl``, the same numbers as
TensorBoard scalars and one console/log line.

A row averages the steps since the previous row (the *window*): loss, grad norm, images/s, and
the loss per λ bin summed over every rank (VDM++ Fig. 5's view of where the loss lives).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import log as runlog

__all__ = [
    "TB_SCALARS",
    "LossBins",
    "MetricsLog",
    "lambda_spread",
    "schedule_extras",
    "schedule_spread",
]

TB_SCALARS = (
    "loss",
    "lr",
    "grad_norm",
    "images_per_s",
    "nonfinite_steps",
    "corrupt_samples",
    "lambda_std",
    "lambda_q05",
    "lambda_q95",
)


class LossBins:
    """Loss sums and counts over equal λ bins of the schedule's range, on the device.

    A learned schedule's ends are 0-d tensors: they stay on the device (``float()`` would be a
    host sync every step); a fixed schedule's are Python floats already.
    """

    def __init__(self, sched: Any, bins: int, device: torch.device) -> None:
        self.lo, self.hi = (
            v.detach().double() if torch.is_tensor(v) else float(v)
            for v in (sched.logsnr_min, sched.logsnr_max)
        )
        self.bins = bins
        self.acc = torch.zeros(2, bins, device=device, dtype=torch.float64)

    def add(self, lam: Tensor, loss: Tensor) -> None:
        k = ((lam.double() - self.lo) / (self.hi - self.lo) * self.bins).floor()
        k = k.clamp(0, self.bins - 1).long()
        self.acc[0].index_add_(0, k, torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0))
        self.acc[1].index_add_(0, k, torch.ones_like(loss))


class MetricsLog:
    """Window of the steps since the last row, and the sinks rows go to (rank 0 only)."""

    def __init__(
        self, out: Path, *, main: bool, every: int, bins: int, tensorboard: bool, warn: Any = None
    ) -> None:
        self.every, self.n_bins = every, bins
        self.file = open(out / "metrics.jsonl", "a") if main else None  # noqa: SIM115
        self.tb = _tensorboard(out, warn) if (tensorboard and main) else None
        self.t_start = time.time()
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.loss = self.gn = 0.0
        self.n = self.imgs = self.steps = 0
        self.bins: Tensor | None = None
        self.t = now

    def add(self, m: dict[str, Any], images: int) -> None:
        """Account one optimizer step (``m`` from ``Trainer.train_step``)."""
        if m["ok"]:
            self.loss += m["loss"]
            self.gn += m["grad_norm"]
            self.n += 1
        self.imgs += images
        self.steps += 1
        self.bins = m["bins"] if self.bins is None else self.bins + m["bins"]

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def write(
        self,
        step: int,
        steps: int,
        *,
        lr: float,
        bins: Tensor,
        extra: dict[str, Any],
        schedule: Any,
        log: Any,
    ) -> dict[str, Any] | None:
        """Rank 0: the row (window means + ``extra``) to the sinks and one line to ``log``;
        other ranks only reset their window. ``bins``: [2, n] loss sums and counts over equal
        λ bins of the schedule's range, reduced over ranks."""
        now = time.perf_counter()
        if self.file is None:
            self._reset(now)
            return None
        n = max(self.n, 1)
        dt = max(now - self.t, 1e-9)
        per_bin = (bins[0] / bins[1].clamp_min(1)).tolist()
        lo, hi = (
            float(torch.as_tensor(v).detach()) for v in (schedule.logsnr_min, schedule.logsnr_max)
        )
        edges = torch.linspace(lo, hi, self.n_bins + 1).tolist()
        rec: dict[str, Any] = {
            "step": step,
            "wall_time": time.time(),
            "elapsed_s": time.time() - self.t_start,
            "images": extra.pop("images"),
            "loss": self.loss / n if self.n else float("nan"),
            "lr": lr,
            "grad_norm": self.gn / n if self.n else float("nan"),
            "images_per_s": self.imgs / dt,
            "loss_per_logsnr_bin": {
                "edges": edges,
                "loss": [v if c > 0 else None for v, c in zip(per_bin, bins[1].tolist())],
            },
            **extra,
        }
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k in TB_SCALARS:
                self.tb.add_scalar(k, rec[k], step)
            self.tb.flush()
        steps_per_s = self.steps / dt
        left = (steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
        log(
            f"step {step}/{steps} | {rec['images_per_s']:.1f} img/s | loss {rec['loss']:.4g} | "
            f"grad norm {rec['grad_norm']:.3g} | lr {rec['lr']:.3g} | nonfinite "
            f"{rec['nonfinite_steps']} | corrupt {rec['corrupt_samples']} | λ std "
            f"{rec['lambda_std']:.2f} | ETA {runlog.eta(left)}"
        )
        self._reset(now)
        return rec

    def write_row(self, rec: dict[str, Any]) -> None:
        """Rank 0: one more row (e.g. in-training evaluation) to metrics.jsonl and TensorBoard."""
        if self.file is None:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k.startswith("eval_") and isinstance(v, float | int) and not isinstance(v, bool):
                    self.tb.add_scalar(k.replace("eval_", "eval/", 1), v, rec["step"])
            self.tb.flush()

    @staticmethod
    def truncate(out: Path, step: int) -> None:
        """Drop rows past ``step`` (a killed session's, beyond the checkpoint resumed from), so
        a resumed run has each row once."""
        from .fileio import write_atomic

        path = out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                if int(json.loads(line)["step"]) > step:
                    continue
            except (ValueError, KeyError, TypeError):
                continue  # the torn last line of a killed write: appending after it would
                # corrupt the next row
            keep.append(line)
        if len(keep) != len(lines):
            write_atomic(path, "".join(keep))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def schedule_spread(sched: Any, d: Any) -> float:
    """max − min over ranks of the adaptive bins (0: every rank holds the same schedule); a
    collective on every rank."""
    import torch.distributed as dist

    if not hasattr(sched, "ema"):
        return 0.0
    hi = sched.ema.detach().double().clone()
    lo = -hi
    if d.on:
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    return float((hi + lo).abs().max())


def schedule_extras(sched: Any, spread: float) -> dict[str, Any]:
    """The adaptive schedule's density p(λ) per bin and its spread over ranks (VDM++ App. F)."""
    if not hasattr(sched, "cdf"):
        return {}
    density = ((sched.cdf[1:] - sched.cdf[:-1]) / sched.width).tolist()
    return {"adaptive_rank_spread": spread, "adaptive_density": density}


def _tensorboard(out: Path, warn: Any) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if warn is not None:
            warn(
                "log.tensorboard = true but the tensorboard package is not installed: no "
                "TensorBoard scalars (pip install 'vdmpp-train[tensorboard]')"
            )
        return None
    return SummaryWriter(str(out / "tensorboard"))


@torch.no_grad()
def lambda_spread(sched: Any, device: torch.device, n: int = 512) -> dict[str, float]:
    """How widely the schedule spreads training over log-SNR: λ(t) for t ~ U(0, 1) has the
    schedule's density p(λ) (VDM++ §2, eq. 6), so the midpoint rule over t gives its mean
    and standard deviation, and λ(0.95), λ(0.5), λ(0.05) its 5 %, 50 % and 95 % quantiles
    (λ decreases in t). For the adaptive schedule this tracks p(λ) ∝ E[loss | λ] (VDM++
    App. F) as it moves. One host read, at a log interval only."""
    t = torch.cat(
        [
            (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n,
            torch.tensor([0.95, 0.5, 0.05], device=device),
        ]
    )
    lam = sched.logsnr(t).double()
    grid, q = lam[:n], lam[n:]
    mean, std, q05, q50, q95 = torch.cat(
        [grid.mean().reshape(1), grid.std(unbiased=False).reshape(1), q]
    ).tolist()
    return {
        "lambda_mean": mean,
        "lambda_std": std,
        "lambda_q05": q05,
        "lambda_q50": q50,
        "lambda_q95": q95,
    }
