"""``vdmpp-eval plot``: schedules as p(λ) and weightings as w(λ) (VDM++ Figures 2–3), and a
training run's adaptive density and per-λ-bin loss from its ``metrics.jsonl``. PNG files."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import torch

from .model import EvalError

__all__ = ["plot_run", "plot_schedules", "plot_weightings"]

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
        ax.plot(lam.numpy(), (w / w.max()).numpy(), label=name, color=colors[i % len(colors)],
                linestyle="--" if i % 2 else "-")  # fmt: skip
    ax.set(xlabel="log-SNR λ", ylabel="w(λ) / max w", yscale="log", ylim=(1e-4, 1.5),
           title="Weighting functions (implied by each objective)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_run(run: str | Path, path: str | Path) -> Path:
    """The last adaptive density and per-λ-bin loss recorded in ``RUN/metrics.jsonl``."""
    run = Path(run)
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics.is_file():
        raise EvalError(f"{metrics}: no metrics.jsonl (pass a vdmpp-train run directory)")
    recs = []
    for line in metrics.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    if not recs:
        raise EvalError(f"{metrics}: no records")
    last = recs[-1]
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
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
    density = next((r["adaptive_density"] for r in reversed(recs) if "adaptive_density" in r),
                   None)
    if density:
        n = len(density)
        width = (hi - lo) / n
        xs = [lo + (i + 0.5) * width for i in range(n)]
        a1.bar(xs, density, width=width)
        a1.set(title="adaptive schedule p(λ)")
    else:
        a1.text(0.5, 0.5, "no adaptive schedule in this run", ha="center", va="center")
    a1.set(xlabel="log-SNR λ", ylabel="p(λ)")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
