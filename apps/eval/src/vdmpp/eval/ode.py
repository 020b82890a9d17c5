"""``vdmpp-eval bpd --method ode``: bits/dim of the probability-flow ODE likelihood
(``vdmpp.samplers.log_likelihood``; Song et al. 2021 §4.3, App. D.2), batched and resumable.

Dequantization. vdmpp's 8-bit data are the bin centres x = k/127.5 − 1 (k = 0…255), bins of
width Δ = (hi − lo)/255 = 2/255 in the model's units. Each example gets one uniform draw
u ~ U(−Δ/2, Δ/2)^d and the ODE gives log p(x + u), the model's density at σ_min (its data
distribution convolved with N(0, σ_min² I)). Then

    bits/dim = −(log p(x + u) + d·log Δ) / (d·ln 2)

is, in expectation over u, an **upper bound** on the model's discrete negative log-likelihood
−log₂ P(k)/d with P(k) = ∫_bin p (Jensen: log ∫_bin p = log Δ^d E_u[p] ≥ d log Δ + E_u[log p];
Theis et al. 2016; uniform dequantization, Song et al. 2021 App. D.2 and Kingma et al. 2021
App. on VDM's likelihood). It holds for any density p, whatever σ_min. The standard error is
over examples (it includes the noise of the u draw and, with ``hutchinson``, of the probe).

Noise. The u of example i and its Hutchinson probe come from one generator seeded with
``(seed << 32) + i`` (``vdmpp.samplers.PerSampleGenerator``): u = Δ·(Φ(n) − ½) for a standard
normal n, then the probe. So an example's draws do not depend on the batch (the adaptive step
sizes do: dopri5 takes one step size per batch, so ``--batch`` is part of the settings).

Resume. ``OUT/bpd.json`` records the settings; each batch's per-example nats, bits/dim and NFE
go to ``OUT/ode/batch-<first>-<last>.npz`` atomically (``vdmpp.train.fileio``) as soon as it is
done. A rerun skips the batches on disk; other settings in an existing ``OUT`` are refused.
Without ``--out`` the folder is ``$VDMPP_CACHE/bpd/<hash of the settings>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdmpp.train.fileio import write_atomic, write_json_atomic

from .model import EvalError, denoiser_for, from_uint8

__all__ = [
    "DIVERGENCES",
    "EDM_SIGMAS",
    "ODESettings",
    "bits_per_dim_of_nats",
    "default_sigmas",
    "ode_bpd",
    "require_torchdiffeq",
]

_log = logging.getLogger("vdmpp.eval")

DIVERGENCES = ("auto", "exact", "hutchinson")
EXACT_UP_TO = 256
"""``--divergence auto``: the exact trace up to this many dimensions (d backward passes per
evaluation), Hutchinson's estimator above."""
EDM_SIGMAS = (0.002, 80.0)
"""EDM's σ range (Karras et al. 2022), the default ODE range where the model was trained on it."""
INSTALL = "pip install 'vdmpp-samplers[likelihood]'"


def require_torchdiffeq() -> None:
    """One clear line when the optional ODE solver is missing (before any work)."""
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        raise EvalError(
            f"--method ode needs torchdiffeq (the [likelihood] extra of vdmpp-samplers): {INSTALL}"
        ) from None


def default_sigmas(meta: dict) -> tuple[float, float]:
    """EDM's (0.002, 80) clipped to the σ range the model was trained on: λ ∈ [logsnr_min,
    logsnr_max] of ``model.json`` is σ = e^{−λ/2} ∈ [e^{−λ_max/2}, e^{−λ_min/2}]."""
    lo, hi = EDM_SIGMAS
    lmin, lmax = meta.get("logsnr_min"), meta.get("logsnr_max")
    if isinstance(lmax, int | float) and math.isfinite(lmax):
        lo = max(lo, math.exp(-float(lmax) / 2))
    if isinstance(lmin, int | float) and math.isfinite(lmin):
        hi = min(hi, math.exp(-float(lmin) / 2))
    return lo, hi


def bits_per_dim_of_nats(nats: np.ndarray, dims: int, bin_width: float) -> np.ndarray:
    """−(nats + d·log Δ)/(d·ln 2): the dequantized bound of the module docstring."""
    return -(np.asarray(nats, np.float64) + dims * math.log(bin_width)) / (dims * math.log(2.0))


@dataclass(frozen=True)
class ODESettings:
    """The ODE estimator's settings (recorded in ``bpd.json``; a resume must match them)."""

    rtol: float = 1e-5
    atol: float = 1e-5
    divergence: str = "auto"
    sigma_min: float | None = None  # None: default_sigmas(meta)
    sigma_max: float | None = None
    seed: int = 0
    batch: int = 64

    def check(self) -> ODESettings:
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v < math.inf):
                raise EvalError(f"--{name} must be a positive number, got {v}")
        for name in ("sigma_min", "sigma_max"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and 0 < v < math.inf):
                raise EvalError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        lo, hi = self.sigma_min, self.sigma_max
        if lo is not None and hi is not None and not lo < hi:
            raise EvalError(f"need --sigma-min < --sigma-max, got {lo:g} and {hi:g}")
        if self.divergence not in DIVERGENCES:
            raise EvalError(
                f"--divergence {self.divergence!r}: use one of {', '.join(DIVERGENCES)}"
            )
        if self.batch < 1:
            raise EvalError(f"--batch must be >= 1, got {self.batch}")
        if not 0 <= self.seed < 2**31:
            raise EvalError(f"--seed must lie in [0, 2^31), got {self.seed}")
        return self

    def resolved(self, meta: dict) -> ODESettings:
        """σ range and divergence filled in for this model (what is recorded and used)."""
        lo, hi = default_sigmas(meta)
        s_min = self.sigma_min if self.sigma_min is not None else lo
        s_max = self.sigma_max if self.sigma_max is not None else hi
        if not s_min < s_max:
            raise EvalError(
                f"the ODE's σ range is empty: sigma_min {s_min:g} >= sigma_max {s_max:g} "
                "(model.json's logsnr range clips EDM's 0.002-80; pass --sigma-min/--sigma-max)"
            )
        dims = int(meta["channels"]) * int(meta["resolution"]) ** 2
        div = self.divergence
        if div == "auto":
            div = "exact" if dims <= EXACT_UP_TO else "hutchinson"
        return ODESettings(
            rtol=float(self.rtol),
            atol=float(self.atol),
            divergence=div,
            sigma_min=float(s_min),
            sigma_max=float(s_max),
            seed=int(self.seed),
            batch=int(self.batch),
        )


def _data_digest(images: np.ndarray, labels: np.ndarray | None) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(str(images.shape).encode())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()


def settings_record(
    settings: ODESettings,
    meta: dict,
    checkpoint: str | Path,
    data: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    device: str,
) -> dict[str, Any]:
    """What ``bpd.json`` records: model, data, ODE settings and the dequantization."""
    lo, hi = (float(v) for v in meta.get("data_range", (-1.0, 1.0)))
    return {
        "method": "ode",
        "checkpoint": str(Path(checkpoint).resolve()),
        "weights_sha256": meta.get("weights_sha256"),
        "step": meta.get("step"),
        "data": str(data),
        "data_sha256": _data_digest(images, labels),
        "images": len(images),
        "device_type": torch.device(device).type,  # the noise streams are per device type
        "dequantization": "uniform",
        "bin_width": (hi - lo) / 255.0,
        **asdict(settings),
    }


def check_record(out: Path, record: dict[str, Any]) -> None:
    """Write ``OUT/bpd.json``, or refuse an existing one with other settings."""
    path = out / "bpd.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            raise EvalError(f"{path}: unreadable; delete {out} or choose another --out") from None
        keys = [k for k in record if old.get(k) != record[k]]
        if keys:
            raise EvalError(
                f"{out} holds ODE bits/dim made with other settings ({', '.join(keys)} differ: "
                f"{ {k: old.get(k) for k in keys} } vs { {k: record[k] for k in keys} }); "
                "choose another --out or delete it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def default_out(record: dict[str, Any]) -> Path:
    from .digits import cache_dir

    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "bpd" / key


def _batch_path(out: Path, first: int, last: int) -> Path:
    return out / "ode" / f"batch-{first:08d}-{last:08d}.npz"


def _load_batch(path: Path, index: np.ndarray) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {k: z[k] for k in ("index", "nats", "bpd", "nfe")}
    except Exception:  # a torn or foreign file: redo the batch
        return None
    if not np.array_equal(got["index"], index) or len(got["nats"]) != len(index):
        return None
    return got


def _dequantize(x: torch.Tensor, gen: Any, bin_width: float) -> torch.Tensor:
    """x + u, u = Δ·(Φ(n) − ½) uniform on the bin, n from each example's own generator."""
    n = gen.randn(x.shape[1:], dtype=torch.float64)
    u = bin_width * (0.5 * torch.special.erfc(-n / math.sqrt(2.0)) - 0.5)
    return (x.double() + u.to(x.device)).to(x.dtype)


def _one_batch(
    denoiser: Any,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    index: np.ndarray,
    s: ODESettings,
    bin_width: float,
) -> dict[str, np.ndarray]:
    from vdmpp.samplers import PerSampleGenerator, log_likelihood

    gen = PerSampleGenerator([(s.seed << 32) + int(i) for i in index], x.device)
    xd = _dequantize(x, gen, bin_width)
    extra = {"class_labels": labels} if labels is not None else None
    try:
        r = log_likelihood(
            denoiser,
            xd,
            sigma_min=s.sigma_min,
            sigma_max=s.sigma_max,
            rtol=s.rtol,
            atol=s.atol,
            divergence=s.divergence,
            generator=gen,
            extra_args=extra,
        )
    except ImportError:
        require_torchdiffeq()
        raise
    except FloatingPointError as e:
        raise EvalError(f"examples {index[0]}-{index[-1]}: {e}") from None
    nats = r.nats.detach().double().cpu().numpy()
    return {
        "index": index,
        "nats": nats,
        "bpd": bits_per_dim_of_nats(nats, r.dims, bin_width),
        "nfe": np.asarray(r.nfe, np.int64),
    }


def ode_bpd(
    model: Any,
    meta: dict,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    settings: ODESettings,
    out: Path,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """ODE bits/dim of uint8 ``images`` [N, H, W, C]; ``settings`` resolved, ``out`` checked.

    Returns the summary (mean, standard error over examples, mean NFE per example, the
    dequantization) and keeps the per-batch files in ``out``."""
    from vdmpp.train.log import Progress

    s = settings
    res, ch = int(meta["resolution"]), int(meta["channels"])
    if images.shape[1:] != (res, res, ch):
        raise EvalError(
            f"data images are {images.shape[1:]} but the model takes {(res, res, ch)} (H, W, C)"
        )
    n = len(images)
    if n < 2:
        raise EvalError("bits/dim needs at least 2 images (for a standard error)")
    data_range = tuple(meta.get("data_range", (-1.0, 1.0)))
    bin_width = (float(data_range[1]) - float(data_range[0])) / 255.0
    y_all = None
    if meta.get("num_classes"):
        if (labels < 0).any():
            raise EvalError("the model is class-conditional but the data have no labels")
        y_all = torch.from_numpy(np.asarray(labels, np.int64))
    denoiser = denoiser_for(model, meta)
    starts = list(range(0, n, s.batch))
    batches, todo = {}, []
    for i in starts:
        index = np.arange(i, min(i + s.batch, n), dtype=np.int64)
        got = _load_batch(_batch_path(out, int(index[0]), int(index[-1])), index)
        if got is None:
            todo.append(index)
        else:
            batches[i] = got
    resumed = sum(len(b["index"]) for b in batches.values())
    if resumed:
        _log.info("bpd ode: %d of %d images already in %s", resumed, n, out)
    bar = Progress(n - resumed, "img", desc="bpd ode", enabled=progress, emit=_log.info)
    try:
        for index in todo:
            sl = slice(int(index[0]), int(index[-1]) + 1)
            x = from_uint8(images[sl], data_range).to(device)
            y = y_all[sl].to(device) if y_all is not None else None
            got = _one_batch(denoiser, x, y, index, s, bin_width)
            write_atomic(
                _batch_path(out, int(index[0]), int(index[-1])),
                lambda f, got=got: np.savez(f, **got),
            )
            batches[int(index[0])] = got
            bar.update(len(index))
    finally:
        bar.close()
    nats = np.concatenate([batches[i]["nats"] for i in starts])
    bpd = np.concatenate([batches[i]["bpd"] for i in starts])
    nfe = np.concatenate(
        [np.full(len(batches[i]["index"]), int(batches[i]["nfe"])) for i in starts]
    )
    if not np.isfinite(bpd).all():
        raise EvalError("the ODE bits/dim is not finite for some images (a diverged model?)")
    dims = ch * res * res
    return {
        "bpd": float(bpd.mean()),
        "stderr": float(bpd.std(ddof=1) / math.sqrt(n)),
        "nfe_mean": float(nfe.mean()),
        "images": n,
        "nats_mean": float(nats.mean()),
        "dims": dims,
        "bound": (
            "upper bound (in expectation over u) on the discrete NLL -log2 P(k)/d of the model's "
            "PF-ODE density at sigma_min, by uniform dequantization"
        ),
        "dequantization": (
            f"uniform: x = k/{1 / bin_width:g} {'-' if data_range[0] < 0 else '+'} "
            f"{abs(float(data_range[0])):g}, u ~ U(-Δ/2, Δ/2)^d, Δ = {bin_width:.6g}; "
            "bits/dim = -(log p(x+u) + d log Δ)/(d ln 2)"
        ),
        "divergence": s.divergence,
        "rtol": s.rtol,
        "atol": s.atol,
        "sigma_min": s.sigma_min,
        "sigma_max": s.sigma_max,
        "seed": s.seed,
        "batch": s.batch,
        "resumed_images": resumed,
        "out": str(out),
        "per_image": bpd,
    }
