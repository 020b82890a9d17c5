"""The objectives compared on digits at equal compute — a small-scale analogue of VDM++ Table 2.

    python bench/objectives.py [--steps 2000] [--seeds 0,1] [--recipes a,b,...] [--samples 500]

Each recipe trains ``digits.toml`` (tiny U-Net, 8×8, batch 32, the same optimizer, EMA and
step count) with only the ``[objective]`` keys changed, through ``vdmpp.train.trainer.train``.
Every run is then scored the same way as the README quickstart: 500 class-conditional samples
with Heun (18 steps, 35 NFE) from the same seeds, the digits Fréchet distance against
``digits:all`` and the class accuracy of the digits classifier (``vdmpp.eval`` — NOT Inception
FID), and the VDM bound in bits/dim on the held-out ``digits:test`` split (1 draw per image).
Writes ``bench/results/objectives-cpu.json`` (per recipe and seed, plus the mean).

The recorded ``objectives-cpu.json`` is the default run: 7 recipes × seeds 0 and 1 × 2000 steps,
500 samples, each seed in its own ``nice``-d single-thread process on a shared 2-core CPU
(``--merge`` combined them; ``train_s`` is wall time under that load, not a speed measurement).
``objectives-cpu-300steps.json`` is an earlier 300-step run, kept to show how early training
ranks the recipes differently. ``--table`` prints the README's table from a result file.
``objectives-phema-cpu.json`` is a reduced ``--phema`` run (10 recipes with three ``+u``, 800
steps, 250 samples, seeds 0 and 1; ``--ode-bpd`` with Hutchinson's divergence on two models):
its ``note`` says exactly what ran.

Recipes (VDM++ = Kingma & Gao 2023; EDM = Karras et al. 2022; VDM = Kingma et al. 2021):

* ``sigmoid2-eps-adaptive``: VDM++'s sigmoid(−λ + 2) weighting, ε head, adaptive schedule
  (App. F) — the digits.toml recipe before this benchmark;
* ``sigmoid0-v-adaptive`` / ``sigmoid2-v-adaptive`` / ``sigmoid0-eps-adaptive``: other biases
  and heads (VDM++ Sec. 5.1 / Table 2 rows);
* ``edm``: EDM's recipe — EDM training schedule, EDM weighting, F-parameterization;
* ``v-cosine``: v-prediction with the cosine schedule (VDM++ Table 1, 'v-MSE');
* ``elbo-learned``: the ELBO with VDM's learned schedule (VDM App. H).

Any recipe name with ``+u`` appended (``edm+u``) is that recipe with EDM2's learned uncertainty
weighting, ``objective.uncertainty = true`` (Karras et al. 2024, eq. 21).

Optional measurements (off by default; the default run is unchanged):

* ``--phema``: train with EDM2's power-function EMA (``ema.kind = "power"``, tracked σ_rel
  0.05 and 0.10, a snapshot every 1/8 of the run), then reconstruct the EMA post hoc
  (``vdmpp.train.phema.reconstruct``, EDM2 App. C.3) for each σ_rel of ``--phema-sweep`` and
  score every reconstruction like the export (same sample seeds, FD and class accuracy). Each
  run then reports FD at the fixed σ_rel (the export's, ``std[0]`` = 0.05: what the bench
  scores without post-hoc EMA) and at its best σ_rel; the summary picks the σ_rel with the
  best *mean* FD over seeds. Caveat: the best of 6 noisy FDs on the same samples is
  optimistically biased (selection on the test set), by about the FD noise between σ_rel.
* ``--uncertainty``: add the ``+u`` variant of every recipe in ``--recipes``.
* ``--ode-bpd``: bits/dim of the probability-flow ODE likelihood
  (``vdmpp.samplers.log_likelihood``, dopri5, exact divergence for the 64 dims, σ from 0.002
  to 80 — EDM's range inside the model's λ range) on the first ``--ode-images`` held-out
  ``digits:test`` images, uniformly dequantized: x = k/127.5 − 1 + u, u ~ U(−Δ/2, Δ/2)^d,
  Δ = 2/255, bits/dim = −(log p(x) + d·log Δ)/(d·ln 2) — in expectation over u an upper bound
  on the discrete NLL of the *ODE's* model. Beside it, the VDM bound on the same images (and
  the paired difference with its standard error, per image), the mean NFE per batch (each
  evaluation with the exact divergence also costs 64 backward passes).
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

_FIXED = {"adaptive": False, "weighting_args": {}}
RECIPES: dict[str, dict] = {
    "sigmoid2-eps-adaptive": {"weighting": "sigmoid", "weighting_args": {"bias": 2.0},
                              "parameterization": "eps", "adaptive": True},
    "sigmoid0-v-adaptive": {"weighting": "sigmoid", "weighting_args": {"bias": 0.0},
                            "parameterization": "v", "adaptive": True},
    "sigmoid2-v-adaptive": {"weighting": "sigmoid", "weighting_args": {"bias": 2.0},
                            "parameterization": "v", "adaptive": True},
    "sigmoid0-eps-adaptive": {"weighting": "sigmoid", "weighting_args": {"bias": 0.0},
                              "parameterization": "eps", "adaptive": True},
    "edm": {**_FIXED, "schedule": "edm_training", "weighting": "edm", "parameterization": "edm"},
    "v-cosine": {**_FIXED, "schedule": "cosine", "weighting": "vprediction",
                 "parameterization": "v"},
    "elbo-learned": {**_FIXED, "schedule": "learned", "weighting": "elbo",
                     "parameterization": "eps"},
}  # fmt: skip
UNC = "+u"  # suffix: the recipe with EDM2's learned uncertainty weighting (objective.uncertainty)
PHEMA_STD = (0.05, 0.10)  # tracked σ_rel (EDM2's defaults); std[0] is the exported profile
PHEMA_SWEEP = (0.02, 0.035, 0.05, 0.08, 0.12, 0.2)
ODE_SIGMAS = (0.002, 80.0)  # EDM's σ range (inside every recipe's λ ∈ [−15, 15])


def recipe_objective(name: str) -> dict:
    """The [objective] keys of a recipe name (``NAME`` or ``NAME+u``)."""
    base = name[: -len(UNC)] if name.endswith(UNC) else name
    if base not in RECIPES:
        raise KeyError(name)
    return {**RECIPES[base], **({"uncertainty": True} if name.endswith(UNC) else {})}


def _order(name: str) -> tuple[int, int]:
    base = name[: -len(UNC)] if name.endswith(UNC) else name
    return (list(RECIPES).index(base) if base in RECIPES else len(RECIPES), name.endswith(UNC))


def _score(model, meta, samples: int) -> dict:
    """FD against digits:all and classifier accuracy of ``samples`` Heun-18 samples."""
    from vdmpp.eval import digits as D
    from vdmpp.eval import metrics as M
    from vdmpp.eval.data import load_images
    from vdmpp.eval.sampling import SampleSpec, generate

    images, labels, nfe = generate(model, meta, list(range(samples)), SampleSpec("heun", 18))
    ref, _ = load_images("digits:all", resolution=8)
    d = M.compute_metrics(images, ref, extractor="digits", metrics=("fid",), cuda=False)
    return {"frechet_distance": d["fid"], "class_accuracy": float((D.predict(images) == labels)
            .mean()), "nfe": nfe}  # fmt: skip


def ode_bpd(model, meta, images, labels, *, rtol: float, atol: float, batch: int,
            divergence: str = "exact", seed: int = 0) -> dict:  # fmt: skip
    """Uniformly dequantized PF-ODE bits/dim per image (see the module docstring)."""
    import math

    from vdmpp.eval.model import denoiser_for, from_uint8
    from vdmpp.samplers import log_likelihood

    x = from_uint8(images, tuple(meta.get("data_range", (-1.0, 1.0))))
    lo, hi = (float(v) for v in meta.get("data_range", (-1.0, 1.0)))
    width = (hi - lo) / 255.0
    gen = torch.Generator().manual_seed(seed)
    x = x + (torch.rand(x.shape, generator=gen) - 0.5) * width
    y = torch.from_numpy(labels).long() if meta.get("num_classes") else None
    den = denoiser_for(model, meta)
    bpd, nfes = [], []
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        ll = log_likelihood(den, x[i : i + batch], sigma_min=ODE_SIGMAS[0],
                            sigma_max=ODE_SIGMAS[1], rtol=rtol, atol=atol,
                            divergence=divergence, generator=gen,
                            extra_args={"class_labels": y[i : i + batch]} if y is not None
                            else None)  # fmt: skip
        bpd.append(ll.bits_per_dim(width).double())
        nfes.append(ll.nfe)
    b = torch.cat(bpd)
    return {"per_image": b.numpy(), "bpd": float(b.mean()),
            "stderr": float(b.std(unbiased=True) / math.sqrt(len(b))),
            "nfe_mean": sum(nfes) / len(nfes), "nfe": nfes, "seconds": time.perf_counter() - t0,
            "bin_width": width}  # fmt: skip


def run_one(recipe: str, seed: int, steps: int, samples: int, work: Path,
            opts: argparse.Namespace | None = None) -> dict:  # fmt: skip
    import numpy as np

    from vdmpp.eval.bpd import bpd_of_export
    from vdmpp.eval.data import load_images
    from vdmpp.eval.model import load_model
    from vdmpp.train import config as C
    from vdmpp.train.trainer import train

    phema = bool(opts and opts.phema)
    over = [f"steps={steps}", f"seed={seed}", f"out={work / f'{recipe}-{seed}'}",
            "log.progress=false", "sample.every=0", f"checkpoint.every={steps}",
            "device=cpu"]  # fmt: skip
    for k, v in recipe_objective(recipe).items():
        over.append(f"objective.{k}={json.dumps(v).replace(':', '=') if isinstance(v, dict) else json.dumps(v)}")  # noqa: E501
    if phema:
        every = steps * C.load("digits", over).batch.global_size / 8  # 8 snapshots a run
        over += ["ema.kind=\"power\"", f"ema.std={list(PHEMA_STD)}",
                 f"ema.snapshot_every_images={every}"]  # fmt: skip
    cfg = C.load("digits", over)
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    model, meta = load_model(cfg.out)
    t1 = time.perf_counter()
    sc = _score(model, meta, samples)
    test, test_labels = load_images("digits:test", resolution=8)
    b = bpd_of_export(model, meta, test, test_labels, draws=1, seed=0)
    losses = [json.loads(x)["loss"] for x in (Path(cfg.out) / "metrics.jsonl").read_text()
              .splitlines()]  # fmt: skip
    out = {"recipe": recipe, "seed": seed, "steps": result["step"], "train_s": round(train_s, 1),
           "frechet_distance": sc["frechet_distance"], "class_accuracy": sc["class_accuracy"],
           "bpd": b.bpd, "bpd_stderr": b.stderr, "nfe": sc["nfe"],
           "final_loss": losses[-1]}  # fmt: skip
    if phema:
        from vdmpp.train.phema import load_snapshots, reconstruct

        snaps = load_snapshots(Path(cfg.out) / "phema")
        sweep = [float(v) for v in opts.phema_sweep.split(",")]
        exported = {k: v.clone() for k, v in model.state_dict().items()}
        # Check: reconstructing the exported (tracked) σ_rel gives back the exported weights.
        check = reconstruct(snaps, PHEMA_STD[0])
        rows = []
        for std, sd in zip(sweep, reconstruct(snaps, sweep)):
            model.load_state_dict(sd, strict=True)
            r = _score(model, meta, samples)
            rows.append({"std": std, "frechet_distance": r["frechet_distance"],
                         "class_accuracy": r["class_accuracy"]})  # fmt: skip
            print(
                f"  {recipe} seed {seed} σ_rel {std:g}: FD {r['frechet_distance']:.3f}", flush=True
            )
        model.load_state_dict(exported, strict=True)
        best = min(rows, key=lambda r: r["frechet_distance"])
        out["phema"] = {
            "tracked_std": list(PHEMA_STD), "fixed_std": PHEMA_STD[0],
            "snapshots": [s.nimg for s in snaps], "sweep": rows,
            "best_std": best["std"], "best_frechet_distance": best["frechet_distance"],
            "best_class_accuracy": best["class_accuracy"],
            "reconstruct_vs_export_max_abs": max(
                float((check[k].double() - exported[k].double()).abs().max()) for k in exported
                if exported[k].is_floating_point()),
        }  # fmt: skip
    if opts and opts.ode_bpd:
        n = opts.ode_images
        xs, ys = test[:n], test_labels[:n]
        o = ode_bpd(model, meta, xs, ys, rtol=opts.ode_tol, atol=opts.ode_tol,
                    batch=opts.ode_batch, divergence=opts.ode_divergence)  # fmt: skip
        v = bpd_of_export(model, meta, xs, ys, draws=opts.vlb_draws, seed=0)
        diff = o["per_image"] - np.asarray(v.per_image, np.float64)
        out["ode"] = {
            "images": len(xs), "data": f"digits:test[:{len(xs)}]", "rtol": opts.ode_tol,
            "atol": opts.ode_tol, "divergence": opts.ode_divergence, "sigma_min": ODE_SIGMAS[0],
            "sigma_max": ODE_SIGMAS[1], "dequantization": "uniform", "bin_width": o["bin_width"],
            "batch": opts.ode_batch, "ode_bpd": o["bpd"], "ode_bpd_stderr": o["stderr"],
            "nfe_mean": o["nfe_mean"], "nfe": o["nfe"], "ode_s": round(o["seconds"], 1),
            "vlb_bpd": v.bpd, "vlb_bpd_stderr": v.stderr, "vlb_draws": v.draws,
            "ode_minus_vlb": float(diff.mean()),
            "ode_minus_vlb_stderr": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "ode_below_vlb_fraction": float((diff < 0).mean()),
        }  # fmt: skip
        print(f"  {recipe} seed {seed}: ODE {o['bpd']:.3f} ± {o['stderr']:.3f} vs VLB "
              f"{v.bpd:.3f} ± {v.stderr:.3f} bits/dim, NFE {o['nfe_mean']:.0f}, "
              f"{o['seconds']:.0f} s", flush=True)  # fmt: skip
    out["eval_s"] = round(time.perf_counter() - t1, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help=f"comma-separated; NAME{UNC} adds objective.uncertainty=true",
    )
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "objectives-cpu.json"))
    ap.add_argument(
        "--phema",
        action="store_true",
        help="power-function EMA, scored at every σ_rel of --phema-sweep",
    )
    ap.add_argument("--phema-sweep", default=",".join(f"{v:g}" for v in PHEMA_SWEEP))
    ap.add_argument(
        "--uncertainty",
        action="store_true",
        help=f"add the {UNC} (learned uncertainty weighting) variant of each recipe",
    )
    ap.add_argument(
        "--ode-bpd",
        action="store_true",
        help="PF-ODE bits/dim (uniform dequantization) beside the VLB",
    )
    ap.add_argument(
        "--ode-recipes", default=None, help="only these recipes get --ode-bpd (default: all)"
    )
    ap.add_argument("--ode-images", type=int, default=128)
    ap.add_argument("--ode-batch", type=int, default=64)
    ap.add_argument("--ode-tol", type=float, default=1e-5, help="dopri5 rtol = atol")
    ap.add_argument(
        "--ode-divergence",
        choices=("exact", "hutchinson"),
        default="exact",
        help="exact: 64 backward passes per evaluation; hutchinson: one Rademacher probe",
    )
    ap.add_argument(
        "--vlb-draws", type=int, default=4, help="(t, ε) draws per image for the VLB beside the ODE"
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine the runs of these result files (e.g. recipes run in "
        "parallel processes) into --out, then exit",
    )
    ap.add_argument(
        "--table",
        action="store_true",
        help="print --out as the README's markdown table (mean over seeds), then exit",
    )
    a = ap.parse_args()
    if a.table:
        rec = json.loads(Path(a.out).read_text())
        print(table(rec))
        if any("phema" in r for r in rec["runs"]):
            print("\n" + phema_table(rec))
        if any("ode" in r for r in rec["runs"]):
            print("\n" + ode_table(rec))
        return
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        record = {k: v for k, v in parts[0].items() if k not in ("runs", "summary")}
        record["runs"] = sorted(
            (r for p in parts for r in p["runs"]), key=lambda r: (_order(r["recipe"]), r["seed"])
        )
        record["processes"] = len(parts)
        _summarise(record)
        Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["summary"], indent=2))
        return
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    recipes = [r for r in a.recipes.split(",") if r]
    if a.uncertainty:
        recipes += [r + UNC for r in recipes if not r.endswith(UNC) and r + UNC not in recipes]
    unknown = []
    for r in recipes:
        try:
            recipe_objective(r)
        except KeyError:
            unknown.append(r)
    if unknown:
        raise SystemExit(f"unknown recipes {sorted(unknown)}; known: {', '.join(RECIPES)} "
                         f"(and NAME{UNC})")  # fmt: skip
    os.environ.setdefault("VDMPP_CACHE", str(Path(tempfile.gettempdir()) / "vdmpp-bench-cache"))
    out = Path(a.out)
    record: dict = {"bench": "objectives", "steps": a.steps, "samples": a.samples,
                    "sampler": "heun, 18 steps", "reference": "digits:all (FD), digits:test (bpd)",
                    "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": a.threads, "runs": []}  # fmt: skip
    if a.phema:
        record["phema"] = {"tracked_std": list(PHEMA_STD), "fixed_std": PHEMA_STD[0],
                           "snapshot_every": "1/8 of the run",
                           "sweep": [float(v) for v in a.phema_sweep.split(",")]}  # fmt: skip
    if a.ode_bpd:
        deq = "uniform: x = k/127.5 - 1 + U(-1/255, 1/255)"
        record["ode"] = {"images": a.ode_images, "batch": a.ode_batch, "rtol": a.ode_tol,
                         "atol": a.ode_tol, "vlb_draws": a.vlb_draws, "sigma": list(ODE_SIGMAS),
                         "divergence": a.ode_divergence, "dequantization": deq}  # fmt: skip
    if out.is_file():  # resume: keep finished runs
        old = json.loads(out.read_text())
        if old.get("steps") == a.steps and old.get("samples") == a.samples:
            record["runs"] = old.get("runs", [])
    done = {(r["recipe"], r["seed"]) for r in record["runs"]}
    ode_only = set(a.ode_recipes.split(",")) if a.ode_recipes else None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for recipe in recipes:
                if (recipe, seed) in done:
                    continue
                opts = argparse.Namespace(**vars(a))
                opts.ode_bpd = a.ode_bpd and (ode_only is None or recipe in ode_only)
                r = run_one(recipe, seed, a.steps, a.samples, Path(tmp), opts)
                print(json.dumps(r), flush=True)
                record["runs"].append(r)
                _summarise(record)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"], indent=2))


def table(record: dict) -> str:
    """Markdown: one row per recipe, per-seed values and their mean (lower FD/bpd is better)."""
    rows = ["| recipe | digits FD ↓ | class accuracy ↑ | bits/dim ↓ |", "| --- | --- | --- | --- |"]
    for name, s in record["summary"].items():
        cells = [
            f"{s[f'mean_{k}']:.{d}f} ({' / '.join(f'{v:.{d}f}' for v in s[k])})"
            for k, d in (("frechet_distance", 2), ("class_accuracy", 3), ("bpd", 2))
        ]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def phema_table(record: dict) -> str:
    """Markdown: FD at the fixed σ_rel (the export) and at the best post-hoc σ_rel (the σ_rel of
    the best mean FD over seeds; per-seed values in brackets), with ranks."""
    sm = {k: v for k, v in record["summary"].items() if "phema" in v}
    fixed = sorted(sm, key=lambda k: sm[k]["phema"]["mean_fd_fixed"])
    best = sorted(sm, key=lambda k: sm[k]["phema"]["mean_fd_best"])
    sweep = next(iter(sm.values()))["phema"]["sweep_std"]
    rows = ["| recipe | FD, σ_rel 0.05 [rank] | FD, best σ_rel [rank] | best σ_rel "
            "| class acc. at best "
            "| FD at σ_rel " + " / ".join(f"{v:g}" for v in sweep) + " |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, s in sm.items():
        p = s["phema"]
        per = lambda v: f" ({' / '.join(f'{x:.2f}' for x in v)})" if len(v) > 1 else ""
        rows.append(
            f"| `{name}` | {p['mean_fd_fixed']:.2f}{per(s['frechet_distance'])} "
            f"[{fixed.index(name) + 1}] | {p['mean_fd_best']:.2f}"
            f"{per(p['fd_best_per_seed'])} [{best.index(name) + 1}] | {p['best_std']:g} | "
            f"{p['mean_acc_best']:.3f} | "
            + " / ".join(f"{v:.2f}" for v in p["mean_fd_sweep"])
            + " |"
        )
    return "\n".join(rows)


def ode_table(record: dict) -> str:
    """Markdown: ODE vs VLB bits/dim on the same held-out images (mean ± standard error)."""
    rows = ["| recipe | seed | ODE bits/dim ↓ | VLB bits/dim ↓ | ODE − VLB (paired) | ODE < VLB "
            "(images) | mean NFE |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in record["runs"]:
        o = r.get("ode")
        if not o:
            continue
        rows.append(
            f"| `{r['recipe']}` | {r['seed']} | {o['ode_bpd']:.2f} ± {o['ode_bpd_stderr']:.2f} | "
            f"{o['vlb_bpd']:.2f} ± {o['vlb_bpd_stderr']:.2f} | {o['ode_minus_vlb']:+.2f} ± "
            f"{o['ode_minus_vlb_stderr']:.2f} | {o['ode_below_vlb_fraction']:.0%} | "
            f"{o['nfe_mean']:.0f} |"
        )
    return "\n".join(rows)


def _summarise(record: dict) -> None:
    summary = {}
    names = sorted(dict.fromkeys(r["recipe"] for r in record["runs"]), key=_order)
    for name in names:
        rs = [r for r in record["runs"] if r["recipe"] == name]
        summary[name] = {
            "seeds": [r["seed"] for r in rs],
            **{k: [round(r[k], 3) for r in rs] for k in ("frechet_distance", "class_accuracy",
                                                          "bpd")},
            **{f"mean_{k}": round(sum(r[k] for r in rs) / len(rs), 3)
               for k in ("frechet_distance", "class_accuracy", "bpd")},
        }  # fmt: skip
        ph = [r["phema"] for r in rs if "phema" in r]
        if ph and len(ph) == len(rs):
            stds = [row["std"] for row in ph[0]["sweep"]]
            fd = [sum(p["sweep"][j]["frechet_distance"] for p in ph) / len(ph)
                  for j in range(len(stds))]  # fmt: skip
            acc = [sum(p["sweep"][j]["class_accuracy"] for p in ph) / len(ph)
                   for j in range(len(stds))]  # fmt: skip
            j = min(range(len(stds)), key=fd.__getitem__)
            summary[name]["phema"] = {
                "sweep_std": stds, "mean_fd_sweep": [round(v, 3) for v in fd],
                "mean_acc_sweep": [round(v, 3) for v in acc],
                "fixed_std": ph[0]["fixed_std"],
                "mean_fd_fixed": summary[name]["mean_frechet_distance"],
                "best_std": stds[j], "mean_fd_best": round(fd[j], 3),
                "mean_acc_best": round(acc[j], 3),
                "fd_best_per_seed": [round(p["sweep"][j]["frechet_distance"], 3) for p in ph],
                "per_seed_best_std": [p["best_std"] for p in ph],
            }  # fmt: skip
        od = [r["ode"] for r in rs if "ode" in r]
        if od:
            summary[name]["ode"] = {
                k: [round(o[k], 3) for o in od]
                for k in ("ode_bpd", "ode_bpd_stderr", "vlb_bpd", "vlb_bpd_stderr",
                          "ode_minus_vlb", "ode_minus_vlb_stderr", "nfe_mean")
            }  # fmt: skip
    record["summary"] = summary


if __name__ == "__main__":
    main()
