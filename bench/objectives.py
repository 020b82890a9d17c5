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

Recipes (VDM++ = Kingma & Gao 2023; EDM = Karras et al. 2022; VDM = Kingma et al. 2021):

* ``sigmoid2-eps-adaptive``: VDM++'s sigmoid(−λ + 2) weighting, ε head, adaptive schedule
  (App. F) — the digits.toml recipe before this benchmark;
* ``sigmoid0-v-adaptive`` / ``sigmoid2-v-adaptive`` / ``sigmoid0-eps-adaptive``: other biases
  and heads (VDM++ Sec. 5.1 / Table 2 rows);
* ``edm``: EDM's recipe — EDM training schedule, EDM weighting, F-parameterization;
* ``v-cosine``: v-prediction with the cosine schedule (VDM++ Table 1, 'v-MSE');
* ``elbo-learned``: the ELBO with VDM's learned schedule (VDM App. H).
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


def run_one(recipe: str, seed: int, steps: int, samples: int, work: Path) -> dict:
    from vdmpp.eval import digits as D
    from vdmpp.eval import metrics as M
    from vdmpp.eval.bpd import bpd_of_export
    from vdmpp.eval.data import load_images
    from vdmpp.eval.model import load_model
    from vdmpp.eval.sampling import SampleSpec, generate
    from vdmpp.train import config as C
    from vdmpp.train.trainer import train

    over = [f"steps={steps}", f"seed={seed}", f"out={work / f'{recipe}-{seed}'}",
            "log.progress=false", "sample.every=0", f"checkpoint.every={steps}",
            "device=cpu"]  # fmt: skip
    for k, v in RECIPES[recipe].items():
        over.append(f"objective.{k}={json.dumps(v).replace(':', '=') if isinstance(v, dict) else json.dumps(v)}")  # noqa: E501
    cfg = C.load("digits", over)
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    model, meta = load_model(cfg.out)
    images, labels, nfe = generate(model, meta, list(range(samples)), SampleSpec("heun", 18))
    ref, _ = load_images("digits:all", resolution=8)
    d = M.compute_metrics(images, ref, extractor="digits", metrics=("fid",), cuda=False)
    acc = float((D.predict(images) == labels).mean())
    test, test_labels = load_images("digits:test", resolution=8)
    b = bpd_of_export(model, meta, test, test_labels, draws=1, seed=0)
    losses = [json.loads(x)["loss"] for x in (Path(cfg.out) / "metrics.jsonl").read_text()
              .splitlines()]  # fmt: skip
    return {"recipe": recipe, "seed": seed, "steps": result["step"], "train_s": round(train_s, 1),
            "frechet_distance": d["fid"], "class_accuracy": acc, "bpd": b.bpd,
            "bpd_stderr": b.stderr, "nfe": nfe, "final_loss": losses[-1]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "objectives-cpu.json"))
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine the runs of these result files (e.g. recipes run in "
                    "parallel processes) into --out, then exit")
    ap.add_argument("--table", action="store_true",
                    help="print --out as the README's markdown table (mean over seeds), then exit")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(Path(a.out).read_text())))
        return
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        record = {k: v for k, v in parts[0].items() if k not in ("runs", "summary")}
        record["runs"] = sorted((r for p in parts for r in p["runs"]),
                                key=lambda r: (list(RECIPES).index(r["recipe"]), r["seed"]))
        record["processes"] = len(parts)
        _summarise(record)
        Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["summary"], indent=2))
        return
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    recipes = [r for r in a.recipes.split(",") if r]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown recipes {sorted(unknown)}; known: {', '.join(RECIPES)}")
    os.environ.setdefault("VDMPP_CACHE", str(Path(tempfile.gettempdir()) / "vdmpp-bench-cache"))
    out = Path(a.out)
    record: dict = {"bench": "objectives", "steps": a.steps, "samples": a.samples,
                    "sampler": "heun, 18 steps", "reference": "digits:all (FD), digits:test (bpd)",
                    "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": a.threads, "runs": []}  # fmt: skip
    if out.is_file():  # resume: keep finished runs
        old = json.loads(out.read_text())
        if old.get("steps") == a.steps and old.get("samples") == a.samples:
            record["runs"] = old.get("runs", [])
    done = {(r["recipe"], r["seed"]) for r in record["runs"]}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for recipe in recipes:
                if (recipe, seed) in done:
                    continue
                r = run_one(recipe, seed, a.steps, a.samples, Path(tmp))
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
        cells = [f"{s[f'mean_{k}']:.{d}f} ({' / '.join(f'{v:.{d}f}' for v in s[k])})"
                 for k, d in (("frechet_distance", 2), ("class_accuracy", 3), ("bpd", 2))]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _summarise(record: dict) -> None:
    summary = {}
    for name in dict.fromkeys(r["recipe"] for r in record["runs"]):
        rs = [r for r in record["runs"] if r["recipe"] == name]
        summary[name] = {
            "seeds": [r["seed"] for r in rs],
            **{k: [round(r[k], 3) for r in rs] for k in ("frechet_distance", "class_accuracy",
                                                          "bpd")},
            **{f"mean_{k}": round(sum(r[k] for r in rs) / len(rs), 3)
               for k in ("frechet_distance", "class_accuracy", "bpd")},
        }  # fmt: skip
    record["summary"] = summary


if __name__ == "__main__":
    main()
