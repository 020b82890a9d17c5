"""``vdmpp-eval phema``: exports of a run's post-hoc EMA at chosen σ_rel (EDM2 §3, App. C.3).

The math is ``vdmpp.train.phema`` (EDM2's names and equation numbers): this module reads the
snapshots ``RUN/phema/phema-*.pt`` with ``load_snapshots``, solves for each wanted σ_rel with
``reconstruct`` (EDM2 Alg. 3) and writes each result as an ordinary export
(``vdmpp.train.export.write_export``) whose ``model.json`` is the run's own plus::

    "ema": {"kind": "power", "std": σ_rel, "at_images": N, "snapshots": k, "tracked_std": [...]}

and ``"step"`` = N / batch size (the step the snapshot at N images was taken after). ``sample``,
``metrics`` and ``bpd`` read it like any export.

Everything is read, checked and reconstructed before the first export is written: a corrupt or
missing snapshot is one :class:`~vdmpp.eval.model.EvalError` line and nothing is written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .model import EvalError

__all__ = ["SWEEP", "export_dirs", "reconstruct_exports", "sweep_stds"]

_log = logging.getLogger("vdmpp.eval")

SWEEP = (0.02, 0.2)
"""``--sweep N``: N σ_rel spaced evenly in log between these (rounded to 3 decimals)."""
_DROP = ("format", "version", "weights_sha256")  # write_export adds them anew
_WRAPPERS = ("module.", "_orig_mod.")  # DDP / torch.compile prefixes of a state dict's keys


def sweep_stds(n: int) -> list[float]:
    """``n`` σ_rel from 0.02 to 0.2, log-spaced, 3 decimals (6: 0.020 0.032 0.050 0.080 0.126
    0.200)."""
    if n < 2:
        raise EvalError(f"--sweep takes at least 2 values, got {n}")
    vals = sorted({round(float(v), 3) for v in np.geomspace(SWEEP[0], SWEEP[1], n)})
    if len(vals) != n:
        raise EvalError(f"--sweep {n}: too many values for 3 decimals between 0.02 and 0.2")
    return vals


def _name(std: float) -> str:
    return f"std-{std:.3f}"


def export_dirs(out: Path, stds: Sequence[float]) -> list[Path]:
    """One σ_rel: ``out`` is the export. Several: ``out/std-0.050`` etc."""
    if len(stds) == 1:
        return [out]
    names = [_name(s) for s in stds]
    if len(set(names)) != len(names):
        raise EvalError(f"--std {' '.join(map(str, stds))}: two values share the name std-x.xxx")
    return [out / n for n in names]


def _writable(target: Path, run_export: Path) -> None:
    """An export may replace only an export (never the run's own, never another folder)."""
    from vdmpp.train.export import ExportError, read_meta

    if target.resolve() == run_export.resolve():
        raise EvalError(f"--out {target}: that is the run's own export; choose another folder")
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_dir():
        names = {p.name for p in target.iterdir()}
        if names <= {"ema.safetensors", "model.json"}:
            if not names:
                return
            try:
                read_meta(target)
                return
            except ExportError:
                pass
    raise EvalError(
        f"--out {target}: exists and is not an export (an export holds only ema.safetensors "
        "and model.json); choose another folder"
    )


def _matching(state: dict[str, Any], want: dict[str, tuple[int, ...]], where: str) -> dict:
    """``state`` with its keys as the export's model has them (DDP/compile prefixes dropped)."""
    for prefix in ("", *_WRAPPERS):
        if all(k.startswith(prefix) for k in state):
            s = {k[len(prefix) :]: v for k, v in state.items()}
            if set(s) == set(want):
                break
    else:
        s = state
    if set(s) != set(want) or any(tuple(s[k].shape) != want[k] for k in want):
        diff = sorted(set(want) ^ set(s)) or [k for k in want if tuple(s[k].shape) != want[k]]
        raise EvalError(
            f"{where}: the snapshots' tensors do not match the run's export model "
            f"({len(s)} vs {len(want)} tensors; first difference {diff[0]!r})"
        )
    return s


def reconstruct_exports(
    run: str | Path,
    stds: Sequence[float],
    out: str | Path,
    *,
    at_images: int | None = None,
) -> dict[str, Any]:
    """Reconstruct ``stds`` at ``at_images`` (default: the last snapshot) from ``RUN/phema``
    and write the exports; returns what the CLI prints."""
    import torch

    from vdmpp.train.export import ExportError, build_model, read_meta, write_export
    from vdmpp.train.phema import MAX_STD, PhemaError, load_snapshots, reconstruct

    run, out = Path(run), Path(out)
    stds = [float(s) for s in stds]
    if not stds:
        raise EvalError("give --std S [S ...] or --sweep")
    for s in stds:
        if not (math.isfinite(s) and 0 < s <= MAX_STD):
            raise EvalError(f"--std {s:g}: σ_rel must lie in (0, 1/√12 ≈ 0.2887]")
    if len(set(stds)) != len(stds):
        raise EvalError(f"--std repeats a value: {' '.join(f'{s:g}' for s in stds)}")
    if at_images is not None and at_images < 1:
        raise EvalError(f"--at-images must be >= 1, got {at_images}")
    if not run.is_dir():
        raise EvalError(f"{run}: no such run directory")
    targets = export_dirs(out, stds)
    run_export = run / "export"
    for t in targets:
        _writable(t, run_export)
    try:
        meta = read_meta(run)
    except ExportError as e:
        raise EvalError(f"{run}: the run's export (model.json) is needed: {e}") from None
    try:
        snaps = load_snapshots(run / "phema")
        if at_images is not None and all(s.nimg != at_images for s in snaps):
            have = ", ".join(str(s.nimg) for s in snaps)
            raise EvalError(f"--at-images {at_images}: no snapshot there (snapshots at: {have})")
        states = reconstruct(snaps, stds, at_images)
    except PhemaError as e:
        raise EvalError(str(e)) from None
    at = snaps[-1] if at_images is None else next(s for s in snaps if s.nimg == at_images)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_model(meta).state_dict().items()}
    states = [_matching(s, want, str(run / "phema")) for s in states]
    base = {k: v for k, v in meta.items() if k not in _DROP}
    base["step"] = at.nimg // at.batch_size if at.nimg % at.batch_size == 0 else meta.get("step")
    exports = []
    for std, state, target in zip(stds, states, targets):
        m = {
            **base,
            "ema": {
                "kind": "power",
                "std": std,
                "at_images": at.nimg,
                "snapshots": sum(1 for s in snaps if s.nimg <= at.nimg),
                "tracked_std": list(at.std),
            },
        }
        write_export(target, state, m)
        _log.info("phema: σ_rel %.3f at %d images -> %s", std, at.nimg, target)
        exports.append({"std": std, "out": str(target)})
    return {
        "run": str(run),
        "at_images": at.nimg,
        "step": base["step"],
        "snapshots": sum(1 for s in snaps if s.nimg <= at.nimg),
        "tracked_std": list(at.std),
        "exports": exports,
    }
