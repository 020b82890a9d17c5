"""The training loop: one config → one run directory, single process or torchrun DDP.

Slots. The global batch of a step is ``slots = global_size / per_device`` micro-batches; slot k
lives on rank k mod W as its (k div W)-th accumulation micro-step. Each slot has its own data
stream (``data``) and its noise (t, ε, dropout) is drawn from generators seeded by
(seed, slot, step), so the update of a step depends on the global batch and micro-batch size
only — W = 2 ranks × 1 micro-step computes what W = 1 × 2 micro-steps computes, and a resumed
run continues the exact stream of an uninterrupted one (``data.resume = "replay"``).

VDM++ App. H: Adam, global-norm clip 1, EMA of weights (half-life in images, EDM), linear LR
warm-up (in images), low-discrepancy t, the adaptive schedule's bin statistics (100 bins, decay
0.999) summed over every slot of every rank before the EMA update, so all ranks hold one schedule.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import log as runlog
from . import status as run_status
from .config import Config, ConfigError
from .data import (
    StreamSpec,
    expand_source,
    make_loader,
    probe,
    shutdown_loader,
    stable_seed,
    write_shards,
)
from .export import clean_stale, export_step, write_export
from .objective import Objective, build_net, model_spec, schedule_meta

__all__ = ["NonFiniteError", "PreemptedError", "TrainingError", "dist_env", "train"]


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must look at (e.g. too many non-finite losses).

    ``status`` is the run's final status (:mod:`vdmpp.train.status`); ``result`` is the result
    record (step, out, ...) once :func:`train` has written ``status.json``.
    """

    status = "failed"
    result: dict[str, Any] | None = None


class NonFiniteError(TrainingError):
    """``nan_patience`` non-finite losses/gradients in a row; a checkpoint was written."""

    status = "stopped-nonfinite"


class PreemptedError(TrainingError):
    """A stop signal ended the run where no checkpoint could be written (a rank of several
    waited on its data); ``--resume`` continues from the latest checkpoint."""

    status = "preempted"


# --- distributed ---------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def all_reduce(self, t: Tensor, op: Any = None) -> Tensor:
        if self.on:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process: torchrun's variables, else srun's.

    torchrun (and ``torch.distributed.run``) sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. A
    task of an ``srun`` job step started without torchrun has ``SLURM_PROCID``,
    ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``) and ``SLURM_LOCALID`` instead; they are used
    only inside a job step (``SLURM_STEP_ID`` set: the batch script itself is not a rank) and
    are copied to the torchrun names so that ``init_process_group("env://")`` finds them —
    ``MASTER_ADDR``/``MASTER_PORT`` must then be exported by the job script.
    """
    env = os.environ
    if "WORLD_SIZE" not in env and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        if int(world) > 1:
            env["WORLD_SIZE"], env["RANK"] = world, env["SLURM_PROCID"]
            env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    return (int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")),
            int(env.get("LOCAL_RANK", "0")))


def init_distributed(cfg: Config) -> Dist:
    """Read torchrun's (or srun's, :func:`dist_env`) environment; NCCL on GPUs, gloo on CPUs."""
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"{world} ranks but {' and '.join(missing)} not set: start with "
                              "torchrun, or export MASTER_ADDR (the first node) and MASTER_PORT "
                              "in the job script")  # fmt: skip
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: device = 'cuda' but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=device)


# --- helpers -------------------------------------------------------------------------------------
def _hostname() -> str:
    import socket

    return socket.gethostname()


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py[0], list(py[1]), py[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _save_grid(images: Tensor, path: Path, **kw: Any) -> None:
    """[-1, 1] images [N, C, H, W] → one PNG grid (vdmpp.train.grid, shared with vdmpp-eval)."""
    from .grid import save_grid

    save_grid(images, path, **kw)


class _DataWaitInterrupted(Exception):
    """A stop signal arrived while the step waited on its data for longer than the grace."""


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the next step boundary.

    A step blocked on its data (a stalled filesystem, a stream that cannot fill a batch) would
    never reach that boundary; so when a signal arrives during a data wait, or a wait starts
    after one, an alarm fires after ``grace`` seconds and, if that same wait is still going
    on, breaks out of it (:class:`_DataWaitInterrupted`). The grace lets a normal wait finish
    so that ranks stop together at a step boundary. ``$VDMPP_SIGNAL_GRACE_S`` sets it.
    """

    def __init__(self, grace: float | None = None) -> None:
        self.signal: int | None = None
        self.grace = grace if grace is not None else float(
            os.environ.get("VDMPP_SIGNAL_GRACE_S", "10")
        )
        self._old: dict[int, Any] = {}
        self._wait = 0  # id of the current data wait (0: none)
        self._waits = 0
        self._armed_for = -1

    def __enter__(self) -> _Preemption:
        for s, h in ((signal.SIGTERM, self._handle), (signal.SIGINT, self._handle),
                     (signal.SIGALRM, self._alarm)):  # fmt: skip
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, h)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up immediately
        self.signal = signum
        if self._wait:
            self._arm()

    def _arm(self) -> None:
        if self._armed_for != self._wait and signal.SIGALRM in self._old:
            self._armed_for = self._wait
            signal.setitimer(signal.ITIMER_REAL, max(self.grace, 1e-3))

    def _alarm(self, signum: int, frame: Any) -> None:
        if self._wait and self._armed_for == self._wait:
            raise _DataWaitInterrupted

    @contextlib.contextmanager
    def data_wait(self) -> Any:
        self._waits += 1
        self._wait = self._waits
        if self.signal is not None:
            self._arm()
        try:
            yield
        finally:
            self._wait = 0

    def __exit__(self, *exc: Any) -> None:
        if signal.SIGALRM in self._old:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in self._old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _stop_signals_ignored() -> Any:
    """SIGINT/SIGTERM ignored while DataLoader workers are forked (they inherit it)."""
    old: dict[int, Any] = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread
            old[s] = signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _differs(saved: Any, cfg: Config) -> str:
    """The config tables that differ between a checkpoint's saved config and ``cfg``."""
    if not isinstance(saved, str):
        return "no config saved in the checkpoint"
    try:
        old = config_mod.tomllib.loads(saved)
        new = config_mod.tomllib.loads(config_mod.dumps(cfg))
    except Exception:  # a checkpoint's text is data, never trusted to parse
        return "its saved config does not parse"
    keys = [f"{t}.{k}" for t in ("model", "objective", "optimizer")
            for k in sorted(set(old.get(t, {})) | set(new.get(t, {})))
            if old.get(t, {}).get(k) != new.get(t, {}).get(k)]  # fmt: skip
    return "differs in " + ", ".join(keys[:6]) if keys else "same model keys"


# --- the trainer ---------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False,
                 config_path: str | Path | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.config_path = config_path
        self.d = init_distributed(cfg)
        d = self.d
        self.logger = runlog.configure("train", rank=d.rank)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        bad = next((q for q in (self.out, *self.out.parents) if q.exists() and not q.is_dir()),
                   None)  # fmt: skip
        if bad is not None:
            raise ConfigError(f"config: out = {cfg.out!r}: {bad} is a file, not a directory; "
                              "choose another --set out=...")  # fmt: skip
        self.per_device, self.accum = cfg.micro_batches(d.world)
        self.num_slots = d.world * self.accum
        self.slots = [m * d.world + d.rank for m in range(self.accum)]
        self.global_batch = cfg.batch.global_size

        existing = ckpt.list_checkpoints(self.ckpt_dir)
        if existing and not resume:
            raise ConfigError(
                f"{self.out} already holds checkpoints (latest step {existing[-1][0]}): pass "
                f"--resume to continue, or --set out=... for a new run"
            )

        # Everything that can fail on a bad config happens here, before any step.
        self.urls = self._prepare_data()
        probe(self.urls, cfg.data.resolution, cfg.data.channels, cfg.data.num_classes)
        torch.manual_seed(cfg.seed)
        self.model = build_net(cfg).to(d.device)
        self.objective = Objective(cfg).to(d.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        params = list(self.model.parameters()) + list(self.objective.schedule.parameters())
        opt_cls = torch.optim.AdamW if cfg.optimizer.name == "adamw" else torch.optim.Adam
        o = cfg.optimizer
        self.opt = opt_cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                           weight_decay=o.weight_decay)  # fmt: skip
        self.step = 0
        self.nonfinite_total = 0
        self.corrupt_base = 0
        self.positions: dict[int, dict[int, int]] = {}
        self._corrupt: dict[int, int] = {}
        self.nonfinite_run = 0
        self.resumed_from: Path | None = None
        self._pre: _Preemption | None = None
        self._data_error: str | None = None
        if resume:
            self._load_latest()
        self.start_step = self.step
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            runlog.attach_file(self.logger, self.out / "log.txt", self.summary())
            run_status.write_status(self.out, "running", step=self.step, steps=cfg.steps,
                                    out=str(self.out), pid=os.getpid())  # fmt: skip
            ckpt.write_atomic_bytes(config_mod.dumps(cfg).encode(), self.out / "config.toml")
            clean_stale(self.out / "export")
            for p in self.out.glob(".config.toml.*.tmp"):
                p.unlink(missing_ok=True)  # left by a killed run (rank 0 is the only writer)
            if self.resumed_from is not None and export_step(self.out / "export") != self.step:
                self.export()  # killed after its checkpoint, before (or while) exporting
                self.log(f"export was missing or stale: rewritten for step {self.step}")
        self.train_model: nn.Module = self.model
        if d.on:
            ids = [d.local_rank] if d.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        with _stop_signals_ignored():  # forked DataLoader workers inherit SIG_IGN
            self.loaders = self._make_loaders()

    # --- setup ----------------------------------------------------------------------------------
    def _prepare_data(self) -> list[str]:
        cfg, d = self.cfg, self.d
        if cfg.data.source != "digits":
            return expand_source(cfg.data.source, cfg.data.resolution)
        root = self.out / "data" / f"digits-{cfg.data.resolution}"
        if d.main and not (root / "dataset.json").is_file():
            write_shards("digits", root, maxcount=256, resolution=cfg.data.resolution,
                         seed=cfg.seed)  # fmt: skip
        d.barrier()
        if cfg.data.channels != 1 or cfg.data.num_classes not in (10, None):
            raise ConfigError(
                "config: data.source = 'digits' has 1 channel and 10 classes; set "
                "data.channels = 1 and data.num_classes = 10 (or none: unconditional)"
            )
        return expand_source(str(root))

    def _make_loaders(self) -> list[Any]:
        cfg = self.cfg
        mode = cfg.data.resume
        if mode == "auto":
            mode = "replay" if cfg.deterministic else "reseed"
        loaders = []
        nw = max(cfg.data.workers, 1)
        for slot in self.slots:
            replay = mode == "replay" and self.step > 0 and slot in self.positions
            spec = StreamSpec(
                urls=self.urls,
                slot=slot,
                num_slots=self.num_slots,
                batch_size=self.per_device,
                resolution=cfg.data.resolution,
                channels=cfg.data.channels,
                num_classes=cfg.data.num_classes,
                seed=cfg.seed,
                segment=0 if (replay or self.step == 0) else self.step,
                flip=cfg.data.augment_flip,
                shuffle_buffer=cfg.data.shuffle_buffer,
                skip=dict(self.positions.get(slot, {})) if replay else {},
                role_offset=self.step % nw if replay else 0,
            )
            if not replay:
                self.positions.pop(slot, None)
            loaders.append(make_loader(spec, cfg.data.workers))
        return loaders

    def _load_latest(self) -> None:
        found = ckpt.find_latest(self.ckpt_dir, map_location="cpu", warn=self.log)
        if found is None:
            self.log(f"--resume: no loadable checkpoint in {self.ckpt_dir}; starting from step 0")
            return
        path, state = found
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])
            if state.get("schedule"):
                self.objective.schedule.load_state_dict(state["schedule"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(
                f"--resume: {path} was written for another model/optimizer/schedule config "
                f"({_differs(state.get('config'), self.cfg)}): resume with the run's own "
                f"{self.out / 'config.toml'}, or pass --set out=... for a new run "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        data = state.get("data", {})
        self.corrupt_base = int(data.get("corrupt", 0))
        if data.get("num_slots") == self.num_slots and data.get("workers") == self.cfg.data.workers:
            self.positions = {int(k): {int(w): int(p) for w, p in v.items()}
                              for k, v in data.get("positions", {}).items()}  # fmt: skip
        elif self.cfg.deterministic:
            self.log("resume: data layout changed (slots/workers); streams are reseeded")
        _set_rng_state(state["rng"])
        self.resumed_from = path
        self.log(f"resumed from {path} at step {self.step}")

    # --- logging --------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        """An INFO line of rank 0 (stderr and RUN/log.txt); other ranks log nothing."""
        if self.d.main:
            self.logger.info(msg)

    def warn(self, msg: str) -> None:
        """A warning from any rank (stderr names the rank; rank 0's also go to log.txt)."""
        self.logger.warning(msg)

    def summary(self) -> list[str]:
        """The start-up summary: the first lines of RUN/log.txt (and of a resumed section)."""
        cfg, d = self.cfg, self.d
        text = config_mod.dumps(cfg)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        n_model = sum(p.numel() for p in self.model.parameters())
        n_sched = sum(p.numel() for p in getattr(self.objective.schedule, "parameters",
                                                  lambda: [])())  # fmt: skip
        src = str(Path(self.config_path).resolve()) if self.config_path else "(in memory)"
        versions = ", ".join(f"{k} {v}" for k, v in runlog.vdmpp_versions().items())
        start = (f"resumed from {self.resumed_from.name} at step {self.step}"
                 if self.resumed_from is not None else f"new run from step {self.step}")
        return [
            f"vdmpp-train start-up summary: {cfg.name} -> {self.out}",
            f"  config      {src} (sha256 {digest}); resolved: {self.out / 'config.toml'}",
            f"  run         {start}, to step {cfg.steps}; seed {cfg.seed}",
            f"  model       {cfg.model.name}: {n_model:,} parameters"
            + (f" (+ {n_sched:,} in the learned schedule)" if n_sched else ""),
            f"  objective   {cfg.objective.schedule} schedule"
            + (" (adaptive)" if cfg.objective.adaptive else "")
            + f", {cfg.objective.weighting} weighting, {cfg.objective.parameterization}"
            f"-prediction, {cfg.objective.process}",
            f"  device      {d.device} ({torch.cuda.get_device_name(d.device) if d.device.type == 'cuda' else 'CPU'}), "  # noqa: E501
            f"precision {cfg.precision}, deterministic {str(cfg.deterministic).lower()}, "
            f"compile {str(cfg.compile).lower()}",
            f"  world       {d.world} rank(s) x {self.accum} accumulation step(s) x per-device "
            f"batch {self.per_device} = global batch {self.global_batch}",
            f"  data        {cfg.data.source} ({len(self.urls)} shard(s)), "
            f"{cfg.data.resolution}x{cfg.data.resolution}x{cfg.data.channels}, "
            f"{cfg.data.workers} worker(s) per stream",
            f"  versions    {versions}",
            f"  git         {runlog.git_sha() or 'n/a (not a git checkout)'}",
            f"  host        {_hostname()} pid {os.getpid()}, python {sys.version.split()[0]}",
        ]

    # --- one optimizer step ---------------------------------------------------------------------
    def _batch(self, i: int) -> tuple[Tensor, Tensor | None]:
        with self._pre.data_wait() if self._pre is not None else contextlib.nullcontext():
            b = next(self.loaders[i])
        if "error" in b:  # this slot's stream can never fill a batch: stop every rank
            self._data_error = b["error"]
            cfg = self.cfg
            shape = (self.per_device, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
            x = torch.zeros(shape, device=self.d.device)  # keeps the step's collectives in step
            labels = torch.zeros(self.per_device, dtype=torch.long, device=self.d.device)
            return x, labels if cfg.data.num_classes is not None else None
        self.positions.setdefault(self.slots[i], {})[b["worker"]] = b["pos"]
        self._corrupt[self.slots[i]] = b["corrupt"]
        x = b["image"].to(self.d.device, non_blocking=True).float() / 127.5 - 1.0
        labels = b["label"].to(self.d.device) if self.cfg.data.num_classes is not None else None
        return x, labels

    def _lr(self) -> float:
        o = self.cfg.optimizer
        if o.warmup_images <= 0:
            return o.lr
        return o.lr * min(1.0, (self.step + 1) * self.global_batch / o.warmup_images)

    def _ema_beta(self) -> float:
        e = self.cfg.ema
        if e.halflife_images is not None:
            return 0.5 ** (self.global_batch / e.halflife_images)
        return e.decay

    def train_step(self, stop_requested: bool = False) -> dict[str, Any]:
        """One optimizer step over the global batch.

        Exactly one host sync: the reduced [loss sum, stop flag] and the grad norm come back
        together (the skip-on-non-finite decision needs them on the host). ``stop`` is true when
        any rank asked to stop (SIGTERM/SIGINT), so the loop needs no collective of its own.
        """
        cfg, d = self.cfg, self.d
        lr = self._lr()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.train_model.train()
        sched = self.objective.schedule
        adaptive = hasattr(sched, "bin_stats")
        stats = sched.ema.new_zeros(2, sched.bins) if adaptive else None
        bins = cfg.log.loss_bins
        # a learned schedule's ends are 0-d tensors: keep them on the device (float() would
        # be a host sync every step); a fixed schedule's are Python floats already
        lo, hi = (v.detach().double() if torch.is_tensor(v) else float(v)
                  for v in (sched.logsnr_min, sched.logsnr_max))  # fmt: skip
        loss_sum = torch.zeros((), device=d.device, dtype=torch.float64)
        bin_acc = torch.zeros(2, bins, device=d.device, dtype=torch.float64)
        autocast = (
            torch.autocast(d.device.type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else contextlib.nullcontext()
        )
        for i, slot in enumerate(self.slots):
            x, labels = self._batch(i)
            gen = torch.Generator(device=d.device)
            gen.manual_seed(stable_seed("noise", cfg.seed, slot, self.step))
            torch.manual_seed(stable_seed("dropout", cfg.seed, slot, self.step))
            last = i == len(self.slots) - 1
            sync = contextlib.nullcontext()
            if d.on and not last:
                sync = self.train_model.no_sync()
            with sync:
                with autocast:
                    loss, lam, mse = self.objective(self.train_model, x, labels, gen)
                (loss.mean() / self.accum).backward()
            loss_d = loss.detach().double()
            loss_sum += loss_d.sum()
            k = ((lam.double() - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()
            bin_acc[0].index_add_(0, k, torch.nan_to_num(loss_d, nan=0.0, posinf=0.0))
            bin_acc[1].index_add_(0, k, torch.ones_like(loss_d))
            if adaptive:  # fused vdmpp::adaptive_bin_stats when vdmpp.kernels serves it
                sched.add_stats(stats, lam, mse)
        flag = torch.tensor([float(stop_requested), float(self._data_error is not None)],
                            device=d.device, dtype=torch.float64)  # fmt: skip
        reduced = d.all_reduce(torch.cat([loss_sum.reshape(1), flag]))
        params = [p for g in self.opt.param_groups for p in g["params"]]
        clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        gn = torch.nn.utils.clip_grad_norm_(params, clip)
        loss_total, stop, data_error, grad_norm = torch.cat(
            [reduced, gn.reshape(1).double()]
        ).tolist()
        if data_error > 0:
            self._raise_data_error()
        mean_loss = loss_total / self.global_batch
        ok = math.isfinite(mean_loss) and math.isfinite(grad_norm)
        if ok:
            self.opt.step()
            self._update_ema()
            if adaptive:
                sched.apply_stats(d.all_reduce(stats))  # fused vdmpp::adaptive_apply_stats
            self.nonfinite_run = 0
        else:
            self.nonfinite_run += 1
            self.nonfinite_total += 1
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "loss": mean_loss, "grad_norm": grad_norm, "lr": lr, "ok": ok, "bins": bin_acc,
            "stop": stop > 0,
        }  # fmt: skip

    def _raise_data_error(self) -> None:
        """Every rank raises the same TrainingError naming the starved slot(s) and shards."""
        msgs = [self._data_error]
        if self.d.on:
            parts: list[Any] = [None] * self.d.world
            dist.all_gather_object(parts, self._data_error)
            msgs = parts
        self.opt.zero_grad(set_to_none=True)
        raise TrainingError("; ".join(m for m in msgs if m) + " (no step was taken)")

    @torch.no_grad()
    def _update_ema(self) -> None:
        beta = self._ema_beta()
        ema_p = list(self.ema.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in self.model.parameters()], 1.0 - beta)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    # --- checkpoint / export / samples ------------------------------------------------------------
    def _gather_positions(self) -> tuple[dict[int, dict[int, int]], int]:
        mine = ({s: self.positions.get(s, {}) for s in self.slots}, sum(self._corrupt.values()))
        if not self.d.on:
            return mine
        parts: list[Any] = [None] * self.d.world
        dist.all_gather_object(parts, mine)
        pos: dict[int, dict[int, int]] = {}
        for p, _ in parts:
            pos.update(p)
        return pos, sum(c for _, c in parts)

    def schedule_spread(self) -> float:
        """max − min over ranks of the adaptive bins (0: every rank holds the same schedule)."""
        sched = self.objective.schedule
        if not hasattr(sched, "ema"):
            return 0.0
        hi = sched.ema.detach().double().clone()
        lo = -hi
        if self.d.on:
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            dist.all_reduce(lo, op=dist.ReduceOp.MAX)
        return float((hi + lo).abs().max())

    def corrupt_total(self) -> int:
        c = torch.tensor(float(sum(self._corrupt.values())), device=self.d.device)
        return self.corrupt_base + int(self.d.all_reduce(c).item())

    def save_checkpoint(self) -> None:
        positions, corrupt = self._gather_positions()  # collective: every rank calls
        sched = self.objective.schedule
        if self.d.main:
            state = {
                "format": ckpt.FORMAT,
                "version": 1,
                "step": self.step,
                "config": config_mod.dumps(self.cfg),
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(),
                "schedule": sched.state_dict() if isinstance(sched, nn.Module) else {},
                "rng": _rng_state(),
                "data": {
                    "num_slots": self.num_slots,
                    "workers": self.cfg.data.workers,
                    "positions": positions,
                    "corrupt": self.corrupt_base + corrupt,
                },
                "nonfinite_total": self.nonfinite_total,
                "world_size": self.d.world,
            }
            ckpt.save_atomic(state, ckpt.checkpoint_path(self.ckpt_dir, self.step))
            ckpt.prune(self.ckpt_dir, self.cfg.checkpoint.keep)
            self.export()
        self.d.barrier()

    def export(self) -> None:
        cfg = self.cfg
        sched = self.objective.schedule
        meta = {
            "model": model_spec(cfg),
            "parameterization": cfg.objective.parameterization,
            "process": cfg.objective.process,
            "sigma_data": cfg.objective.sigma_data,
            "resolution": cfg.data.resolution,
            "channels": cfg.data.channels,
            "num_classes": cfg.data.num_classes,
            "data_range": [-1, 1],
            "logsnr_min": float(torch.as_tensor(sched.logsnr_min).detach()),
            "logsnr_max": float(torch.as_tensor(sched.logsnr_max).detach()),
            "schedule": schedule_meta(cfg, sched),
            "step": self.step,
        }
        write_export(self.out / "export", self.ema.state_dict(), meta)

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        if not self.d.main:
            return None
        from vdmpp.samplers import as_denoiser, heun, karras_sigmas

        cfg, s = self.cfg, self.cfg.sample
        dev = self.d.device
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        shape = (s.count, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        noise = torch.randn(shape, generator=gen, device=dev)
        labels = None
        if cfg.data.num_classes is not None:
            labels = torch.arange(s.count, device=dev) % cfg.data.num_classes
        den = as_denoiser(self.ema, cfg.objective.parameterization, cfg.objective.process,
                          sigma_data=cfg.objective.sigma_data)  # fmt: skip
        sigmas = karras_sigmas(s.steps, s.sigma_min, s.sigma_max, s.rho)
        x = heun(den, noise, sigmas.to(dev), extra_args={"class_labels": labels},
                 check_finite=False)  # fmt: skip
        path = self.out / "samples" / f"step-{self.step:09d}.png"
        _save_grid(x, path, labels=labels, num_classes=cfg.data.num_classes,
                   caption=f"{cfg.name} step {self.step}, EMA, heun {s.steps} steps"
                   + (", columns = classes" if labels is not None else ""))  # fmt: skip
        return path

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        self.nonfinite_run = 0
        metrics_f = open(self.out / "metrics.jsonl", "a") if d.main else None  # noqa: SIM115
        tb = self._tensorboard()
        bar = None
        console = runlog.console(self.logger)
        if d.main and runlog.progress_allowed(cfg.log.progress):  # a terminal: never in a log
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.name, dynamic_ncols=True)
            if console is not None:
                console.bar = bar
        self.t_start = time.time()
        window: dict[str, Any] = {"loss": 0.0, "n": 0, "gn": 0.0, "t": time.perf_counter(),
                                  "imgs": 0, "bins": None, "steps": 0}  # fmt: skip
        result: dict[str, Any] = {"status": "done"}
        try:
            with _Preemption() as pre:
                self._pre = pre
                while self.step < cfg.steps:
                    at_boundary = (copy.deepcopy(self.positions), dict(self._corrupt))
                    try:
                        m = self.train_step(stop_requested=pre.signal is not None)
                    except _DataWaitInterrupted:
                        result = self._interrupted_in_data_wait(pre, *at_boundary)
                        break
                    if m["ok"]:
                        window["loss"] += m["loss"]
                        window["gn"] += m["grad_norm"]
                        window["n"] += 1
                    window["imgs"] += self.global_batch
                    window["steps"] += 1
                    b = m["bins"]
                    window["bins"] = b if window["bins"] is None else window["bins"] + b
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{m['loss']:.4g}", refresh=False)
                    if self.nonfinite_run >= cfg.nan_patience:
                        self.save_checkpoint()
                        raise NonFiniteError(
                            f"{self.nonfinite_run} non-finite losses/gradients in a row at step "
                            f"{self.step}; checkpoint written, stopping (nan_patience)"
                        )
                    last = self.step >= cfg.steps
                    if self.step % cfg.log.every == 0 or last:
                        self._log_metrics(m, window, metrics_f, tb)
                    if cfg.sample.every and (self.step % cfg.sample.every == 0 or last):
                        self.save_samples()
                        d.barrier()
                    if m["stop"]:
                        self.save_checkpoint()
                        self.log(f"signal received: checkpoint at step {self.step}, exiting")
                        result = {"status": "preempted"}
                        break
                    if self.step % cfg.checkpoint.every == 0 or last:
                        self.save_checkpoint()
        finally:
            if console is not None:
                console.bar = None
            if bar is not None:
                bar.close()
            if metrics_f is not None:
                metrics_f.close()
            if tb is not None:
                tb.close()
        result.update(step=self.step, out=str(self.out), nonfinite=self.nonfinite_total)
        return result

    def _interrupted_in_data_wait(self, pre: _Preemption, positions: dict, corrupt: dict
                                  ) -> dict[str, Any]:  # fmt: skip
        """A signal broke a data wait mid-step: nothing of the step was applied yet."""
        name = signal.Signals(pre.signal or signal.SIGTERM).name
        self.opt.zero_grad(set_to_none=True)
        if self.d.on:  # the other ranks are inside the step's collectives: no checkpoint
            raise PreemptedError(
                f"{name} received while rank {self.d.rank} waited {pre.grace:g} s for data at "
                f"step {self.step}: exiting without a new checkpoint (--resume continues from "
                f"the latest one)"
            )
        self.positions, self._corrupt = positions, corrupt
        self.save_checkpoint()
        self.log(f"{name} received while waiting for data: checkpoint at step {self.step}, "
                 f"exiting")  # fmt: skip
        return {"status": "preempted"}

    def finish(self, result: dict[str, Any]) -> None:
        """Rank 0: ``RUN/status.json`` (atomic) and the result as the last line of log.txt."""
        if not self.d.main:
            return
        fields = {k: v for k, v in result.items() if k not in ("status", "exit_code")}
        fields["elapsed_s"] = time.time() - getattr(self, "t_start", time.time())
        try:
            run_status.write_status(self.out, result["status"], **fields)
        except OSError as e:  # a full disk must not hide the outcome itself
            self.warn(f"could not write {self.out / run_status.FILE}: {e}")
        self.log("result: " + json.dumps(result))

    def close(self) -> None:
        """Stop the DataLoader workers now (they ignore SIGTERM: ``data.ignore_stop_signals``)."""
        loaders, self.loaders = self.loaders, []
        for it in loaders:
            shutdown_loader(it)

    def _tensorboard(self) -> Any:
        if not (self.cfg.log.tensorboard and self.d.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.warn("log.tensorboard = true but the tensorboard package is not installed: no "
                      "TensorBoard scalars (pip install 'vdmpp-train[tensorboard]')")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    @torch.no_grad()
    def lambda_spread(self, n: int = 512) -> dict[str, float]:
        """How widely the schedule spreads training over log-SNR: λ(t) for t ~ U(0, 1) has the
        schedule's density p(λ) (VDM++ §2, eq. 6), so the midpoint rule over t gives its mean
        and standard deviation, and λ(0.95), λ(0.5), λ(0.05) its 5 %, 50 % and 95 % quantiles
        (λ decreases in t). For the adaptive schedule this tracks p(λ) ∝ E[loss | λ] (VDM++
        App. F) as it moves. One host read, at a log interval only."""
        sched = self.objective.schedule
        dev = self.d.device
        t = torch.cat([(torch.arange(n, device=dev, dtype=torch.float32) + 0.5) / n,
                       torch.tensor([0.95, 0.5, 0.05], device=dev)])  # fmt: skip
        lam = sched.logsnr(t).double()
        grid, q = lam[:n], lam[n:]
        mean, std, q05, q50, q95 = torch.cat(
            [grid.mean().reshape(1), grid.std(unbiased=False).reshape(1), q]
        ).tolist()
        return {"lambda_mean": mean, "lambda_std": std, "lambda_q05": q05, "lambda_q50": q50,
                "lambda_q95": q95}  # fmt: skip

    def _log_metrics(self, m: dict, window: dict, f: Any, tb: Any) -> None:
        cfg = self.cfg
        bins = self.d.all_reduce(window["bins"].clone())
        corrupt = self.corrupt_total()
        spread = self.schedule_spread()
        if not self.d.main:
            window.update(loss=0.0, n=0, gn=0.0, imgs=0, bins=None, t=time.perf_counter(),
                          steps=0)  # fmt: skip
            return
        now = time.perf_counter()
        n = max(window["n"], 1)
        lam = self.lambda_spread()
        sched = self.objective.schedule
        lo, hi = (float(torch.as_tensor(v).detach()) for v in (sched.logsnr_min, sched.logsnr_max))
        edges = torch.linspace(lo, hi, cfg.log.loss_bins + 1).tolist()
        per_bin = (bins[0] / bins[1].clamp_min(1)).tolist()
        dt = max(now - window["t"], 1e-9)
        rec: dict[str, Any] = {
            "step": self.step,
            "wall_time": time.time(),
            "elapsed_s": time.time() - self.t_start,
            "images": self.step * self.global_batch,
            "loss": window["loss"] / n if window["n"] else float("nan"),
            "lr": m["lr"],
            "grad_norm": window["gn"] / n if window["n"] else float("nan"),
            "images_per_s": window["imgs"] / dt,
            "loss_per_logsnr_bin": {
                "edges": edges,
                "loss": [v if c > 0 else None for v, c in zip(per_bin, bins[1].tolist())],
            },
            "nonfinite_steps": self.nonfinite_total,
            "corrupt_samples": corrupt,
            **lam,
        }
        if hasattr(sched, "cdf"):
            rec["adaptive_rank_spread"] = spread
            rec["adaptive_density"] = ((sched.cdf[1:] - sched.cdf[:-1]) / sched.width).tolist()
        f.write(json.dumps(rec) + "\n")
        f.flush()
        if tb is not None:
            for k in ("loss", "lr", "grad_norm", "images_per_s", "nonfinite_steps",
                      "corrupt_samples", "lambda_std", "lambda_q05", "lambda_q95"):  # fmt: skip
                tb.add_scalar(k, rec[k], self.step)
            tb.flush()
        steps_per_s = window["steps"] / dt
        left = (cfg.steps - self.step) / steps_per_s if steps_per_s > 0 else float("inf")
        self.log(f"step {self.step}/{cfg.steps} | {rec['images_per_s']:.1f} img/s | loss "
                 f"{rec['loss']:.4g} | grad norm {rec['grad_norm']:.3g} | lr {rec['lr']:.3g} | "
                 f"nonfinite {self.nonfinite_total} | corrupt {corrupt} | λ std "
                 f"{lam['lambda_std']:.2f} | ETA {runlog.eta(left)}")  # fmt: skip
        window.update(loss=0.0, n=0, gn=0.0, imgs=0, bins=None, t=now, steps=0)


def train(cfg: Config, *, resume: bool = False,
          config_path: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``cfg`` (validated first); return the result record.

    The record is {"status", "step", "steps", "out", "nonfinite", "exit_code"} with status
    ``done`` or ``preempted``; a run that stops otherwise raises :class:`TrainingError`
    (``stopped-nonfinite``: :class:`NonFiniteError`; ``failed``) with the record as its
    ``result``; any other exception carries it as ``vdmpp_result``. Rank 0 writes the status
    to ``RUN/status.json`` and the record as the last line of ``RUN/log.txt``
    (:mod:`vdmpp.train.status`). ``config_path`` is the config file, for the log's summary.
    """
    cfg.validate()
    logger = logging.getLogger("vdmpp.train")
    try:
        trainer = Trainer(cfg, resume=resume, config_path=config_path)
    except BaseException:
        runlog.close(logger)
        raise
    d = trainer.d
    ok = False
    result: dict[str, Any] = {"status": "failed"}
    try:
        try:
            result = trainer.run()
            ok = True
        except TrainingError as e:
            result = {"status": e.status, "error": str(e)}
            e.result = result
            (logger.warning if e.status == "preempted" else logger.error)(str(e))
            raise
        except BaseException as e:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            result = {"status": "failed", "error": why}
            with contextlib.suppress(AttributeError, TypeError):
                e.vdmpp_result = result  # type: ignore[attr-defined]
            logger.error("training failed: %s", why, exc_info=not isinstance(
                e, KeyboardInterrupt | ConfigError))  # fmt: skip
            raise
        finally:
            result.update(step=trainer.step, steps=cfg.steps, out=str(trainer.out),
                          nonfinite=trainer.nonfinite_total,
                          exit_code=run_status.EXIT_CODES[result["status"]])  # fmt: skip
            trainer.finish(result)
        return result
    finally:
        trainer.close()
        if d.on and dist.is_initialized():
            _teardown(trainer, barrier=ok)
        runlog.close(logger)


def _teardown(trainer: Trainer, *, barrier: bool) -> None:
    """Leave the process group cleanly (a gloo run used to exit 1 now and then at teardown).

    The DDP wrapper's reducer holds the process group: if it outlives
    ``destroy_process_group`` the group's C++ threads are torn down during interpreter exit
    ("terminate called without an active exception"). So drop the models first, meet the other
    ranks (only after a successful run: after an error they may be gone), then destroy.
    """
    trainer.train_model = trainer.model = trainer.ema = None  # type: ignore[assignment]
    trainer.opt = None  # type: ignore[assignment]
    gc.collect()
    if barrier:
        with contextlib.suppress(Exception):
            dist.barrier()
    dist.destroy_process_group()
    gc.collect()
