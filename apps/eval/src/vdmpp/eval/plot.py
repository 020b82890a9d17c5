"""``vdmpp-eval plot``: schedules as p(λ) and weightings as w(λ) (VDM++ Figures 2–3), and a
training run's adaptive density, per-λ-bin loss and training curves (loss, gradient norm,
learning rate, throughput against step) from its ``metrics.jsonl``. PNG files."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import torch

from .model import EvalError

__all__ = ["CURVES", "curve", "plot_run", "plot_schedules", "plot_weightings", "read_metrics"]

LAM = (-15.0, 15.0)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int = 601) -> torch.Tensor:
    return torch.linspace(LAM[0], LAM[1], n, dtype=torch.float64)


def plot_schedules(path: str | Path) -> Path:
    """p(λ) of VDM++ Table 4's schedules (cf. VDM++ Fig. 2)."""
    import vdmpp.schedules as S

    plt = _plt()
    lam = _grid()
    scheds = {
        "cosine": S.Cosine(),
        "cosine, shifted (d=128)": S.Cosine.for_resolution(128),
        "EDM training": S.EDMTraining(),
        "EDM sampling": S.EDMSampling(),
        "flow (OT)": S.FlowOT(),
        "linear VP (DDPM)": S.LinearVP(),
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in scheds.items():
        with torch.no_grad():
            ax.plot(lam.numpy(), s.pdf(lam).double().numpy(), label=name)
    ax.set(xlabel="log-SNR λ", ylabel="p(λ)", title="Noise schedules as densities over λ")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_weightings(path: str | Path) -> Path:
    """w(λ) of VDM++ Table 1's weightings, normalised to max 1 on the grid (cf. VDM++ Fig. 3)."""
    from vdmpp.losses import weightings as W

    plt = _plt()
    lam = _grid()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = [*plt.get_cmap("tab10").colors, "black", "olive", "navy"]  # > 10 weightings
    for i, name in enumerate(W.names()):
        try:
            w = W.get(name)(lam).double()
        except (TypeError, ValueError):  # a weighting that needs arguments
            continue
        # Equal curves (FlowOT and v-prediction are both e^{−λ/2}) stay visible: dashes alternate.
        ax.plot(
            lam.numpy(),
            (w / w.max()).numpy(),
            label=name,
            color=colors[i % len(colors)],
            linestyle="--" if i % 2 else "-",
        )
    ax.set(
        xlabel="log-SNR λ",
        ylabel="w(λ) / max w",
        yscale="log",
        ylim=(1e-4, 1.5),
        title="Weighting functions (implied by each objective)",
    )
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


# (metrics.jsonl key, axis title, log scale) of the training curves drawn against step
CURVES = (
    ("loss", "training loss (mean over the log interval)", True),
    ("grad_norm", "gradient norm (before clipping)", True),
    ("lr", "learning rate", False),
    ("images_per_s", "throughput (images/s)", False),
)


def read_metrics(run: str | Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` (or that file); a torn last line is skipped."""
    run = Path(run)
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics.is_file():
        raise EvalError(f"{metrics}: no metrics.jsonl (pass a vdmpp-train run directory)")
    recs = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if isinstance(rec, dict):
            recs.append(rec)
    if not recs:
        raise EvalError(f"{metrics}: no records")
    return recs


def curve(recs: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``; records without it or with a non-finite value are left out.
    A resumed run logs a step again: the later record wins."""
    by_step: dict[float, float] = {}
    for r in recs:
        v, s = r.get(key), r.get("step")
        if isinstance(v, int | float) and isinstance(s, int | float) and math.isfinite(v):
            by_step[s] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_run(run: str | Path, path: str | Path) -> Path:
    """A training run from ``RUN/metrics.jsonl``: its last adaptive density p(λ) and per-λ-bin
    loss (VDM++ App. F), and loss, gradient norm, learning rate and throughput against step."""
    recs = read_metrics(run)
    last = recs[-1]
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    a1, a2 = axes[0][0], axes[0][1]
    lo, hi = LAM
    bins = last.get("loss_per_logsnr_bin")
    if bins:
        lo, hi = bins["edges"][0], bins["edges"][-1]
        edges = bins["edges"]
        mids = [(a + b) / 2 for a, b in pairwise(edges)]
        pts = [(m, v) for m, v in zip(mids, bins["loss"]) if v is not None]
        if pts:
            a2.plot(*zip(*pts), marker="o")
    a2.set(xlabel="log-SNR λ", ylabel="loss", title=f"loss per λ bin (step {last.get('step')})")
    density = next((r["adaptive_density"] for r in reversed(recs) if "adaptive_density" in r), None)
    if density:
        n = len(density)
        width = (hi - lo) / n
        xs = [lo + (i + 0.5) * width for i in range(n)]
        a1.bar(xs, density, width=width)
        a1.set(title="adaptive schedule p(λ)")
    else:
        a1.text(0.5, 0.5, "no adaptive schedule in this run", ha="center", va="center")
    a1.set(xlabel="log-SNR λ", ylabel="p(λ)")
    for ax, (key, title, log) in zip([axes[0][2], *axes[1]], CURVES):
        steps, values = curve(recs, key)
        if steps:
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            if log and min(values) > 0:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, f"no {key} in metrics.jsonl", ha="center", va="center")
        ax.set(xlabel="step", ylabel=key, title=title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
