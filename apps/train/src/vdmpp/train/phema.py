"""Post-hoc EMA with power-function profiles (EDM2: Karras et al. 2024, §3 and App. C).

A power-function EMA of exponent γ averages the training trajectory θ(τ) with the profile

    p_t(τ) = (γ + 1) τ^γ / t^(γ+1)   for 0 ≤ τ ≤ t, else 0                 (EDM2 eq. 121)

whose relative standard deviation (width / t) is σ_rel (eq. 123). Training tracks a few
profiles (here σ_rel ∈ ``std``) with the per-step β of eq. 127 and writes snapshots of them
every so often; afterwards :func:`reconstruct` approximates the EMA of *any* σ_rel by the
least-squares combination of the stored snapshots whose profiles are closest, in L², to the
wanted profile (EDM2 App. C.3, Alg. 3).

Time is the number of training images ("nimg"), as in EDM2's ``training/phema.py``: a step of
``batch_size`` images that ends at ``cur_nimg`` covers (cur_nimg − batch_size, cur_nimg].

Equation numbers are those EDM2's reference code (``training/phema.py``) cites for arXiv
2312.02696; they were not re-checked against the PDF. Each formula here is re-derived in
``tests/test_phema.py`` (moments, L² inner products and the EMA recursion by quadrature or
direct summation), not copied from that code.

Its files are written by :mod:`vdmpp.train.fileio` (temp file, fsync, rename, fsync of the dir).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor, nn

from .fileio import torch_save_atomic

__all__ = [
    "MAX_STD",
    "PhemaError",
    "PowerFunctionEMA",
    "Snapshot",
    "exp_to_std",
    "load_snapshots",
    "power_function_beta",
    "power_function_correlation",
    "reconstruct",
    "save_snapshot",
    "snapshot_path",
    "solve_posthoc_coefficients",
    "std_to_exp",
]

MAX_STD = 1.0 / math.sqrt(12.0)
"""σ_rel of γ = 0 (the uniform average over the whole run): the widest profile with γ ≥ 0."""

FORMAT = "vdmpp-phema-snapshot"
VERSION = 1
_NAME = re.compile(r"phema-(\d{12})\.pt")


class PhemaError(ValueError):
    """A post-hoc EMA input that cannot be used: a corrupt, truncated, missing or inconsistent
    snapshot, or a request the snapshots cannot answer. The message names the file."""


# --------------------------------------------------------------------------------------------
# The math (float64 numpy).


def exp_to_std(exp: ArrayLike) -> NDArray[np.float64]:
    """σ_rel of the power-function profile of exponent γ (EDM2 eq. 123):

    σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))),

    the standard deviation of τ/t under p_t (eq. 121). Defined for γ > −1.
    """
    g = np.asarray(exp, dtype=np.float64)
    if not np.all(g > -1.0):
        raise ValueError(f"power-function exponent must be > -1, got {exp!r}")
    return np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def std_to_exp(std: ArrayLike) -> NDArray[np.float64]:
    """The exponent γ ≥ 0 whose profile has relative width σ_rel (EDM2 eq. 126, Alg. 2).

    Squaring eq. 123 and clearing denominators gives the cubic
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0; γ is its largest real root, which is
    ≥ 0 for 0 < σ_rel ≤ 1/√12 (:data:`MAX_STD`). The root from the companion matrix is polished
    by Newton steps in float64, so ``std_to_exp(exp_to_std(g))`` returns g to rounding.
    """
    s = np.asarray(std, dtype=np.float64)
    if not np.all((s > 0.0) & (s <= MAX_STD * (1.0 + 1e-12))):
        raise ValueError(
            f"relative standard deviation must lie in (0, 1/√12 ≈ 0.2887], got {std!r}"
        )
    out = np.empty(s.shape, dtype=np.float64)
    for idx, si in np.ndenumerate(s):
        k = si**-2.0
        coeffs = [1.0, 7.0, 16.0 - k, 12.0 - k]
        g = max(r.real for r in np.roots(coeffs) if abs(r.imag) <= 1e-9 * max(1.0, abs(r)))
        g = max(g, 0.0)
        for _ in range(4):  # Newton on the cubic; converges quadratically from np.roots' root
            f = ((g + 7.0) * g + 16.0 - k) * g + 12.0 - k
            df = (3.0 * g + 14.0) * g + 16.0 - k
            if df == 0.0:
                break
            g -= f / df
        out[idx] = max(g, 0.0)
    return out


def power_function_beta(std: ArrayLike, t_next: ArrayLike, t_delta: ArrayLike) -> NDArray:
    """β of the step that ends at ``t_next`` and spans ``t_delta`` images (EDM2 eq. 127):

    β = (1 − t_delta / t_next)^(γ + 1),  γ = std_to_exp(std).

    With θ̂ ← β θ̂ + (1 − β) θ, the EMA at t equals ∫ p_t(τ) θ(τ) dτ (eq. 121) for a trajectory
    that is constant over each step: t^(γ+1) θ̂_t = (t − Δ)^(γ+1) θ̂_(t−Δ) + (t^(γ+1) −
    (t − Δ)^(γ+1)) θ_t. The first step (t_next = t_delta) has β = 0.
    """
    t_next = np.asarray(t_next, dtype=np.float64)
    t_delta = np.asarray(t_delta, dtype=np.float64)
    if not (np.all(t_delta > 0) and np.all(t_next >= t_delta)):
        raise ValueError(f"need 0 < t_delta <= t_next, got t_next={t_next}, t_delta={t_delta}")
    return (1.0 - t_delta / t_next) ** (std_to_exp(std) + 1.0)


def power_function_correlation(
    a_ofs: ArrayLike, a_std: ArrayLike, b_ofs: ArrayLike, b_std: ArrayLike
) -> NDArray[np.float64]:
    """L² inner product ⟨p_a, p_b⟩ = ∫₀^∞ p_a(τ) p_b(τ) dτ of two profiles ending at a_ofs and
    b_ofs (EDM2 eq. 151, used by Alg. 3). For t_a ≤ t_b,

    ⟨p_a, p_b⟩ = (γ_a + 1)(γ_b + 1) / ((γ_a + γ_b + 1) t_b) · (t_a / t_b)^γ_b,

    symmetric in (a, b). Broadcasts its arguments.
    """
    ta = np.asarray(a_ofs, dtype=np.float64)
    tb = np.asarray(b_ofs, dtype=np.float64)
    ga, gb = std_to_exp(a_std), std_to_exp(b_std)
    lo, hi = np.minimum(ta, tb), np.maximum(ta, tb)
    g_hi = np.where(ta <= tb, gb, ga)  # exponent of the profile that ends later
    return (ga + 1.0) * (gb + 1.0) / ((ga + gb + 1.0) * hi) * (lo / hi) ** g_hi


def solve_posthoc_coefficients(
    in_ofs: ArrayLike, in_std: ArrayLike, out_ofs: ArrayLike, out_std: ArrayLike
) -> NDArray[np.float64]:
    """Coefficients X [in, out] of the post-hoc reconstruction (EDM2 App. C.3, Alg. 3).

    Column j minimizes ‖Σ_i X_ij p_i − p_j^out‖²_L2 over the input profiles p_i (snapshots
    ending at ``in_ofs`` with σ_rel ``in_std``): the normal equations A X = B with
    A_ik = ⟨p_i, p_k⟩ and B_ij = ⟨p_i, p_j^out⟩ (eq. 151). As in EDM2, each column is then
    rescaled to sum to 1, so a constant trajectory is reproduced exactly.
    """
    in_ofs, in_std = np.broadcast_arrays(np.asarray(in_ofs, np.float64), np.asarray(in_std))
    out_ofs, out_std = np.broadcast_arrays(np.asarray(out_ofs, np.float64), np.asarray(out_std))
    col = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 1)
    row = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1)
    a = power_function_correlation(col(in_ofs), col(in_std), row(in_ofs), row(in_std))
    b = power_function_correlation(col(in_ofs), col(in_std), row(out_ofs), row(out_std))
    try:
        x = np.linalg.solve(a, b)
    except np.linalg.LinAlgError as e:
        raise PhemaError(
            f"post-hoc EMA: the snapshot profiles are linearly dependent ({e}); "
            "are two snapshots of the same σ_rel at the same image count?"
        ) from None
    return x / np.sum(x, axis=0, keepdims=True)


# --------------------------------------------------------------------------------------------
# Tracking during training.


def _check_std(std: Sequence[float]) -> tuple[float, ...]:
    s = tuple(float(v) for v in std)
    if not s:
        raise ValueError("std must list at least one σ_rel")
    if len(set(s)) != len(s):
        raise ValueError(f"std must not repeat a σ_rel, got {list(s)}")
    std_to_exp(np.asarray(s))  # validates the range
    return s


@dataclass
class Snapshot:
    """One snapshot: every tracked profile's EMA at image count ``nimg``.

    ``emas[i]`` is the state dict of the EMA of σ_rel ``std[i]``; ``param_keys`` names the
    entries that are averaged (the model's parameters); the others (buffers) are copies of the
    model's at ``nimg``. ``path`` is the file it was read from, if any.
    """

    nimg: int
    std: tuple[float, ...]
    batch_size: int
    emas: list[dict[str, Tensor]]
    param_keys: tuple[str, ...]
    path: Path | None = field(default=None, compare=False)


class PowerFunctionEMA:
    """One power-function EMA per σ_rel in ``std`` (EDM2 §3.1, eq. 127; default σ_rel of EDM2).

    ``emas[i]`` is a frozen copy of ``net`` holding the EMA of σ_rel ``std[i]``; call
    :meth:`update` after every optimizer step with the image count at the end of the step.
    Parameters are averaged in their own dtype; buffers are copied from ``net``.
    """

    def __init__(self, net: nn.Module, std: Sequence[float] = (0.050, 0.100)) -> None:
        self.std = _check_std(std)
        self.exp = tuple(float(g) for g in std_to_exp(np.asarray(self.std)))
        self.emas: list[nn.Module] = []
        for _ in self.std:
            ema = copy.deepcopy(net).eval().requires_grad_(False)
            for p in ema.parameters():
                p.grad = None
            self.emas.append(ema)
        self.param_keys = tuple(name for name, _ in net.named_parameters())
        self.cur_nimg = 0
        self.batch_size = 0

    @torch.no_grad()
    def update(self, net: nn.Module, cur_nimg: int, batch_size: int) -> None:
        """Fold in ``net`` after the step ending at ``cur_nimg`` of ``batch_size`` images."""
        cur_nimg, batch_size = int(cur_nimg), int(batch_size)
        if batch_size <= 0 or cur_nimg < batch_size or cur_nimg <= self.cur_nimg:
            raise ValueError(
                f"need 0 < batch_size <= cur_nimg and cur_nimg increasing; got cur_nimg="
                f"{cur_nimg}, batch_size={batch_size} after {self.cur_nimg}"
            )
        src = [p.detach() for p in net.parameters()]
        for std, ema in zip(self.std, self.emas):
            beta = float(power_function_beta(std, cur_nimg, batch_size))
            dst = list(ema.parameters())
            if len(dst) != len(src):
                raise ValueError("net does not have the parameters the EMA was built for")
            torch._foreach_lerp_(dst, src, 1.0 - beta)
            for b_ema, b in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b)
        self.cur_nimg, self.batch_size = cur_nimg, batch_size

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, ints and floats (``torch.load(weights_only=True)`` reads it)."""
        return {
            "std": list(self.std),
            "cur_nimg": self.cur_nimg,
            "batch_size": self.batch_size,
            "emas": [ema.state_dict() for ema in self.emas],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (same σ_rel list and model)."""
        std = tuple(float(v) for v in state["std"])
        if std != self.std:
            raise ValueError(f"EMA state tracks σ_rel {list(std)}, this EMA {list(self.std)}")
        emas = state["emas"]
        if len(emas) != len(self.emas):
            raise ValueError(f"EMA state has {len(emas)} profiles, expected {len(self.emas)}")
        for ema, sd in zip(self.emas, emas):
            ema.load_state_dict(sd)
        self.cur_nimg, self.batch_size = int(state["cur_nimg"]), int(state["batch_size"])

    def snapshot(self) -> Snapshot:
        """What a snapshot file needs: CPU copies of every profile at ``cur_nimg``."""
        if self.cur_nimg <= 0:
            raise ValueError("no update yet: a snapshot at 0 images has no profile")
        emas = [
            {k: v.detach().to("cpu", copy=True) for k, v in ema.state_dict().items()}
            for ema in self.emas
        ]
        return Snapshot(self.cur_nimg, self.std, self.batch_size, emas, self.param_keys)


# --------------------------------------------------------------------------------------------
# Snapshot files.


def snapshot_path(directory: str | os.PathLike[str], nimg: int) -> Path:
    """``DIR/phema-<nimg, 12 digits>.pt``."""
    return Path(directory) / f"phema-{int(nimg):012d}.pt"


def _digest(meta: Mapping[str, Any], emas: Sequence[Mapping[str, Tensor]]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for sd in emas:
        for k in sorted(sd):
            t = sd[k].detach().cpu().contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _meta(snap: Snapshot) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "nimg": int(snap.nimg),
        "std": [float(s) for s in snap.std],
        "batch_size": int(snap.batch_size),
        "param_keys": list(snap.param_keys),
    }


def save_snapshot(directory: str | os.PathLike[str], snapshot: Snapshot) -> Path:
    """Write ``snapshot`` to :func:`snapshot_path` atomically and return the path.

    The file (a ``torch.save`` dict of plain tensors, ints, floats and strings: the metadata
    nimg, std, batch_size, param_keys, the profiles' state dicts and a sha256 of all of it) is
    written to ``.<name>.<pid>.tmp``, flushed and fsynced, renamed over the final name with
    ``os.replace`` and the directory fsynced: a reader sees no file or the whole file. On an
    error the temp file is removed and nothing appears.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = _meta(snapshot)
    _validate(snapshot, "snapshot to save")
    payload = {**meta, "emas": snapshot.emas, "sha256": _digest(meta, snapshot.emas)}
    return torch_save_atomic(payload, snapshot_path(directory, snapshot.nimg))


def _validate(snap: Snapshot, where: str) -> None:
    if snap.nimg <= 0 or snap.batch_size <= 0 or snap.batch_size > snap.nimg:
        raise PhemaError(f"{where}: invalid image count {snap.nimg} / batch size {snap.batch_size}")
    try:
        _check_std(snap.std)
    except ValueError as e:
        raise PhemaError(f"{where}: {e}") from None
    if len(snap.emas) != len(snap.std) or not snap.emas:
        raise PhemaError(f"{where}: {len(snap.emas)} profiles for σ_rel {list(snap.std)}")
    ref = snap.emas[0]
    for sd in snap.emas:
        if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise PhemaError(f"{where}: a profile is not a state dict of tensors")
        if set(sd) != set(ref) or any(
            sd[k].shape != ref[k].shape or sd[k].dtype != ref[k].dtype for k in ref
        ):
            raise PhemaError(f"{where}: the profiles hold different tensors")
    missing = set(snap.param_keys) - set(ref)
    if missing:
        raise PhemaError(f"{where}: parameters {sorted(missing)[:3]} missing from the profiles")
    for k in snap.param_keys:
        if not ref[k].is_floating_point():
            raise PhemaError(f"{where}: parameter {k!r} is not floating point")


def _read(path: Path) -> Snapshot:
    try:
        with warnings.catch_warnings():  # a damaged pickle stream warns before it fails
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bit rot, not a torch file, unreadable, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PhemaError(
            f"{path}: unreadable post-hoc EMA snapshot ({type(e).__name__}: {msg[:200]})"
        ) from None
    keys = ("format", "version", "nimg", "std", "batch_size", "param_keys", "emas", "sha256")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PhemaError(f"{path}: not a vdmpp post-hoc EMA snapshot")
    if obj.get("version") != VERSION or any(k not in obj for k in keys):
        raise PhemaError(f"{path}: unsupported snapshot version or missing fields")
    try:
        snap = Snapshot(
            nimg=int(obj["nimg"]),
            std=tuple(float(s) for s in obj["std"]),
            batch_size=int(obj["batch_size"]),
            emas=[dict(sd) for sd in obj["emas"]],
            param_keys=tuple(str(k) for k in obj["param_keys"]),
            path=path,
        )
    except (TypeError, ValueError) as e:
        raise PhemaError(f"{path}: malformed snapshot metadata ({e})") from None
    _validate(snap, str(path))
    if obj["sha256"] != _digest(_meta(snap), snap.emas):
        raise PhemaError(f"{path}: checksum mismatch (the file is corrupt)")
    m = _NAME.fullmatch(path.name)
    if m is not None and int(m.group(1)) != snap.nimg:
        raise PhemaError(f"{path}: holds image count {snap.nimg}, its name says {m.group(1)}")
    return snap


def _check_consistent(snaps: Sequence[Snapshot]) -> None:
    first = snaps[0]
    ref = first.emas[0]
    seen: set[int] = set()
    for s in snaps:
        name = s.path if s.path is not None else f"snapshot at {s.nimg} images"
        if s.nimg in seen:
            raise PhemaError(f"{name}: a second snapshot at {s.nimg} images")
        seen.add(s.nimg)
        if s.std != first.std or s.param_keys != first.param_keys:
            raise PhemaError(
                f"{name}: tracks σ_rel {list(s.std)} of {len(s.param_keys)} parameters, but "
                f"{first.path or 'the first snapshot'} tracks {list(first.std)} of "
                f"{len(first.param_keys)}: snapshots of different runs or configurations"
            )
        sd = s.emas[0]
        if set(sd) != set(ref) or any(
            sd[k].shape != ref[k].shape or sd[k].dtype != ref[k].dtype for k in ref
        ):
            raise PhemaError(
                f"{name}: its tensors differ from {first.path or 'the first snapshot'}'s "
                "(a different model)"
            )


def load_snapshots(directory: str | os.PathLike[str]) -> list[Snapshot]:
    """Read and validate every ``phema-*.pt`` in ``directory``, sorted by image count.

    Each file must load with ``weights_only=True``, carry the metadata, match its checksum and
    its name, and agree with the others (same σ_rel list, same tensors). Anything else, or no
    snapshot at all, raises one :class:`PhemaError` naming the file. Temp files of an
    interrupted write (``.phema-*.tmp``) are not snapshots and are ignored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PhemaError(f"{directory}: no post-hoc EMA snapshot directory")
    paths = sorted(p for p in directory.iterdir() if _NAME.fullmatch(p.name))
    if not paths:
        raise PhemaError(f"{directory}: no post-hoc EMA snapshots (phema-*.pt)")
    snaps = [_read(p) for p in paths]
    snaps.sort(key=lambda s: s.nimg)
    _check_consistent(snaps)
    return snaps


# --------------------------------------------------------------------------------------------
# Reconstruction.


@overload
def reconstruct(
    snapshots: Sequence[Snapshot], out_std: float, at_nimg: int | None = None
) -> dict[str, Tensor]: ...
@overload
def reconstruct(
    snapshots: Sequence[Snapshot], out_std: Sequence[float], at_nimg: int | None = None
) -> list[dict[str, Tensor]]: ...


def reconstruct(
    snapshots: Sequence[Snapshot],
    out_std: float | Sequence[float],
    at_nimg: int | None = None,
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """The EMA of σ_rel ``out_std`` at ``at_nimg`` (default: the last snapshot) as a state dict
    (a list of them when ``out_std`` is a sequence) — EDM2's ``reconstruct_phema``.

    Every profile of every snapshot with 0 < nimg ≤ at_nimg is an input; the coefficients come
    from :func:`solve_posthoc_coefficients` (Alg. 3) and the parameters are summed with them in
    float64, then cast to the snapshot's dtype. Buffers are copied from the snapshot at
    ``at_nimg``. ``at_nimg`` must be the image count of one of the snapshots.
    """
    if not snapshots:
        raise PhemaError("post-hoc EMA: no snapshots to reconstruct from")
    snaps = sorted(snapshots, key=lambda s: s.nimg)
    for s in snaps:
        _validate(s, str(s.path or f"snapshot at {s.nimg} images"))
    _check_consistent(snaps)
    last = snaps[-1].nimg if at_nimg is None else int(at_nimg)
    at = [s for s in snaps if s.nimg == last]
    if not at:
        have = ", ".join(str(s.nimg) for s in snaps)
        raise PhemaError(f"post-hoc EMA: no snapshot at {last} images (snapshots at: {have})")
    single = isinstance(out_std, (int, float, np.floating))
    stds = [float(out_std)] if single else [float(s) for s in out_std]  # type: ignore[union-attr]
    try:
        std_to_exp(np.asarray(stds))
    except ValueError as e:
        raise PhemaError(f"post-hoc EMA: {e}") from None
    inputs = [(s, i) for s in snaps if 0 < s.nimg <= last for i in range(len(s.std))]
    coefs = solve_posthoc_coefficients(
        [s.nimg for s, _ in inputs], [s.std[i] for s, i in inputs], last, stds
    )
    ref = at[0].emas[0]
    params = set(at[0].param_keys)
    outs: list[dict[str, Tensor]] = [{} for _ in stds]
    for k, v in ref.items():
        if k not in params:
            for out in outs:
                out[k] = v.clone()
            continue
        acc = torch.zeros((len(stds), *v.shape), dtype=torch.float64)
        for n, (s, i) in enumerate(inputs):
            x = s.emas[i][k].to(torch.float64)
            acc += torch.from_numpy(coefs[n]).reshape(-1, *([1] * v.dim())) * x
        for j, out in enumerate(outs):
            out[k] = acc[j].to(v.dtype)
    return outs[0] if single else outs
