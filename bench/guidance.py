"""Guidance on digits: CFG, CFG with a guidance interval, and autoguidance, at equal sampling.

    python bench/guidance.py [--run RUN] [--guide RUN] [--steps 2000] [--guide-steps 500]
        [--samples 500] [--weights 1,1.5,2,3] [--interval LO HI] [--out FILE] [--quick]
    python bench/guidance.py --table [--out FILE]      # print the README table, then exit

The model is the shipped ``digits`` recipe (tiny U-Net, v-prediction, adaptive schedule, batch
32) trained with ``objective.label_dropout = 0.1``, so its null class is a trained
unconditional branch — the same run as::

    vdmpp-train digits --set objective.label_dropout=0.1 --set out=RUN --set device=cpu \\
        --set sample.every=0 --set checkpoint.every=500 --set checkpoint.keep=4

``--run`` reuses a finished run (or export); without it the run is trained in-process into
``--work`` (reused on the next call when its ``status.json`` says done at ``--steps``).

The autoguidance guide (Karras et al. 2024) is the same config trained for ``--guide-steps``
(default 500 = a quarter of the training), same seed: the learning rate is constant after
warm-up and the digits config is deterministic, so that run is the main run's own step-500
state. When the main run still holds ``checkpoints/ckpt-<guide-steps>.pt`` the bench checks it
(the checkpoint's EMA against the guide's exported weights) and records the answer as
``guide_is_main_checkpoint``. ``--guide`` reuses another run or export instead (any model of the
same resolution, channels and classes, e.g. a smaller one).

Every setting samples the same seeds 0 … n−1 (``--first-seed`` shifts them; class = seed mod
10) with Heun, 18 steps on EDM's grid (σ 0.002 … 80, ρ = 7), as the quickstart does, through
``vdmpp.eval.sampling.generate`` and ``SampleSpec`` (the code behind ``vdmpp-eval sample
--guidance W [--guidance-interval LO HI] [--guide RUN]``), and is scored like
``bench/objectives.py``: the digits Fréchet distance against ``digits:all`` and the class
accuracy of the digits classifier (``vdmpp.eval.digits`` — NOT Inception FID). Modes, for each w:

* ``cfg``: D_u + w (D_c − D_u), D_u the model's own null class, at every σ;
* ``cfg-interval``: the same, but only for LO < σ ≤ HI (one conditional evaluation elsewhere).
  Default interval: EDM2's (0.28, 5.42] (Kynkäänniemi et al. 2024, found for latents normalised
  to σ_data = 0.5) rescaled by the digits' pixel std over 0.5 — σ measured relative to the
  data's own scale; ``--interval`` overrides it;
* ``autoguidance``: D_g + w (D_c − D_g), D_g the guide, given the same class labels.

w = 1 is the unguided conditional model in all three modes, so it is drawn once. The guide
alone (w = 1) is scored too. Writes a JSON record (resumable: finished rows are kept when the
models and settings match) and prints the README table. ``--modes`` draws a subset of the rows
(e.g. in parallel single-thread processes) and ``--merge`` combines such records into one: the
recorded ``guidance-cpu.json`` was made that way (its ``note`` says how). ``--quick`` (50
images; when it trains: at most 200 + 50 steps) is a smoke run of the whole path; nothing in CI
runs it.
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
EDM2_INTERVAL = (0.28, 5.42)  # Kynkäänniemi et al. 2024 / EDM2 presets, σ_data = 0.5 latents
EDM2_SIGMA_DATA = 0.5
MODES = ("cfg", "cfg-interval", "autoguidance")
ALL_MODES = ("none", "guide-alone", *MODES)  # none: the model unguided (w = 1)
_SAME = ("model", "guide", "samples", "seeds", "sampling", "interval", "quick")
TRAIN_OVERRIDES = ("objective.label_dropout=0.1", "device=cpu", "sample.every=0",
                   "log.progress=false")  # fmt: skip


def _done_at(run: Path, steps: int) -> bool:
    from vdmpp.train.status import read_status

    s = read_status(run)
    return bool(s) and s.get("status") == "done" and int(s.get("step") or 0) >= steps


def train_run(out: Path, steps: int, checkpoint_every: int) -> dict:
    """Train (or reuse) the digits config with label dropout 0.1 for ``steps``; its record."""
    from vdmpp.train import config as C
    from vdmpp.train.run import train

    if _done_at(out, steps):
        return {"path": str(out), "steps": steps, "trained_now": False, **_train_time(out)}
    over = [*TRAIN_OVERRIDES, f"steps={steps}", f"out={out}",
            f"checkpoint.every={checkpoint_every}", "checkpoint.keep=4"]  # fmt: skip
    cfg = C.load("digits", over)
    resume = (out / "checkpoints").is_dir()
    print(f"training {out} for {steps} steps{' (resuming)' if resume else ''}", flush=True)
    t0 = time.perf_counter()
    result = train(cfg, resume=resume)
    if result.get("status", "done") != "done":
        raise SystemExit(f"training {out} ended {result.get('status')}: no results")
    return {"path": str(out), "steps": steps, "trained_now": True,
            "wall_s": round(time.perf_counter() - t0, 1), **_train_time(out)}  # fmt: skip


def _train_time(run: Path) -> dict:
    """Training time and throughput from the run's last metrics row (its own clock)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    last = rows[-1] if rows else {}
    ips = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    median = round(sorted(ips)[len(ips) // 2], 1) if ips else None
    return {"train_elapsed_s": last.get("elapsed_s"), "median_images_per_s": median}


def guide_is_checkpoint(main: Path, guide_model, step: int) -> bool | None:
    """Does ``main``'s checkpoint at ``step`` hold exactly the guide's (EMA) weights?
    None when that checkpoint is not there (pruned, or ``--run`` is a bare export)."""
    from vdmpp.train.checkpoint import checkpoint_path, load_checkpoint

    p = checkpoint_path(main / "checkpoints", step)
    if not p.is_file():
        return None
    ema = load_checkpoint(p)["ema"]
    mine = guide_model.state_dict()
    return set(ema) == set(mine) and all(torch.equal(ema[k], mine[k].cpu()) for k in ema)


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def digits_std() -> float:
    """Pixel std of all 1797 digits in the models' [-1, 1] range."""
    from vdmpp.eval.data import load_images

    x, _ = load_images("digits:all", resolution=8)
    return float((torch.from_numpy(x).double() / 127.5 - 1).std())


def score(model, meta, spec, seeds, batch, ref, guide=None) -> dict:
    from vdmpp.eval import digits as DG
    from vdmpp.eval import metrics as M
    from vdmpp.eval.sampling import generate

    t0 = time.perf_counter()
    images, labels, nfe = generate(model, meta, seeds, spec, batch_size=batch, guide=guide)
    secs = time.perf_counter() - t0
    fd = M.compute_metrics(images, ref, extractor="digits", metrics=("fid",), cuda=False)["fid"]
    acc = float((DG.predict(images) == labels).mean())
    return {"nfe": nfe, "frechet_distance": round(float(fd), 4), "class_accuracy": acc,
            "sample_s": round(secs, 1)}  # fmt: skip


def run(a: argparse.Namespace) -> dict:
    from vdmpp.eval.data import load_images
    from vdmpp.eval.model import load_model
    from vdmpp.eval.sampling import SampleSpec

    work = Path(a.work)
    trained: dict = {}
    if a.run:
        main_path = Path(a.run)
        trained["model"] = {"path": str(main_path), "trained_now": False, **_train_time(main_path)}
    else:
        main_path = work / f"main-{a.steps}"
        trained["model"] = train_run(main_path, a.steps, a.guide_steps)
    if a.guide:
        guide_path = Path(a.guide)
        trained["guide"] = {"path": str(guide_path), "trained_now": False,
                            **_train_time(guide_path)}  # fmt: skip
    else:
        guide_path = work / f"guide-{a.guide_steps}"
        trained["guide"] = train_run(guide_path, a.guide_steps, a.guide_steps)
    model, meta = load_model(main_path)
    gmodel, gmeta = load_model(guide_path)
    if not meta.get("label_dropout"):
        raise SystemExit(
            f"{main_path}: trained without label dropout (model.json); CFG would "
            "use an untrained null class: train with objective.label_dropout=0.1"
        )
    std = digits_std()
    if a.interval:
        interval, why = tuple(a.interval), "--interval"
    else:
        k = std / EDM2_SIGMA_DATA
        interval = (round(EDM2_INTERVAL[0] * k, 3), round(EDM2_INTERVAL[1] * k, 3))
        why = f"EDM2 (0.28, 5.42] x digits std {std:.3f} / 0.5"
    same = None
    if Path(main_path).is_dir():
        same = guide_is_checkpoint(Path(main_path), gmodel, int(gmeta.get("step") or 0))
    base = {"sampler": "heun", "steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    seeds = list(range(a.first_seed, a.first_seed + a.samples))
    record = {
        "bench": "guidance",
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": a.quick,
        "model": {"path": str(main_path), "step": meta.get("step"),
                  "label_dropout": meta.get("label_dropout"), "model": meta.get("model")},
        "guide": {"path": str(guide_path), "step": gmeta.get("step"), "model": gmeta.get("model"),
                  "label_dropout": gmeta.get("label_dropout"),
                  "guide_is_main_checkpoint": same},
        "training": trained,
        "samples": a.samples,
        "seeds": f"{seeds[0]}-{seeds[-1]}, class = seed mod 10",
        "sampling": {**base, "nfe_unguided": 35},
        "interval": {"sigma_lo": interval[0], "sigma_hi": interval[1], "rule": why,
                     "digits_pixel_std": round(std, 4)},
        "reference": "digits:all (digits-classifier features, not Inception)",
        "note": a.note,
        "rows": [],
    }  # fmt: skip
    out = Path(a.out)
    if out.is_file():  # resume: keep rows of the same models and settings
        old = json.loads(out.read_text())
        if all(old.get(k) == record[k] for k in _SAME):
            record["rows"] = old["rows"]
    done = {(r["mode"], r["w"]) for r in record["rows"]}
    ref, _ = load_images("digits:all", resolution=8)
    plan: list[tuple[str, float]] = [("none", 1.0), ("guide-alone", 1.0)]
    plan += [(m, w) for w in a.weights if w != 1.0 for m in MODES]
    plan = [(m, w) for m, w in plan if m in a.modes]
    t_all = time.perf_counter()
    for mode, w in plan:
        if (mode, w) in done:
            continue
        kw: dict = {}
        m, mm, guide = model, meta, None
        if mode == "guide-alone":
            m, mm = gmodel, gmeta
        elif mode == "cfg-interval":
            kw["guidance_interval"] = interval
        elif mode == "autoguidance":
            kw["guide"] = str(guide_path)
            guide = (gmodel, gmeta)
        spec = SampleSpec(**base, guidance=w, **kw)
        row = {"mode": mode, "w": w, **score(m, mm, spec, seeds, a.batch, ref, guide)}
        print(json.dumps(row), flush=True)
        record["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    record["eval_s_this_call"] = round(time.perf_counter() - t_all, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def merge(parts: list[dict]) -> dict:
    """One record from records of the same models and settings (rows in plan order)."""
    head = {k: v for k, v in parts[0].items() if k not in ("rows", "eval_s_this_call")}
    for p in parts[1:]:
        for k in _SAME:
            if p.get(k) != head.get(k):
                raise SystemExit(f"--merge: the records differ in {k!r}")
    rows = {(r["mode"], r["w"]): r for p in parts for r in p["rows"]}
    order = {m: i for i, m in enumerate(ALL_MODES)}
    head["rows"] = sorted(rows.values(), key=lambda r: (r["w"], order[r["mode"]]))
    head["processes"] = len(parts)
    return head


def table(record: dict) -> str:
    """Markdown: one row per w, class accuracy / digits FD (NFE) for each mode."""
    rows = record["rows"]
    by = {(r["mode"], r["w"]): r for r in rows}
    ws = sorted({r["w"] for r in rows if r["mode"] in MODES} | {1.0})
    lo, hi = record["interval"]["sigma_lo"], record["interval"]["sigma_hi"]
    names = {"cfg": "CFG", "cfg-interval": f"CFG, σ ∈ ({lo:g}, {hi:g}]",
             "autoguidance": f"autoguidance (step-{record['guide']['step']} guide)"}  # fmt: skip
    head = "| w | " + " | ".join(names[m] for m in MODES) + " |"
    lines = [head, "| --- |" + " --- |" * len(MODES)]

    def cell(r: dict | None) -> str:
        if r is None:
            return "—"
        return f"{r['class_accuracy']:.3f} / {r['frechet_distance']:.2f} ({r['nfe']:g})"

    for w in ws:
        cells = [cell(by.get(("none", 1.0)) if w == 1.0 else by.get((m, w))) for m in MODES]
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
    g = by.get(("guide-alone", 1.0))
    foot = "cells: class accuracy ↑ / digits FD ↓ (NFE per image)"
    if g:
        foot += f"; the guide alone (w = 1): {cell(g)}"
    return "\n".join(lines) + "\n\n" + foot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a finished label-dropout digits run or export (default: train)")
    ap.add_argument("--guide", help="the autoguidance guide, a run or export (default: train "
                    "the same config for --guide-steps)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=2000, help="training steps (digits.toml: 2000)")
    ap.add_argument("--guide-steps", type=int, default=500)
    ap.add_argument("--work", default="runs/guidance", help="where trained runs go")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--weights", default="1,1.5,2,3", help="guidance strengths w (1: none)")
    ap.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                    help="σ interval of cfg-interval (default: EDM2's, rescaled)")  # fmt: skip
    ap.add_argument("--first-seed", type=int, default=0, help="seeds FIRST … FIRST+n−1")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON record (default: bench/results/"
                    "guidance-cpu.json; --quick: guidance-cpu-quick.json)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 images (and, when it "
                    "trains, 200 + 50 steps); not what the README reports")  # fmt: skip
    ap.add_argument("--modes", default=",".join(ALL_MODES),
                    help="the rows to draw (e.g. split over processes, then --merge)")  # fmt: skip
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine the rows of these "
                    "records (same models and settings) into --out, then exit")  # fmt: skip
    ap.add_argument("--note", help="a line stored in the record (with --merge: in the merged one)")
    ap.add_argument("--table", action="store_true", help="print --out as a markdown table, exit")
    a = ap.parse_args()
    if a.out is None:
        quick = Path(a.work) / "guidance-cpu-quick.json"
        a.out = str(quick if a.quick else RESULTS / "guidance-cpu.json")
    if a.table:
        print(table(json.loads(Path(a.out).read_text())))
        return
    if a.merge:
        record = merge([json.loads(Path(f).read_text()) for f in a.merge])
        if a.note:
            record["note"] = a.note
        Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
        print(table(record))
        return
    a.modes = [m for m in a.modes.split(",") if m]
    unknown = set(a.modes) - set(ALL_MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; known: {', '.join(ALL_MODES)}")
    a.weights = [float(w) for w in a.weights.split(",")]
    if a.quick:
        a.samples = min(a.samples, 50)
        if not a.run:
            a.steps, a.guide_steps = min(a.steps, 200), min(a.guide_steps, 50)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("VDMPP_CACHE", str(Path(tempfile.gettempdir()) / "vdmpp-bench-cache"))
    record = run(a)
    print(table(record))


if __name__ == "__main__":
    main()
