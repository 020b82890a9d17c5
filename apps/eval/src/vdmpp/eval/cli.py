"""``vdmpp-eval``: sample | metrics | bpd | plot.

    vdmpp-eval sample RUN --sampler heun --steps 18 --seeds 0-49999 --out OUT
    torchrun --nproc-per-node 8 -m vdmpp.eval sample RUN --seeds 0-49999 --out OUT
    vdmpp-eval metrics OUT --ref SHARDS [--inception-weights PATH]
    vdmpp-eval metrics RUN --ref digits --num 1000        # samples drawn in memory
    vdmpp-eval bpd RUN --data digits --draws 4
    vdmpp-eval plot --out plots/ [--run RUN]

User errors (bad paths, formats, arguments) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .model import EvalError

__all__ = ["main"]


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .sampling import SAMPLERS

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="heun", choices=SAMPLERS)
    g.add_argument("--steps", type=int, default=18, help="grid steps N (Heun: 2N-1 NFE)")
    g.add_argument("--churn", type=float, default=0.0, help="S_churn (edm sampler)")
    g.add_argument("--s-tmin", type=float, default=0.0)
    g.add_argument("--s-tmax", type=float, default=math.inf)
    g.add_argument("--s-noise", type=float, default=1.0)
    g.add_argument("--eta", type=float, default=0.0, help="DDIM η (0: deterministic)")
    g.add_argument("--guidance", type=float, default=1.0, help="CFG scale w (1: off)")
    g.add_argument("--sigma-min", type=float, default=0.002)
    g.add_argument("--sigma-max", type=float, default=80.0)
    g.add_argument("--rho", type=float, default=7.0)
    g.add_argument("--class", dest="class_label", type=int, default=None,
                   help="one class for every image (default: seed %% num_classes)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    g.add_argument("--batch", type=int, default=64, help="images per sampler call")
    g.add_argument("--device", default="auto")


def _spec(a: argparse.Namespace):
    from .sampling import SampleSpec

    return SampleSpec(sampler=a.sampler, steps=a.steps, churn=a.churn, s_tmin=a.s_tmin,
                      s_tmax=a.s_tmax, s_noise=a.s_noise, eta=a.eta, guidance=a.guidance,
                      sigma_min=a.sigma_min, sigma_max=a.sigma_max, rho=a.rho,
                      class_label=a.class_label, precision=a.precision)


def _dist() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def cmd_sample(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from .model import load_model
    from .sampling import assemble, check_settings, parse_seeds, run_shard, settings_record

    seeds = parse_seeds(a.seeds)
    rank, world, local = _dist()
    device = _device(a.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    model, meta = load_model(a.checkpoint, device)
    spec = _spec(a).validate(meta)
    out = Path(a.out)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # only barriers: gloo works on CPU and GPU hosts
    if rank == 0:
        check_settings(out, settings_record(spec, meta, a.checkpoint))
    if world > 1:
        dist.barrier()
    if rank != 0:
        check_settings(out, settings_record(spec, meta, a.checkpoint))
    stats = run_shard(model, meta, seeds, spec, out, rank=rank, world=world, chunk=a.chunk,
                      batch_size=a.batch, device=device, progress=not a.no_progress)
    if world > 1:
        dist.barrier()
    result = {"out": str(out), "images": len(seeds), "rank": rank, "world": world, **stats}
    if rank == 0:
        result["samples"] = str(assemble(out, seeds, chunk=a.chunk, grid=a.grid))
        result["grid"] = str(out / "grid.png") if a.grid else None
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result if rank == 0 else {}


def _images_to_score(a: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """(images, labels, model meta or None): a sample dir/.npz, or a checkpoint sampled now."""
    from .data import load_images
    from .model import load_model

    src = Path(a.source)
    is_samples = (src.is_dir() and ((src / "samples.npz").is_file() or (src / "chunks").is_dir())
                  ) or src.suffix == ".npz"
    if is_samples:
        images, labels = load_images(src)
        return images, labels, None
    from .sampling import generate, parse_seeds

    model, meta = load_model(src, _device(a.device))
    seeds = parse_seeds(a.seeds) if a.seeds else list(range(a.num))
    images, labels, _ = generate(model, meta, seeds, _spec(a), device=_device(a.device),
                                 batch_size=a.batch)
    return images, (labels if labels is not None else np.full(len(seeds), -1)), meta


def cmd_metrics(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from . import metrics as M
    from .data import load_images

    images, labels, meta = _images_to_score(a)
    res = int(meta["resolution"]) if meta else images.shape[1]
    ref, _ = load_images(a.ref, resolution=res)
    if ref.shape[1:] != images.shape[1:] and not a.ref.startswith("digits"):
        print(f"note: samples are {images.shape[1:]}, reference {ref.shape[1:]} (H, W, C)",
              file=sys.stderr)
    cuda = torch.cuda.is_available() and _device(a.device).startswith("cuda")
    out: dict[str, Any] = {"samples": len(images), "reference": len(ref), "ref": a.ref}
    wanted = tuple(m for m in a.metrics.split(",") if m)
    digits_ref = a.ref == "digits" or a.ref.startswith("digits:")
    if digits_ref:
        from . import digits

        # (no KID here: the polynomial kernel on these unnormalised features is all variance)
        d = M.compute_metrics(images, ref, extractor="digits", metrics=("fid", "prc"), cuda=cuda)
        out["digits"] = {
            "note": "vdmpp-digits classifier features (NOT Inception FID)",
            "frechet_distance": d["fid"],
            "precision": d["precision"],
            "recall": d["recall"],
            "classifier_test_accuracy": digits.classifier_accuracy(),
        }
        if (labels >= 0).any():
            pred = digits.predict(images)
            has = labels >= 0
            out["digits"]["class_accuracy"] = float((pred[has] == labels[has]).mean())
    try:
        weights = M.inception_weights(a.inception_weights, required=not digits_ref)
    except EvalError:
        raise
    if weights is None:
        out["inception"] = ("skipped: no Inception weights (pass --inception-weights PATH or set "
                            f"VDMPP_INCEPTION_WEIGHTS; download {M.INCEPTION_URL})")
    else:
        out["inception"] = M.compute_metrics(images, ref, weights=weights, metrics=wanted,
                                             cuda=cuda, kid_subsets=a.kid_subsets)
    return out


def cmd_bpd(a: argparse.Namespace) -> dict[str, Any]:
    from .bpd import bpd_of_export
    from .data import load_images
    from .model import load_model

    device = _device(a.device)
    model, meta = load_model(a.checkpoint, device)
    images, labels = load_images(a.data, resolution=int(meta["resolution"]))
    if a.limit:
        images, labels = images[: a.limit], labels[: a.limit]
    r = bpd_of_export(model, meta, images, labels, draws=a.draws, steps=a.discrete_steps,
                      batch_size=a.batch, seed=a.seed, progress=not a.no_progress)
    return {"data": a.data, **r.as_dict()}


def cmd_plot(a: argparse.Namespace) -> dict[str, Any]:
    from .plot import plot_run, plot_schedules, plot_weightings

    out = Path(a.out)
    files = [plot_schedules(out / "schedules.png"), plot_weightings(out / "weightings.png")]
    if a.run:
        files.append(plot_run(a.run, out / "run.png"))
    return {"files": [str(f) for f in files]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vdmpp-eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="draw images for a list of seeds (resumable, sharded)")
    s.add_argument("checkpoint", help="run dir, RUN/export or RUN/export/ema.safetensors")
    s.add_argument("--seeds", required=True, help="e.g. 0-49999 or 0,5,10-19")
    s.add_argument("--out", required=True)
    s.add_argument("--chunk", type=int, default=500, help="seeds per resumable chunk file")
    s.add_argument("--grid", type=int, default=64, help="images in grid.png (0: none)")
    s.add_argument("--no-progress", action="store_true")
    _add_sampling_args(s)

    m = sub.add_parser("metrics", help="FID/IS/KID/PR (and the digits FD/accuracy)")
    m.add_argument("source", help="a `sample` output dir, an .npz, or a checkpoint to sample")
    m.add_argument("--ref", required=True,
                   help="digits[:train|:test|:all], shards dir/pattern, .npz or sample dir")
    m.add_argument("--inception-weights", default=None,
                   help="local Inception file (default: $VDMPP_INCEPTION_WEIGHTS)")
    m.add_argument("--metrics", default="fid,isc,kid,prc")
    m.add_argument("--kid-subsets", type=int, default=100)
    m.add_argument("--num", type=int, default=1000, help="images to sample from a checkpoint")
    m.add_argument("--seeds", default=None, help="seeds to sample (overrides --num)")
    _add_sampling_args(m)

    b = sub.add_parser("bpd", help="VDM bound in bits/dim on held-out data")
    b.add_argument("checkpoint")
    b.add_argument("--data", required=True, help="digits[:test|:train|:all], shards or .npz")
    b.add_argument("--draws", type=int, default=1, help="MC draws of (t, ε) per image")
    b.add_argument("--discrete-steps", type=int, default=None, help="T of the discrete bound")
    b.add_argument("--limit", type=int, default=0, help="use only the first N images")
    b.add_argument("--batch", type=int, default=256)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto")
    b.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("plot", help="schedules p(λ), weightings w(λ), a run's adaptive density")
    q.add_argument("--out", required=True, help="directory for the PNG files")
    q.add_argument("--run", default=None, help="a vdmpp-train run directory")
    return p


_COMMANDS = {"sample": cmd_sample, "metrics": cmd_metrics, "bpd": cmd_bpd, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        result = _COMMANDS[a.command](a)
    except EvalError as e:
        print(f"vdmpp-eval {a.command}: error: {e}", file=sys.stderr)
        return 2
    if result:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
