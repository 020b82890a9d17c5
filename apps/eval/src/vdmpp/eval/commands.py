"""The four commands of ``vdmpp-eval`` as plain functions: :func:`sample`, :func:`metrics`,
:func:`bpd`, :func:`plot`.

Each takes keyword arguments named like the CLI's flags, checks every input before any work,
raises :class:`~vdmpp.eval.model.EvalError` for a user error, and returns the JSON-able result
the CLI prints (``{}`` on ranks other than 0). Tests call them without a subprocess.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import sampling
from .model import EvalError, load_model
from .runtime import device_name, join, leave, progress_on, require_done
from .spec import SampleSpec

__all__ = ["BPD_METHODS", "METRICS", "bpd", "metrics", "phema", "plot", "sample"]

_log = logging.getLogger("vdmpp.eval")

METRICS = ("fid", "isc", "kid", "prc")
_AT_LEAST = {
    "batch": 1,
    "chunk": 1,
    "grid": 0,
    "num": 1,
    "kid_subsets": 1,
    "draws": 1,
    "limit": 0,
    "discrete_steps": 1,
}


def _counts(**values: int | None) -> None:
    """Counts checked before any work (a negative ``--batch`` must not write empty chunks)."""
    for name, v in values.items():
        lo = _AT_LEAST[name]
        if v is not None and v < lo:
            raise EvalError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")


def _seeds(seeds: str | Sequence[int]) -> list[int]:
    return sampling.parse_seeds(seeds) if isinstance(seeds, str) else sorted(set(seeds))


def _load_guide(spec: SampleSpec, device: Any, allow_partial: bool) -> tuple[Any, dict] | None:
    """(model, model.json) of ``spec.guide`` (a run or export, refused like the model when its
    run is not done), or None."""
    if spec.guide is None:
        return None
    require_done(spec.guide, allow_partial)
    try:
        return load_model(spec.guide, device)
    except EvalError as e:
        raise EvalError(f"--guide: {e}") from None


def sample(
    checkpoint: str | Path,
    *,
    seeds: str | Sequence[int],
    out: str | Path,
    spec: SampleSpec | None = None,
    chunk: int = 500,
    grid: int = 64,
    batch: int = 64,
    device: str = "auto",
    progress: bool = True,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """``vdmpp-eval sample``: draw ``seeds`` into ``out`` (resumable; sharded across ranks)."""
    device_name(device)
    spec = (spec or SampleSpec()).check()
    _counts(batch=batch, chunk=chunk, grid=grid)
    seed_list = _seeds(seeds)
    require_done(checkpoint, allow_partial)
    d = join(device)
    model, meta = load_model(checkpoint, d.device)
    spec.validate(meta)  # the model's own checks before the guide is loaded
    guide = _load_guide(spec, d.device, allow_partial)
    spec.validate(meta, guide[1] if guide else None)
    out = Path(out)
    record = sampling.settings_record(spec, meta, str(checkpoint), guide[1] if guide else None)
    if d.main:  # rank 0 writes sample.json (or refuses other settings) before the others read
        sampling.check_settings(out, record)
    d.barrier()
    if not d.main:
        sampling.check_settings(out, record)
    _log.info(
        "sample: %d seeds (%s, %d steps) with %s -> %s, %d rank(s)",
        len(seed_list),
        spec.sampler,
        spec.steps,
        checkpoint,
        out,
        d.world,
    )
    t0 = time.time()
    stats = sampling.run_shard(
        model,
        meta,
        seed_list,
        spec,
        out,
        rank=d.rank,
        world=d.world,
        chunk=chunk,
        batch_size=batch,
        device=d.device,
        progress=progress,
        guide=guide,
    )
    _log.info(
        "sample: rank %d drew %d images (%d on disk already) in %.1f s",
        d.rank,
        stats.get("done", 0),
        stats.get("skipped", 0),
        time.time() - t0,
    )
    d.barrier()
    result = {"out": str(out), "images": len(seed_list), "rank": d.rank, "world": d.world, **stats}
    if d.main:
        nfe = stats.get("nfe") or "?"
        caption = (
            f"{Path(checkpoint).name} step {meta.get('step')}, {spec.sampler} "
            f"{spec.steps} steps ({nfe} NFE), seeds {seed_list[0]}-{seed_list[-1]}"
        )
        if meta.get("num_classes"):
            caption += ", columns = classes"
        samples = sampling.assemble(
            out,
            seed_list,
            chunk=chunk,
            grid=grid,
            num_classes=meta.get("num_classes"),
            caption=caption,
        )
        result["samples"] = str(samples)
        result["grid"] = str(out / "grid.png") if grid else None
    leave(d)
    return result if d.main else {}


def _samples_source(src: Path) -> bool:
    """A ``sample`` output directory or an ``.npz`` (else: a checkpoint to sample)."""
    if src.suffix == ".npz":
        return True
    return src.is_dir() and ((src / "samples.npz").is_file() or (src / "chunks").is_dir())


def _require_samples_run_done(src: Path, allow_partial: bool) -> None:
    """The samples' own training run must be done too (the checkpoint ``sample.json`` names)."""
    made_by = src / "sample.json" if src.is_dir() else src.with_name("sample.json")
    if not made_by.is_file():
        return
    try:
        ckpt_path = json.loads(made_by.read_text()).get("checkpoint")
    except (OSError, UnicodeDecodeError, ValueError):
        ckpt_path = None
    if isinstance(ckpt_path, str):
        require_done(ckpt_path, allow_partial)


def metrics(
    source: str | Path,
    *,
    ref: str,
    inception_weights: str | Path | None = None,
    metrics: str | Sequence[str] = METRICS,
    kid_subsets: int = 100,
    num: int = 1000,
    seeds: str | Sequence[int] | None = None,
    spec: SampleSpec | None = None,
    batch: int = 64,
    device: str = "auto",
    progress: bool = True,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """``vdmpp-eval metrics``: FID/IS/KID/PR (and the digits FD/accuracy) of ``source``.

    Everything that can fail is checked before any image is drawn: the metric names, the
    Inception weights, the checkpoint, the reference set and that its resolution matches."""
    import torch

    from . import metrics as M
    from .data import load_images

    device = device_name(device)
    spec = (spec or SampleSpec()).check()
    _counts(batch=batch, num=num, kid_subsets=kid_subsets)
    text = metrics if isinstance(metrics, str) else ",".join(metrics)
    wanted = tuple(m for m in text.split(",") if m)
    if not wanted or any(m not in METRICS for m in wanted):
        raise EvalError(f"--metrics {text!r}: use a comma-separated subset of {','.join(METRICS)}")
    digits_ref = ref == "digits" or ref.startswith("digits:")
    weights = M.inception_weights(inception_weights, required=not digits_ref)
    src = Path(source)
    model = meta = images = labels = seed_list = guide = None
    if _samples_source(src):
        _require_samples_run_done(src, allow_partial)
        images, labels = load_images(src)
        shape = tuple(images.shape[1:])
    else:
        require_done(src, allow_partial)
        model, meta = load_model(src, device)
        seed_list = _seeds(seeds) if seeds else list(range(num))
        spec.validate(meta)
        guide = _load_guide(spec, device, allow_partial)
        spec.validate(meta, guide[1] if guide else None)
        r = int(meta["resolution"])
        shape = (r, r, int(meta["channels"]))
    reference, _ = load_images(ref, resolution=shape[0])
    if tuple(reference.shape[1:]) != shape and not digits_ref:
        h, w, c = reference.shape[1:]
        raise EvalError(
            f"--ref {ref} holds {h}×{w}×{c} images but the samples are "
            f"{shape[0]}×{shape[1]}×{shape[2]} (H×W×C); use a reference at the samples' "
            f"resolution (vdmpp-train shards SRC OUT --resolution {shape[0]})"
        )
    if images is None:  # sample now, every check passed
        from vdmpp.train.log import Progress

        _log.info("metrics: sampling %d images from %s", len(seed_list), src)
        bar = Progress(
            len(seed_list), "img", desc="metrics: sample", enabled=progress, emit=_log.info
        )
        images, labels, _ = sampling.generate(
            model,
            meta,
            seed_list,
            spec,
            device=device,
            batch_size=batch,
            progress=bar.update,
            guide=guide,
        )
        bar.close()
        if labels is None:
            labels = np.full(len(seed_list), -1)
    cuda = torch.cuda.is_available() and device.startswith("cuda")
    _log.info(
        "metrics: %d samples against %d reference images (%s)", len(images), len(reference), ref
    )
    out: dict[str, Any] = {"samples": len(images), "reference": len(reference), "ref": ref}
    if digits_ref:
        out["digits"] = _digits_scores(images, labels, reference, cuda)
    if weights is None:
        out["inception"] = (
            "skipped: no Inception weights (pass --inception-weights PATH or set "
            f"VDMPP_INCEPTION_WEIGHTS; download {M.INCEPTION_URL})"
        )
    else:
        out["inception"] = M.compute_metrics(
            images, reference, weights=weights, metrics=wanted, cuda=cuda, kid_subsets=kid_subsets
        )
    return out


def _digits_scores(
    images: np.ndarray, labels: np.ndarray, reference: np.ndarray, cuda: bool
) -> dict[str, Any]:
    """The digits classifier's Fréchet distance, precision/recall and class accuracy."""
    from . import digits
    from . import metrics as M

    # (no KID here: the polynomial kernel on these unnormalised features is all variance)
    d = M.compute_metrics(images, reference, extractor="digits", metrics=("fid", "prc"), cuda=cuda)
    out = {
        "note": "vdmpp-digits classifier features (NOT Inception FID)",
        "frechet_distance": d["fid"],
        "precision": d["precision"],
        "recall": d["recall"],
        "classifier_test_accuracy": digits.classifier_accuracy(),
    }
    has = labels >= 0
    if has.any():
        pred = digits.predict(images)
        out["class_accuracy"] = float((pred[has] == labels[has]).mean())
    return out


BPD_METHODS = ("vlb", "ode", "both")


def bpd(
    checkpoint: str | Path,
    *,
    data: str,
    method: str = "vlb",
    draws: int = 1,
    discrete_steps: int | None = None,
    limit: int = 0,
    batch: int = 256,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "auto",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    ode_batch: int = 64,
    out: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """``vdmpp-eval bpd``: bits/dim of ``data`` under the model — VDM's bound (``vlb``), the
    probability-flow ODE likelihood (``ode``, resumable in ``out``; vdmpp.eval.ode) or both, on
    the same images."""
    from .bpd import bpd_of_export
    from .data import load_images

    if method not in BPD_METHODS:
        raise EvalError(f"--method {method!r}: use one of {', '.join(BPD_METHODS)}")
    device = device_name(device)
    _counts(draws=draws, discrete_steps=discrete_steps, limit=limit, batch=batch)
    ode_settings = None
    if method != "vlb":
        from .ode import ODESettings, require_torchdiffeq

        ode_settings = ODESettings(
            rtol=rtol,
            atol=atol,
            divergence=divergence,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            seed=seed,
            batch=ode_batch,
        ).check()
        require_torchdiffeq()
    require_done(checkpoint, allow_partial)
    model, meta = load_model(checkpoint, device)
    images, labels = load_images(
        data, resolution=int(meta["resolution"]), num_classes=meta.get("num_classes")
    )
    if limit:
        images, labels = images[:limit], labels[:limit]
    result: dict[str, Any] = {"data": data, "method": method}
    per_image: dict[str, np.ndarray] = {}
    if ode_settings is not None:  # every check of the ODE settings before the VLB's work
        from . import ode as O

        ode_settings = ode_settings.resolved(meta)
        record = O.settings_record(ode_settings, meta, checkpoint, data, images, labels, device)
        ode_out = Path(out) if out is not None else O.default_out(record)
        O.check_record(ode_out, record)
    if method in ("vlb", "both"):
        _log.info("bpd vlb: %d images x %d draws of %s", len(images), draws, data)
        t0 = time.time()
        r = bpd_of_export(
            model,
            meta,
            images,
            labels,
            draws=draws,
            steps=discrete_steps,
            batch_size=batch,
            seed=seed,
            progress=progress_on(progress),
        )
        _log.info("bpd vlb: %.4f ± %.4f bits/dim in %.1f s", r.bpd, r.stderr, time.time() - t0)
        if r.per_image is not None:
            per_image["vlb"] = r.per_image
        if method == "vlb":
            result.update(r.as_dict())
        else:
            result["vlb"] = r.as_dict()
    if ode_settings is not None:
        _log.info(
            "bpd ode: %d images of %s (%s divergence, rtol %g, atol %g, σ %g-%g) -> %s",
            len(images),
            data,
            ode_settings.divergence,
            ode_settings.rtol,
            ode_settings.atol,
            ode_settings.sigma_min,
            ode_settings.sigma_max,
            ode_out,
        )
        t0 = time.time()
        o = O.ode_bpd(
            model,
            meta,
            images,
            labels,
            settings=ode_settings,
            out=ode_out,
            device=device,
            progress=progress,
        )
        per_image["ode"] = o.pop("per_image")
        _log.info(
            "bpd ode: %.4f ± %.4f bits/dim, %.0f NFE in %.1f s",
            o["bpd"],
            o["stderr"],
            o["nfe_mean"],
            time.time() - t0,
        )
        if method == "ode":
            result.update(o)
        else:
            result["ode"] = o
    if method == "both":
        d = per_image["ode"] - per_image["vlb"]  # paired over the same images
        result["ode_minus_vlb"] = {
            "mean": float(d.mean()),
            "stderr": float(d.std(ddof=1) / np.sqrt(len(d))),
        }
    return result


def phema(
    run: str | Path,
    *,
    out: str | Path,
    std: Sequence[float] | None = None,
    sweep: int | None = None,
    at_images: int | None = None,
    progress: bool = True,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """``vdmpp-eval phema``: exports of the run's post-hoc EMA at σ_rel ``std`` (or a ``sweep``
    of that many between 0.02 and 0.2) from ``RUN/phema`` (vdmpp.eval.posthoc)."""
    from .posthoc import reconstruct_exports, sweep_stds

    stds = list(std or [])
    if sweep is not None:
        stds += [s for s in sweep_stds(sweep) if s not in stds]
    if not stds:
        raise EvalError("give --std S [S ...] or --sweep [N]")
    require_done(run, allow_partial)
    return reconstruct_exports(run, stds, out, at_images=at_images)


def plot(*, out: str | Path, run: str | Path | None = None, progress: bool = True) -> dict:
    """``vdmpp-eval plot``: schedules and weightings (+ a run's p(λ), e^{u(λ)}, training and
    in-training evaluation curves) as PNGs; ``run_panels`` names the run figure's panels."""
    from .plot import draw_run, plot_schedules, plot_weightings

    out = Path(out)
    titles: list[str] = []

    def run_figure(path: Path) -> Path:
        done, drawn = draw_run(run, path)
        titles.extend(drawn)
        return done

    jobs: Any = [(plot_schedules, out / "schedules.png"), (plot_weightings, out / "weightings.png")]
    if run:
        jobs.append((run_figure, out / "run.png"))
    if progress_on(progress):
        from tqdm import tqdm

        jobs = tqdm(jobs, unit="plot", desc="plot", dynamic_ncols=True)
    result: dict[str, Any] = {"files": [str(fn(path)) for fn, path in jobs]}
    if run:
        result["run_panels"] = titles
    return result
