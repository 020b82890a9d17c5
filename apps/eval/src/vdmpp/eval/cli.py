"""``vdmpp-eval``: sample | metrics | bpd | plot.

    vdmpp-eval sample RUN --sampler heun --steps 18 --seeds 0-49999 --out OUT
    torchrun --nproc-per-node 8 -m vdmpp.eval sample RUN --seeds 0-49999 --out OUT
    vdmpp-eval metrics OUT --ref SHARDS [--inception-weights PATH]
    vdmpp-eval metrics RUN --ref digits --num 1000        # samples drawn in memory
    vdmpp-eval bpd RUN --data digits --draws 4
    vdmpp-eval plot --out plots/ [--run RUN]

User errors (bad paths, formats, arguments) print one line to stderr and exit with status 2.
So does a training run that is not ``done`` (its ``status.json`` says preempted, running,
stopped-nonfinite or failed): ``sample``, ``metrics`` and ``bpd`` refuse to report results of
it unless ``--allow-partial`` is given. Progress bars only on a terminal; otherwise (a SLURM or
CI log) plain timestamped lines from the ``vdmpp.eval`` logger on stderr. The result is one
JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .model import EvalError

__all__ = ["main"]

_log = logging.getLogger("vdmpp.eval")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(?::\d+)?")
_PACKAGES = ("vdmpp-schedules", "vdmpp-losses", "vdmpp-samplers", "vdmpp-models",
             "vdmpp-kernels", "vdmpp-train", "vdmpp-eval", "torch", "torch-fidelity")


def _device(name: str) -> str:
    """A validated, available device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``."""
    import torch

    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise EvalError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N, mps or auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EvalError(f"--device {name}: no CUDA device is available here; use --device "
                            "cpu (or auto)")
        n, idx = torch.cuda.device_count(), int(name.partition(":")[2] or 0)
        if idx >= n:
            raise EvalError(f"--device {name}: this machine has {n} CUDA device(s), "
                            f"cuda:0 to cuda:{n - 1}")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise EvalError("--device mps: Apple's MPS backend is not available here; use "
                            "--device cpu (or auto)")
    return name


def _versions() -> str:
    """One line per vdmpp distribution and torch: ``name version`` (or ``not installed``)."""
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for dist in _PACKAGES:
        try:
            lines.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            lines.append(f"{dist} not installed")
    return "\n".join(lines)


class _Version(argparse.Action):
    """``--version``: one line per package (argparse's own action would re-wrap them)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(_versions())
        parser.exit()


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .sampling import SAMPLERS

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="heun", choices=SAMPLERS, help="sampler (EDM Alg. 1/2, "
                   "DDPM ancestral, DDIM, Euler)")
    g.add_argument("--steps", type=int, default=18, help="grid steps N (Heun: 2N-1 NFE)")
    g.add_argument("--churn", type=float, default=0.0, help="S_churn (edm sampler)")
    g.add_argument("--s-tmin", type=float, default=0.0, help="S_tmin (edm sampler)")
    g.add_argument("--s-tmax", type=float, default=math.inf, help="S_tmax (edm sampler)")
    g.add_argument("--s-noise", type=float, default=1.0, help="S_noise (edm sampler)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM η (0: deterministic)")
    g.add_argument("--guidance", type=float, default=1.0, help="CFG scale w (1: off)")
    g.add_argument("--sigma-min", type=float, default=0.002, help="smallest σ of the grid")
    g.add_argument("--sigma-max", type=float, default=80.0, help="largest σ of the grid")
    g.add_argument("--rho", type=float, default=7.0, help="ρ of EDM's σ grid (EDM eq. 5)")
    g.add_argument("--class", dest="class_label", type=int, default=None,
                   help="one class for every image (default: seed %% num_classes)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: autocast the network")
    g.add_argument("--batch", type=int, default=64, help="images per sampler call")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (terminal) or progress lines (log); warnings only")


def _add_allow_partial(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-partial", action="store_true",
                   help="use a training run whose status.json is not 'done' (preempted, "
                   "running, stopped-nonfinite, failed); its numbers are not final")


def _progress(a: argparse.Namespace) -> bool:
    """A tqdm bar only when asked for and stderr is a terminal (never ``\\r`` in a log)."""
    from vdmpp.train.log import progress_allowed

    return progress_allowed(not a.no_progress)


def _require_done(path: str | Path, a: argparse.Namespace) -> None:
    """Refuse a run that did not finish (``RUN/status.json``), unless ``--allow-partial``."""
    from vdmpp.train.status import StatusError, require_done

    try:
        rec = require_done(path, allow_partial=a.allow_partial)
    except StatusError as e:
        raise EvalError(str(e)) from None
    if rec is not None and rec.get("status") != "done":
        _log.warning("%s: the training run is %s (--allow-partial): these numbers are not "
                     "final", path, rec.get("status"))


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
    _require_done(a.checkpoint, a)
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
    _log.info("sample: %d seeds (%s, %d steps) with %s -> %s, %d rank(s)", len(seeds),
              a.sampler, a.steps, a.checkpoint, out, world)
    t0 = time.time()
    stats = run_shard(model, meta, seeds, spec, out, rank=rank, world=world, chunk=a.chunk,
                      batch_size=a.batch, device=device, progress=not a.no_progress)
    _log.info("sample: rank %d drew %d images (%d on disk already) in %.1f s", rank,
              stats.get("done", 0), stats.get("skipped", 0), time.time() - t0)
    if world > 1:
        dist.barrier()
    result = {"out": str(out), "images": len(seeds), "rank": rank, "world": world, **stats}
    if rank == 0:
        caption = (f"{Path(a.checkpoint).name} step {meta.get('step')}, {a.sampler} "
                   f"{a.steps} steps ({stats.get('nfe') or '?'} NFE), seeds {seeds[0]}-{seeds[-1]}"
                   + (", columns = classes" if meta.get("num_classes") else ""))  # fmt: skip
        result["samples"] = str(assemble(out, seeds, chunk=a.chunk, grid=a.grid,
                                         num_classes=meta.get("num_classes"), caption=caption))
        result["grid"] = str(out / "grid.png") if a.grid else None
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result if rank == 0 else {}


_METRICS = ("fid", "isc", "kid", "prc")


def cmd_metrics(a: argparse.Namespace) -> dict[str, Any]:
    """Everything that can fail is checked before any image is drawn: the metric names, the
    Inception weights, the checkpoint, the reference set and that its resolution matches."""
    import torch

    from . import metrics as M
    from .data import load_images
    from .model import load_model
    from .sampling import generate, parse_seeds

    wanted = tuple(m for m in a.metrics.split(",") if m)
    bad = [m for m in wanted if m not in _METRICS]
    if bad or not wanted:
        raise EvalError(f"--metrics {a.metrics!r}: use a comma-separated subset of "
                        f"{','.join(_METRICS)}")
    digits_ref = a.ref == "digits" or a.ref.startswith("digits:")
    weights = M.inception_weights(a.inception_weights, required=not digits_ref)
    src = Path(a.source)
    is_samples = (src.is_dir() and ((src / "samples.npz").is_file() or (src / "chunks").is_dir())
                  ) or src.suffix == ".npz"
    model = meta = images = labels = seeds = None
    if is_samples:
        made_by = src / "sample.json" if src.is_dir() else src.with_name("sample.json")
        if made_by.is_file():  # the samples' own run must be done too
            try:
                ckpt_path = json.loads(made_by.read_text()).get("checkpoint")
            except (OSError, UnicodeDecodeError, ValueError):
                ckpt_path = None
            if isinstance(ckpt_path, str):
                _require_done(ckpt_path, a)
        images, labels = load_images(src)
        shape = tuple(images.shape[1:])
    else:
        _require_done(src, a)
        model, meta = load_model(src, a.device)
        seeds = parse_seeds(a.seeds) if a.seeds else list(range(a.num))
        _spec(a).validate(meta)
        r = int(meta["resolution"])
        shape = (r, r, int(meta["channels"]))
    ref, _ = load_images(a.ref, resolution=shape[0])
    if tuple(ref.shape[1:]) != shape and not digits_ref:
        raise EvalError(f"--ref {a.ref} holds {ref.shape[1]}×{ref.shape[2]}×{ref.shape[3]} "
                        f"images but the samples are {shape[0]}×{shape[1]}×{shape[2]} (H×W×C); "
                        f"use a reference at the samples' resolution (vdmpp-train shards SRC "
                        f"OUT --resolution {shape[0]})")
    if images is None:  # sample now, every check passed
        from vdmpp.train.log import Progress

        _log.info("metrics: sampling %d images from %s", len(seeds), src)
        bar = Progress(len(seeds), "img", desc="metrics: sample", enabled=not a.no_progress,
                       emit=_log.info)  # fmt: skip
        images, labels, _ = generate(model, meta, seeds, _spec(a), device=a.device,
                                     batch_size=a.batch, progress=bar.update)
        bar.close()
        if labels is None:
            labels = np.full(len(seeds), -1)
    cuda = torch.cuda.is_available() and a.device.startswith("cuda")
    _log.info("metrics: %d samples against %d reference images (%s)", len(images), len(ref),
              a.ref)
    out: dict[str, Any] = {"samples": len(images), "reference": len(ref), "ref": a.ref}
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

    _require_done(a.checkpoint, a)
    device = _device(a.device)
    model, meta = load_model(a.checkpoint, device)
    images, labels = load_images(a.data, resolution=int(meta["resolution"]),
                                 num_classes=meta.get("num_classes"))
    if a.limit:
        images, labels = images[: a.limit], labels[: a.limit]
    _log.info("bpd: %d images x %d draws of %s", len(images), a.draws, a.data)
    t0 = time.time()
    r = bpd_of_export(model, meta, images, labels, draws=a.draws, steps=a.discrete_steps,
                      batch_size=a.batch, seed=a.seed, progress=_progress(a))
    _log.info("bpd: %.4f ± %.4f bits/dim in %.1f s", r.bpd, r.stderr, time.time() - t0)
    return {"data": a.data, **r.as_dict()}


def cmd_plot(a: argparse.Namespace) -> dict[str, Any]:
    from .plot import plot_run, plot_schedules, plot_weightings

    out = Path(a.out)
    jobs = [(plot_schedules, out / "schedules.png"), (plot_weightings, out / "weightings.png")]
    if a.run:
        run = a.run
        jobs.append((lambda path: plot_run(run, path), out / "run.png"))
    if _progress(a):
        from tqdm import tqdm

        jobs = tqdm(jobs, unit="plot", desc="plot", dynamic_ncols=True)
    return {"files": [str(fn(path)) for fn, path in jobs]}


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="vdmpp-eval", description=__doc__.split("\n")[0],
                                formatter_class=fmt)
    p.add_argument("--version", action=_Version, help="versions of every vdmpp package and torch")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="draw images for a list of seeds (resumable, sharded)",
                       formatter_class=fmt)
    s.add_argument("checkpoint", help="run dir, RUN/export or RUN/export/ema.safetensors")
    s.add_argument("--seeds", required=True, help="e.g. 0-49999 or 0,5,10-19")
    s.add_argument("--out", required=True, help="output directory (chunks/, samples.npz)")
    s.add_argument("--chunk", type=int, default=500, help="seeds per resumable chunk file")
    s.add_argument("--grid", type=int, default=64, help="images in grid.png (0: none)")
    _add_sampling_args(s)
    _add_allow_partial(s)

    m = sub.add_parser("metrics", help="FID/IS/KID/PR (and the digits FD/accuracy)",
                       formatter_class=fmt)
    m.add_argument("source", help="a `sample` output dir, an .npz, or a checkpoint to sample")
    m.add_argument("--ref", required=True,
                   help="digits[:train|:test|:all], shards dir/pattern, .npz or sample dir")
    m.add_argument("--inception-weights", default=None,
                   help="local Inception file; None: $VDMPP_INCEPTION_WEIGHTS, then torch hub's "
                   "cache")
    m.add_argument("--metrics", default="fid,isc,kid,prc",
                   help="comma-separated subset of fid,isc,kid,prc (Inception)")
    m.add_argument("--kid-subsets", type=int, default=100, help="KID subsets")
    m.add_argument("--num", type=int, default=1000, help="images to sample from a checkpoint")
    m.add_argument("--seeds", default=None, help="seeds to sample (overrides --num)")
    _add_sampling_args(m)
    _add_allow_partial(m)

    b = sub.add_parser("bpd", help="VDM bound in bits/dim on held-out data", formatter_class=fmt)
    b.add_argument("checkpoint", help="run dir, RUN/export or RUN/export/ema.safetensors")
    b.add_argument("--data", required=True, help="digits[:test|:train|:all], shards or .npz")
    b.add_argument("--draws", type=int, default=1, help="MC draws of (t, ε) per image")
    b.add_argument("--discrete-steps", type=int, default=None, help="T of the discrete bound")
    b.add_argument("--limit", type=int, default=0, help="use only the first N images")
    b.add_argument("--batch", type=int, default=256, help="images per forward pass")
    b.add_argument("--seed", type=int, default=0, help="seed of the (t, ε) draws")
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_allow_partial(b)

    q = sub.add_parser("plot", help="schedules, weightings, a run's p(λ) and training curves",
                       formatter_class=fmt)
    q.add_argument("--out", required=True, help="directory for the PNG files")
    q.add_argument("--run", default=None, help="a vdmpp-train run directory")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_AT_LEAST = {"batch": 1, "chunk": 1, "grid": 0, "num": 1, "kid_subsets": 1, "draws": 1,
             "limit": 0, "discrete_steps": 1, "steps": 1}
_FINITE = ("churn", "s_tmin", "s_noise", "eta", "guidance", "sigma_min", "sigma_max", "rho")


def _check_numbers(a: argparse.Namespace) -> None:
    """Counts and sampler numbers checked before any work (``--batch -1`` used to write empty
    chunks that counted as done; ``--batch 0`` was a traceback)."""
    for name, lo in _AT_LEAST.items():
        v = getattr(a, name, None)
        if v is not None and v < lo:
            raise EvalError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    for name in _FINITE:
        v = getattr(a, name, None)
        if v is not None and not math.isfinite(v):
            raise EvalError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if getattr(a, "s_tmax", None) is not None and math.isnan(a.s_tmax):
        raise EvalError("--s-tmax must be a number (inf allowed), got nan")


_COMMANDS = {"sample": cmd_sample, "metrics": cmd_metrics, "bpd": cmd_bpd, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from vdmpp.train.log import configure, console

    handler = console(configure("eval", rank=_dist()[0], buffer=False))
    if getattr(a, "no_progress", False) and handler is not None:
        handler.setLevel(logging.WARNING)  # --no-progress: neither a bar nor progress lines
    try:
        if hasattr(a, "device"):  # checked before any work
            a.device = _device(a.device)
        _check_numbers(a)
        result = _COMMANDS[a.command](a)
    except EvalError as e:
        msg = re.sub(r"\s*\n\s*", " ", str(e).strip())  # one line, always
        print(f"vdmpp-eval {a.command}: error: {msg}", file=sys.stderr)
        return 2
    if result:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
