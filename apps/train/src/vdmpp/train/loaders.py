"""The data side of a run: one stream per slot of this rank, and where each stream stands.

A slot's stream (``vdmpp.train.data``) is seeded by (seed, slot, segment); its position (samples
read per DataLoader worker) and its count of corrupt samples are saved in each checkpoint, so a
resumed run replays the exact stream (``data.resume = "replay"``) or reseeds it (``"reseed"``).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import Config
from .data import StreamSpec, expand_source, make_loader, probe, shutdown_loader, write_shards
from .distributed import Dist
from .errors import ConfigError
from .preemption import Preemption, stop_signals_ignored

__all__ = ["DataFeed", "prepare_urls"]


def prepare_urls(cfg: Config, out: Path, d: Dist) -> list[str]:
    """The shard URLs of ``cfg.data.source``; the built-in digits are written once (rank 0)."""
    if cfg.data.source != "digits":
        return expand_source(cfg.data.source, cfg.data.resolution)
    root = out / "data" / f"digits-{cfg.data.resolution}"
    if d.main and not (root / "dataset.json").is_file():
        write_shards("digits", root, maxcount=256, resolution=cfg.data.resolution, seed=cfg.seed)
    d.barrier()
    if cfg.data.channels != 1 or cfg.data.num_classes not in (10, None):
        raise ConfigError(
            "config: data.source = 'digits' has 1 channel and 10 classes; set "
            "data.channels = 1 and data.num_classes = 10 (or none: unconditional)"
        )
    return expand_source(str(root))


class DataFeed:
    """This rank's slots' streams, their positions and corrupt counts (checkpointed)."""

    def __init__(
        self, cfg: Config, out: Path, d: Dist, slots: list[int], num_slots: int, per_device: int
    ) -> None:
        self.cfg, self.d = cfg, d
        self.slots, self.num_slots, self.per_device = slots, num_slots, per_device
        self.urls = prepare_urls(cfg, out, d)
        probe(self.urls, cfg.data.resolution, cfg.data.channels, cfg.data.num_classes)
        self.positions: dict[int, dict[int, int]] = {}
        self.corrupt: dict[int, int] = {}
        self.corrupt_base = 0
        self.error: str | None = None
        self.loaders: list[Any] = []

    # --- checkpoint state -----------------------------------------------------------------------
    def restore(self, data: dict[str, Any], log: Any) -> None:
        """From a checkpoint's ``data`` entry; a changed layout (slots/workers) reseeds."""
        self.corrupt_base = int(data.get("corrupt", 0))
        if data.get("num_slots") == self.num_slots and data.get("workers") == self.cfg.data.workers:
            self.positions = {
                int(k): {int(w): int(p) for w, p in v.items()}
                for k, v in data.get("positions", {}).items()
            }
        elif self.cfg.deterministic:
            log("resume: data layout changed (slots/workers); streams are reseeded")

    def gather(self) -> dict[str, Any]:
        """Every rank's positions and corrupt counts (a collective: every rank calls it)."""
        mine = ({s: self.positions.get(s, {}) for s in self.slots}, sum(self.corrupt.values()))
        parts = self.d.all_gather_object(mine)
        pos: dict[int, dict[int, int]] = {}
        for p, _ in parts:
            pos.update(p)
        return {
            "num_slots": self.num_slots,
            "workers": self.cfg.data.workers,
            "positions": pos,
            "corrupt": self.corrupt_base + sum(c for _, c in parts),
        }

    def corrupt_total(self) -> int:
        """Corrupt samples skipped so far, all ranks (a collective; one host read)."""
        c = torch.tensor(float(sum(self.corrupt.values())), device=self.d.device)
        return self.corrupt_base + int(self.d.all_reduce(c).item())

    def boundary(self) -> tuple[dict, dict]:
        """Where the streams stand at a step boundary (to rewind a step that was cut off)."""
        return copy.deepcopy(self.positions), dict(self.corrupt)

    def rewind(self, at: tuple[dict, dict]) -> None:
        self.positions, self.corrupt = at

    # --- streams --------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        """One DataLoader per slot, replaying to the saved positions or reseeded at ``step``."""
        cfg = self.cfg
        mode = cfg.data.resume
        if mode == "auto":
            mode = "replay" if cfg.deterministic else "reseed"
        nw = max(cfg.data.workers, 1)
        loaders = []
        with stop_signals_ignored():  # forked DataLoader workers inherit SIG_IGN
            for slot in self.slots:
                replay = mode == "replay" and step > 0 and slot in self.positions
                spec = StreamSpec(
                    urls=self.urls,
                    slot=slot,
                    num_slots=self.num_slots,
                    batch_size=self.per_device,
                    resolution=cfg.data.resolution,
                    channels=cfg.data.channels,
                    num_classes=cfg.data.num_classes,
                    seed=cfg.seed,
                    segment=0 if (replay or step == 0) else step,
                    flip=cfg.data.augment_flip,
                    shuffle_buffer=cfg.data.shuffle_buffer,
                    skip=dict(self.positions.get(slot, {})) if replay else {},
                    role_offset=step % nw if replay else 0,
                )
                if not replay:
                    self.positions.pop(slot, None)
                loaders.append(make_loader(spec, cfg.data.workers))
        self.loaders = loaders

    def batch(self, i: int, pre: Preemption | None) -> tuple[Tensor, Tensor | None]:
        """Micro-batch ``i`` of this rank as ([-1, 1] images, labels or None) on the device.

        A stream that can never fill a batch sets :attr:`error` and yields zeros, which keep
        the step's collectives in step; the step then stops every rank with that error.
        """
        cfg, dev = self.cfg, self.d.device
        with pre.data_wait() if pre is not None else contextlib.nullcontext():
            b = next(self.loaders[i])
        if "error" in b:
            self.error = b["error"]
            shape = (self.per_device, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
            labels = torch.zeros(self.per_device, dtype=torch.long, device=dev)
            return torch.zeros(
                shape, device=dev
            ), labels if cfg.data.num_classes is not None else None
        self.positions.setdefault(self.slots[i], {})[b["worker"]] = b["pos"]
        self.corrupt[self.slots[i]] = b["corrupt"]
        x = b["image"].to(dev, non_blocking=True).float() / 127.5 - 1.0
        labels = b["label"].to(dev) if cfg.data.num_classes is not None else None
        return x, labels

    def close(self) -> None:
        """Stop the DataLoader workers now (they ignore SIGTERM)."""
        loaders, self.loaders = self.loaders, []
        for it in loaders:
            shutdown_loader(it)
