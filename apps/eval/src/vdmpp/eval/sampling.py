"""``vdmpp-eval sample``: seeds → images, sharded across ranks, resumable.

Reproducibility. Image k is drawn from seed k alone: its initial noise and every noise a
stochastic sampler adds come from its own generator (``vdmpp.samplers.PerSampleGenerator``) and
its class label is ``seed % num_classes`` (or ``--class``). So the image does not depend on the
batch size, the chunking, the number of ranks or which rank drew it (on one device type).

Layout of ``OUT``::

    sample.json                          the settings (a rerun must match them)
    chunks/seeds-<first>-<last>.npz      images uint8 [n, H, W, C], seeds, labels; atomic
    samples.npz                          all requested seeds, in order (written by rank 0)
    grid.png                             the first ``grid`` images

The seed list is cut into chunks of ``chunk`` consecutive entries; chunk j belongs to rank
j % world. A chunk whose file exists with the right seeds is skipped, so an interrupted run
resumes where it stopped (losing at most one chunk per rank).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdmpp.train.fileio import write_atomic, write_json_atomic

from .model import EvalError, denoiser_for, to_uint8
from .spec import SAMPLERS, SampleSpec, run_sampler

__all__ = [
    "SAMPLERS",
    "SampleSpec",
    "assemble",
    "generate",
    "labels_for",
    "parse_seeds",
    "run_shard",
    "save_grid",
]

MAX_SEED = 2**32 - 1
_log = logging.getLogger("vdmpp.eval")


def parse_seeds(text: str) -> list[int]:
    """``"0-49999"``, ``"3"``, ``"0,5,10-19"`` → sorted unique seeds in [0, 2³²−1]."""
    seeds: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+))?", part)
        if not m:
            raise EvalError(f"--seeds: cannot parse {part!r} (use e.g. 0-49999 or 0,5,10-19)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo < 0 or hi > MAX_SEED:
            raise EvalError(f"--seeds: {part!r} is out of range; seeds lie in [0, {MAX_SEED}]")
        if hi < lo:
            raise EvalError(f"--seeds: empty range {part!r} (the end is below the start)")
        if hi - lo >= 10_000_000:
            raise EvalError(f"--seeds: {part!r} asks for more than 10 million images")
        seeds.update(range(lo, hi + 1))
    return sorted(seeds)


def labels_for(seeds: Sequence[int], meta: dict, spec: SampleSpec) -> np.ndarray | None:
    """Class label of each seed: ``spec.class_label``, else ``seed % num_classes``."""
    n = meta.get("num_classes")
    if not n:
        return None
    if spec.class_label is not None:
        return np.full(len(seeds), spec.class_label, np.int64)
    return np.asarray(seeds, np.int64) % int(n)


def generate(
    model: Any,
    meta: dict,
    seeds: Sequence[int],
    spec: SampleSpec,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    guide: tuple[Any, dict] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(uint8 images [n, H, W, C], labels or None, NFE per image) for ``seeds``.

    ``guide``: (model, model.json) of the autoguidance guide that ``spec.guide`` names."""
    from vdmpp.samplers import PerSampleGenerator

    if spec.guide is not None and guide is None:
        raise EvalError(f"the spec names a guide ({spec.guide}): pass guide=(model, meta)")
    spec.validate(meta, guide[1] if guide is not None else None)
    if batch_size < 1:
        raise EvalError(f"--batch must be >= 1, got {batch_size}")
    device = torch.device(device)
    shape = (int(meta["channels"]), int(meta["resolution"]), int(meta["resolution"]))
    labels = labels_for(seeds, meta, spec)
    denoiser = spec.denoiser(
        denoiser_for(model, meta), denoiser_for(*guide) if guide is not None else None
    )
    data_range = tuple(meta.get("data_range", (-1.0, 1.0)))
    out, nfe = [], 0
    for i in range(0, len(seeds), batch_size):
        batch = list(seeds[i : i + batch_size])
        gen = PerSampleGenerator(batch, device)
        noise = gen.randn(shape)
        extra = {}
        if labels is not None:
            extra["class_labels"] = torch.as_tensor(labels[i : i + batch_size], device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=spec.precision == "bf16"):
            x, nfe = run_sampler(denoiser, noise, spec, gen, extra)
        out.append(to_uint8(x, data_range))  # type: ignore[arg-type]
        if progress is not None:
            progress(len(batch))
    images = np.concatenate(out) if out else np.zeros((0, *shape[1:], shape[0]), np.uint8)
    return images, labels, nfe


# --- files ---------------------------------------------------------------------------------
def _chunk_path(out: Path, seeds: Sequence[int]) -> Path:
    return out / "chunks" / f"seeds-{seeds[0]:010d}-{seeds[-1]:010d}.npz"


def _chunk_done(path: Path, seeds: Sequence[int]) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return (
                np.array_equal(z["seeds"], np.asarray(seeds, np.int64))
                and "images" in z.files
                and len(z["images"]) == len(seeds)
            )
    except Exception:  # a torn or foreign file: redo the chunk
        return False


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` streamed into :func:`vdmpp.train.fileio.write_atomic` (fsynced file and
    directory; ``samples.npz`` of 50k images is not copied through memory first)."""
    write_atomic(path, lambda f: np.savez(f, **arrays))


def settings_record(
    spec: SampleSpec, meta: dict, checkpoint: str, guide_meta: dict | None = None
) -> dict[str, Any]:
    """What ``sample.json`` records: the checkpoint, the model's shape and the settings (and
    the autoguidance guide's training step)."""
    record = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": meta.get("step"),
        "resolution": meta["resolution"],
        "channels": meta["channels"],
        "num_classes": meta.get("num_classes"),
        "spec": spec.record(),
    }
    if guide_meta is not None:
        record["guide_step"] = guide_meta.get("step")
    return record


def check_settings(out: Path, record: dict[str, Any]) -> None:
    """Write ``sample.json``, or make sure an existing one describes the same sampling."""
    path = out / "sample.json"
    if path.is_file():
        old = json.loads(path.read_text())
        keys = [k for k in record if k != "nfe" and old.get(k) != record[k]]
        if keys:
            raise EvalError(
                f"{out} holds samples made with other settings ({', '.join(keys)} differ: "
                f"{ {k: old.get(k) for k in keys} } vs { {k: record[k] for k in keys} }); "
                "choose another --out or delete it"
            )
        return
    write_json_atomic(path, record)


def shard_chunks(seeds: Sequence[int], chunk: int, rank: int, world: int) -> list[list[int]]:
    """The chunks of ``seeds`` that ``rank`` of ``world`` draws."""
    if chunk < 1:
        raise EvalError(f"--chunk must be >= 1, got {chunk}")
    if not 0 <= rank < world:
        raise EvalError(f"rank {rank} is outside a world of {world}")
    chunks = [list(seeds[i : i + chunk]) for i in range(0, len(seeds), chunk)]
    return chunks[rank::world]


def run_shard(
    model: Any,
    meta: dict,
    seeds: Sequence[int],
    spec: SampleSpec,
    out: str | Path,
    *,
    rank: int = 0,
    world: int = 1,
    chunk: int = 500,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
    guide: tuple[Any, dict] | None = None,
) -> dict[str, int]:
    """Draw this rank's chunks that are not on disk yet; return {"done", "skipped", "nfe"}.

    ``progress``: rank 0 shows a bar on a terminal, else logs a progress line every 10 s.
    ``guide``: as for :func:`generate`."""
    out = Path(out)
    if batch_size < 1:
        raise EvalError(f"--batch must be >= 1, got {batch_size}")
    mine = shard_chunks(seeds, chunk, rank, world)
    todo = [c for c in mine if not _chunk_done(_chunk_path(out, c), c)]
    skipped = sum(len(c) for c in mine) - sum(len(c) for c in todo)
    bar = None
    if rank == 0:  # a bar on a terminal, else a plain line every 10 s in the log (no \r)
        from vdmpp.train.log import Progress

        total = sum(len(c) for c in todo)
        bar = Progress(total, "img", desc="sample", enabled=progress, emit=_log.info)
    nfe = 0
    try:
        for c in todo:
            images, labels, nfe = generate(
                model,
                meta,
                c,
                spec,
                device=device,
                batch_size=batch_size,
                progress=bar.update if bar else None,
                guide=guide,
            )
            arrays = {"images": images, "seeds": np.asarray(c, np.int64)}
            if labels is not None:
                arrays["labels"] = labels
            _write_npz(_chunk_path(out, c), **arrays)
    finally:
        if bar is not None:
            bar.close()
    return {"done": sum(len(c) for c in todo), "skipped": skipped, "nfe": nfe}


def assemble(
    out: str | Path,
    seeds: Sequence[int],
    chunk: int = 500,
    grid: int = 64,
    *,
    num_classes: int | None = None,
    caption: str | None = None,
) -> Path:
    """Gather every chunk of ``seeds`` into ``samples.npz`` (+ ``grid.png``, columns = classes
    when ``num_classes``; ``caption`` above it); return its path."""
    out = Path(out)
    images, labels, have_labels = [], [], True
    for i in range(0, len(seeds), chunk):
        c = list(seeds[i : i + chunk])
        path = _chunk_path(out, c)
        if not _chunk_done(path, c):
            raise EvalError(f"{path}: chunk missing; rerun `vdmpp-eval sample` to finish")
        with np.load(path, allow_pickle=False) as z:
            images.append(z["images"])
            have_labels = have_labels and "labels" in z.files
            if have_labels:
                labels.append(z["labels"])
    arrays = {"images": np.concatenate(images), "seeds": np.asarray(seeds, np.int64)}
    if have_labels:
        arrays["labels"] = np.concatenate(labels)
    _write_npz(out / "samples.npz", **arrays)
    if grid > 0:
        from vdmpp.train.grid import save_grid as write_grid

        labels_g = arrays["labels"][:grid] if have_labels and num_classes else None
        write_grid(
            arrays["images"][:grid],
            out / "grid.png",
            labels=labels_g,
            num_classes=num_classes if labels_g is not None else None,
            caption=caption,
        )
    return out / "samples.npz"


def save_grid(
    images: np.ndarray, path: str | Path, cols: int | None = None, scale: int = 0
) -> Path:
    """uint8 [N, H, W, C] → one PNG grid, upscaled (``vdmpp.train.grid``: the one writer)."""
    from vdmpp.train.grid import save_grid as write_grid

    return write_grid(images, path, cols=cols, scale=scale)
