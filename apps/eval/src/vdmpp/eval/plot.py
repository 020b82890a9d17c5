"""``vdmpp-eval plot``: schedules as p(λ) and weightings as w(λ) (VDM++ Figures 2–3), and a
training run's adaptive density, per-λ-bin loss and training curves (loss, gradient norm,
learning rate, throughput against step) from its ``metrics.jsonl``, its learned uncertainty
e^{u(λ)} (EDM2 eq. 21, from ``RUN/export/model.json``) and its in-training evaluation rows
(``eval_value``/``eval_metric``, ``eval_bpd``; ``RUN/best.json``'s step marked). PNG files."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import torch

from .model import EvalError

__all__ = [
    "CURVES",
    "curve",
    "draw_run",
    "plot_run",
    "plot_schedules",
    "plot_weightings",
    "read_metrics",
    "run_panels",
]

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


def _uncertainty(run: Path) -> tuple[list[float], list[float]] | None:
    """(λ, u(λ)) of ``RUN/export/model.json``'s ``uncertainty`` (EDM2 eq. 21), if any."""
    path = run / "export" / "model.json" if run.is_dir() else None
    if path is None or not path.is_file():
        return None
    try:
        u = json.loads(path.read_text()).get("uncertainty")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if not isinstance(u, dict):
        return None
    lam, val = u.get("logsnr"), u.get("u")
    ok = (
        isinstance(lam, list)
        and isinstance(val, list)
        and len(lam) == len(val) > 0
        and all(isinstance(v, int | float) and math.isfinite(v) for v in [*lam, *val])
    )
    return ([float(v) for v in lam], [float(v) for v in val]) if ok else None


def _best_step(run: Path) -> float | None:
    try:
        step = json.loads((run / "best.json").read_text()).get("step")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int | float) else None


UNCERTAINTY_TITLE = "learned uncertainty e^{u(λ)} (EDM2 eq. 21)"


def plot_run(run: str | Path, path: str | Path) -> Path:
    """A training run from ``RUN/metrics.jsonl``: its last adaptive density p(λ) and per-λ-bin
    loss (VDM++ App. F), and loss, gradient norm, learning rate and throughput against step;
    with learned uncertainty (``RUN/export/model.json`` ``uncertainty``) e^{u(λ)} beside them,
    with in-training evaluation rows (``eval_value``, ``eval_bpd``) their curves against step.
    The axes' titles name the panels (:func:`run_panels`)."""
    return draw_run(run, path)[0]


def run_panels(run: str | Path) -> list[str]:
    """The titles of the panels :func:`plot_run` draws for ``run`` (without drawing)."""
    return _panels(Path(run), read_metrics(run))[1]


def _panels(run: Path, recs: list[dict]) -> tuple[list, list[str]]:
    last = recs[-1]
    panels: list = []  # (title, draw(ax))
    bins = last.get("loss_per_logsnr_bin")
    lo, hi = LAM
    if bins:
        lo, hi = bins["edges"][0], bins["edges"][-1]
    density = next((r["adaptive_density"] for r in reversed(recs) if "adaptive_density" in r), None)

    def draw_density(ax):
        if density:
            n = len(density)
            width = (hi - lo) / n
            ax.bar([lo + (i + 0.5) * width for i in range(n)], density, width=width)
        else:
            ax.text(0.5, 0.5, "no adaptive schedule in this run", ha="center", va="center")
        ax.set(xlabel="log-SNR λ", ylabel="p(λ)")

    def bin_points():
        if not bins:
            return []
        mids = [(a + b) / 2 for a, b in pairwise(bins["edges"])]
        return [(m, v) for m, v in zip(mids, bins["loss"]) if v is not None]

    def draw_bins(ax):
        pts = bin_points()
        if pts:
            ax.plot(*zip(*pts), marker="o")
        ax.set(xlabel="log-SNR λ", ylabel="loss")

    panels.append(("adaptive schedule p(λ)" if density else "p(λ)", draw_density))
    panels.append((f"loss per λ bin (step {last.get('step')})", draw_bins))
    unc = _uncertainty(run)
    if unc is not None:

        def draw_unc(ax, unc=unc):
            lam, u = unc
            ax.plot(lam, [math.exp(v) for v in u], label="e^{u(λ)}")
            ax.set(xlabel="log-SNR λ", ylabel="e^{u(λ)}", yscale="log")
            pts = bin_points()
            if pts:  # the per-bin loss e^u should track (EDM2: u equalizes the loss over λ)
                tw = ax.twinx()
                tw.plot(*zip(*pts), "o--", color="tab:orange", label="loss per λ bin")
                tw.set_ylabel("loss per λ bin", color="tab:orange")
            ax.legend(fontsize=8, loc="upper left")

        panels.append((UNCERTAINTY_TITLE, draw_unc))
    for key, title, log in CURVES:

        def draw_curve(ax, key=key, log=log):
            steps, values = curve(recs, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 50 else None)
                if log and min(values) > 0:
                    ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, f"no {key} in metrics.jsonl", ha="center", va="center")
            ax.set(xlabel="step", ylabel=key)

        panels.append((title, draw_curve))
    best = _best_step(run) if run.is_dir() else None
    name = next((r["eval_metric"] for r in reversed(recs) if "eval_metric" in r), "eval_value")
    for key, title in (
        ("eval_value", f"in-training evaluation: {name}"),
        ("eval_bpd", "in-training bits/dim (VDM bound, held-out)"),
    ):
        if not curve(recs, key)[0]:
            continue

        def draw_eval(ax, key=key):
            steps, values = curve(recs, key)
            ax.plot(steps, values, marker="o")
            if best is not None and key == "eval_value":
                ax.axvline(best, color="gray", linestyle=":", label=f"best.json: step {best:g}")
                ax.legend(fontsize=8)
            ax.set(xlabel="step", ylabel=name if key == "eval_value" else "bits/dim")

        panels.append((title, draw_eval))
    return panels, [t for t, _ in panels]


def draw_run(run: str | Path, path: str | Path) -> tuple[Path, list[str]]:
    """:func:`plot_run`, also returning the titles of the panels drawn."""
    run = Path(run)
    recs = read_metrics(run)
    panels, titles = _panels(run, recs)
    plt = _plt()
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, draw) in zip(flat, panels):
        draw(ax)
        ax.set_title(title)
    for ax in flat[len(panels) :]:
        ax.set_axis_off()
    return _save(fig, path), titles


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
