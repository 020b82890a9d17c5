"""Sample quality versus NFE for every sampler of ``vdmpp.samplers.SAMPLERS`` on a digits model.

    python bench/samplers_nfe.py RUN_OR_EXPORT [--nfe 5,10,15,20,35] [--samples 500]
        [--samplers heun,dpmpp_2m,...] [--out bench/results/samplers_nfe-cpu.json] [--plot]
    python bench/samplers_nfe.py --table [--out FILE]      # print the README table, then exit

``RUN_OR_EXPORT``: a ``vdmpp-train`` run directory, its ``export/`` or ``ema.safetensors`` (the
README quickstart's ``runs/quickstart/run``, or a ``bench/objectives.py`` recipe such as
``edm``). Every (sampler, NFE budget) pair samples the same class-conditional seeds 0 … n−1
(class = seed mod 10) on EDM's grid (``karras_sigmas(steps, 0.002, 80, 7)``) with the largest
step count whose NFE fits the budget (``SAMPLERS[name].nfe``: N or 2N − 1 for N steps), and is
scored as in ``bench/objectives.py``: the digits Fréchet distance against ``digits:all`` and the
class accuracy of the digits classifier (``vdmpp.eval.digits`` — NOT Inception FID).
``dpm_adaptive`` has no step count: it runs at a ladder of tolerances (rtol, atol = rtol/6.4)
and records the NFE it used. Stochastic samplers run with their defaults (η = 1), drawing their
noise from the per-seed generators. Writes a JSON record (resumable: finished rows are kept) and,
with ``--plot`` and matplotlib installed, FD vs NFE next to it (``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ADAPTIVE_RTOL = (0.4, 0.2, 0.1, 0.05, 0.02)


def steps_for(spec, budget: int) -> int | None:
    """The largest step count n with spec.nfe(n) <= budget (None if even 1 step exceeds it)."""
    best = None
    for n in range(1, budget + 1):
        if spec.nfe(n) <= budget:
            best = n
    return best


def sample(model, meta, name: str, steps: int | None, opts: dict, seeds: list[int], batch: int):
    """(uint8 images, labels, NFE per image) for one sampler setting, per-seed noise."""
    import numpy as np

    from vdmpp.eval.model import denoiser_for, to_uint8
    from vdmpp.samplers import SAMPLERS, PerSampleGenerator, karras_sigmas

    spec = SAMPLERS[name]
    D = denoiser_for(model, meta)
    shape = (int(meta["channels"]), int(meta["resolution"]), int(meta["resolution"]))
    ncls = int(meta.get("num_classes") or 0)
    sigmas = karras_sigmas(steps or 18, 0.002, 80.0, 7.0)
    out, labels, nfes = [], [], []
    for i in range(0, len(seeds), batch):
        chunk = seeds[i : i + batch]
        gen = PerSampleGenerator(chunk, "cpu")
        noise = gen.randn(shape)
        extra = {}
        if ncls:
            y = torch.tensor(chunk) % ncls
            extra["class_labels"] = y
            labels.append(y.numpy())
        x, info = spec.fn(D, noise, sigmas, generator=gen, extra_args=extra, return_info=True,
                          **opts)  # fmt: skip
        out.append(to_uint8(x, tuple(meta.get("data_range", (-1.0, 1.0)))))
        nfes.append(info.nfe)
    lab = np.concatenate(labels) if labels else None
    return np.concatenate(out), lab, sum(nfes) / len(nfes)


def run(path: str, budgets: list[int], names: list[str], n: int, batch: int, out: Path) -> dict:
    from vdmpp.eval import digits as DG
    from vdmpp.eval import metrics as M
    from vdmpp.eval.data import load_images
    from vdmpp.eval.model import load_model
    from vdmpp.samplers import SAMPLERS

    model, meta = load_model(path)
    ref, _ = load_images("digits:all", resolution=8)
    record = {"bench": "samplers_nfe", "model": str(path), "model_step": meta.get("step"),
              "samples": n, "grid": "karras_sigmas(steps, 0.002, 80, 7)",
              "reference": "digits:all (digits-classifier features, not Inception)",
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": []}  # fmt: skip
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("model") == str(path) and old.get("samples") == n:
            record["rows"] = old["rows"]
    done = {(r["sampler"], r["budget"]) for r in record["rows"]}
    seeds = list(range(n))
    for name in names:
        spec = SAMPLERS[name]
        plan = []
        if spec.grid:
            plan = [(b, steps_for(spec, b), {}) for b in budgets]
        else:
            plan = [(f"rtol={r}", None, {"rtol": r, "atol": r / 6.4}) for r in ADAPTIVE_RTOL]
        for budget, steps, opts in plan:
            if (name, budget) in done or (spec.grid and steps is None):
                continue
            t0 = time.perf_counter()
            images, labels, nfe = sample(model, meta, name, steps, opts, seeds, batch)
            secs = time.perf_counter() - t0
            fd = M.compute_metrics(images, ref, extractor="digits", metrics=("fid",),
                                   cuda=False)["fid"]  # fmt: skip
            acc = float((DG.predict(images) == labels).mean()) if labels is not None else None
            row = {"sampler": name, "budget": budget, "steps": steps, "nfe": round(nfe, 2),
                   "options": opts, "frechet_distance": round(float(fd), 4),
                   "class_accuracy": acc, "sample_s": round(secs, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            record["rows"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def table(record: dict) -> str:
    """Markdown: one row per sampler, digits FD (class accuracy) at each NFE budget."""
    rows = record["rows"]
    budgets = sorted({r["budget"] for r in rows if isinstance(r["budget"], int)})
    head = "| sampler | " + " | ".join(f"NFE ≤ {b}" for b in budgets) + " |"
    lines = [head, "| --- |" + " --- |" * len(budgets)]
    for name in dict.fromkeys(r["sampler"] for r in rows):
        rs = [r for r in rows if r["sampler"] == name]
        if all(isinstance(r["budget"], int) for r in rs):
            by = {r["budget"]: r for r in rs}
            cells = [f"{by[b]['frechet_distance']:.2f} ({by[b]['class_accuracy']:.2f}, "
                     f"{by[b]['nfe']:g})" if b in by else "—" for b in budgets]  # fmt: skip
        else:  # adaptive: list what it reached
            cells = [
                " ".join(
                    f"{r['frechet_distance']:.2f} ({r['class_accuracy']:.2f}, {r['nfe']:.0f})"
                    for r in rs
                )
            ] + [""] * (len(budgets) - 1)
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\ncells: digits FD (class accuracy, NFE used); lower FD is better"


def plot(record: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name in dict.fromkeys(r["sampler"] for r in record["rows"]):
        rs = sorted((r for r in record["rows"] if r["sampler"] == name), key=lambda r: r["nfe"])
        style = "--" if name in ("euler", "heun", "ddim", "ddpm", "edm_stochastic") else "-"
        ax.plot([r["nfe"] for r in rs], [r["frechet_distance"] for r in rs], style, marker="o",
                ms=3, label=name)  # fmt: skip
    ax.set_xlabel("NFE (denoiser evaluations per image)")
    ax.set_ylabel("digits Fréchet distance (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"vdmpp.samplers on the digits model ({record['samples']} samples)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="run dir, RUN/export or ema.safetensors")
    ap.add_argument("--nfe", default="5,10,15,20,35")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--samplers", default=None, help="comma list (default: every SAMPLERS name)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "samplers_nfe-cpu.json"))
    ap.add_argument("--plot", action="store_true", help="also write OUT with .png (matplotlib)")
    ap.add_argument("--table", action="store_true", help="print --out as a markdown table, exit")
    a = ap.parse_args()
    out = Path(a.out)
    if a.table:
        print(table(json.loads(out.read_text())))
        return
    if not a.model:
        ap.error("the model (run dir or export) is required unless --table")
    from vdmpp.samplers import SAMPLERS

    names = a.samplers.split(",") if a.samplers else list(SAMPLERS)
    unknown = [s for s in names if s not in SAMPLERS]
    if unknown:
        raise SystemExit(f"unknown samplers {unknown}; known: {', '.join(SAMPLERS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("VDMPP_CACHE", str(Path(tempfile.gettempdir()) / "vdmpp-bench-cache"))
    budgets = [int(b) for b in a.nfe.split(",")]
    record = run(a.model, budgets, names, a.samples, a.batch, out)
    print(table(record))
    if a.plot and plot(record, out.with_suffix(".png")):
        print(f"plot: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
