"""The training loop: one config → one run directory, single process or torchrun DDP.

Slots. The global batch of a step is ``slots = global_size / per_device`` micro-batches; slot k
lives on rank k mod W as its (k div W)-th accumulation micro-step. Each slot has its own data
stream (:mod:`~vdmpp.train.loaders`) and its noise (t, ε, dropout) is drawn from generators
seeded by (seed, slot, step), so the update of a step depends on the global batch and
micro-batch size only — W = 2 ranks × 1 micro-step computes what W = 1 × 2 micro-steps
computes, and a resumed run continues the exact stream of an uninterrupted one.

VDM++ App. H: Adam, global-norm clip 1, EMA of weights (half-life in images, EDM), linear LR
warm-up (in images), low-discrepancy t, the adaptive schedule's bin statistics (100 bins, decay
0.999) summed over every slot of every rank before the EMA update, so all ranks hold one schedule.

Each concern has its module (the README's "where things live"); this one builds the parts,
runs one step, and loops.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import log as runlog
from . import status as run_status
from .config import Config
from .data import stable_seed
from .distributed import Dist, dist_env, init_distributed
from .ema import build_ema
from .errors import ConfigError, NonFiniteError, PreemptedError, TrainingError
from .evaluate import InTrainingEval
from .export import clean_stale, export_meta, export_step, write_export
from .fileio import clean_stale_temps, write_atomic
from .loaders import DataFeed
from .metrics import LossBins, MetricsLog, lambda_spread, schedule_extras, schedule_spread
from .objective import Objective, build_net
from .preemption import DataWaitInterrupted, Preemption
from .preview import save_preview
from .summary import startup_summary
from .toml_io import config_diff, dumps

__all__ = [
    "Dist",
    "NonFiniteError",
    "PreemptedError",
    "Trainer",
    "TrainingError",
    "dist_env",
    "train",  # noqa: F822 (module __getattr__ below)
]


class Trainer:
    def __init__(
        self, cfg: Config, *, resume: bool = False, config_path: str | Path | None = None
    ) -> None:
        # --- process, run directory, batch split ---
        self.cfg, self.config_path = cfg, config_path
        self.d = d = init_distributed(cfg.device)
        self.logger = runlog.configure("train", rank=d.rank)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.out = ckpt.check_run_dir(cfg.out, resume)
        self.per_device, self.accum = cfg.micro_batches(d.world)
        self.slots = [m * d.world + d.rank for m in range(self.accum)]
        self.global_batch = cfg.batch.global_size
        # --- data, model, objective, EMA, optimizer (all that can fail, before any step) ---
        self.data = DataFeed(cfg, self.out, d, self.slots, d.world * self.accum, self.per_device)
        torch.manual_seed(cfg.seed)
        self.model = build_net(cfg).to(d.device)
        self.objective = Objective(cfg).to(d.device)
        self.ema = build_ema(cfg, self.model, self.global_batch, self.out)
        o = cfg.optimizer
        # the objective's parameters: a learned schedule's, EDM2's u(λ)
        params = list(self.model.parameters()) + list(self.objective.parameters())
        opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        self.opt = opt_cls(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        self.evaluator = InTrainingEval(cfg, d, self.out) if cfg.eval.every else None
        # --- checkpointed state: one entry per part ---
        self._nonfinite = ckpt.Counter()
        parts = {
            "model": self.model,
            "ema": self.ema,
            "optimizer": self.opt,
            "schedule": self.objective.schedule,
            "nonfinite_total": self._nonfinite,
        }
        if self.objective.uncertainty is not None:
            parts["uncertainty"] = self.objective.uncertainty
        self.checkpoints = ckpt.CheckpointIO(self.out / "checkpoints", cfg.checkpoint.keep, parts)
        self.step = self.nonfinite_run = 0
        self.resumed_from: Path | None = None
        self._pre: Preemption | None = None
        if resume:
            self._load_latest()
        self.start_step = self.step
        if d.main:
            self._start_run_dir()
        # --- the wrapped model and the streams ---
        self.train_model: nn.Module = self.model
        if d.on:
            ids = [d.local_rank] if d.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.data.start(self.step)

    @property
    def nonfinite_total(self) -> int:
        return self._nonfinite.value

    def _start_run_dir(self) -> None:
        """Rank 0: log.txt with the summary, status ``running``, config.toml, stale temps gone."""
        self.out.mkdir(parents=True, exist_ok=True)
        runlog.attach_file(self.logger, self.out / "log.txt", startup_summary(self))
        run_status.write_status(
            self.out,
            "running",
            step=self.step,
            steps=self.cfg.steps,
            out=str(self.out),
            pid=os.getpid(),
        )
        write_atomic(self.out / "config.toml", dumps(self.cfg))
        clean_stale(self.out / "export")
        clean_stale_temps(self.out, ".config.toml.*.tmp")  # left by a killed run
        if self.resumed_from is not None and export_step(self.out / "export") != self.step:
            self.export()  # killed after its checkpoint, before (or while) exporting
            self.log(f"export was missing or stale: rewritten for step {self.step}")

    def _load_latest(self) -> None:
        found = self.checkpoints.latest(warn=self.log)
        if found is None:
            where = self.checkpoints.directory
            self.log(f"--resume: no loadable checkpoint in {where}; starting from step 0")
            return
        path, state = found
        try:
            self.checkpoints.restore(state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(
                f"--resume: {path} was written for another model/optimizer/schedule config "
                f"({config_diff(state.get('config'), self.cfg)}): resume with the run's own "
                f"{self.out / 'config.toml'}, or pass --set out=... for a new run "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        self.step = int(state["step"])
        self.data.restore(state.get("data", {}), self.log)
        self.resumed_from = path
        self.log(f"resumed from {path} at step {self.step}")

    def log(self, msg: str) -> None:
        """An INFO line of rank 0 (stderr and RUN/log.txt); other ranks log nothing."""
        if self.d.main:
            self.logger.info(msg)

    def warn(self, msg: str) -> None:
        """A warning from any rank (stderr names the rank; rank 0's also go to log.txt)."""
        self.logger.warning(msg)

    # --- one optimizer step ---------------------------------------------------------------------
    def _lr(self) -> float:
        o = self.cfg.optimizer
        if o.warmup_images <= 0:
            return o.lr
        return o.lr * min(1.0, (self.step + 1) * self.global_batch / o.warmup_images)

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
        loss_sum = torch.zeros((), device=d.device, dtype=torch.float64)
        loss_bins = LossBins(sched, cfg.log.loss_bins, d.device)
        autocast = (
            torch.autocast(d.device.type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else contextlib.nullcontext()
        )
        for i, slot in enumerate(self.slots):
            x, labels = self.data.batch(i, self._pre)
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
            loss_bins.add(lam, loss_d)
            if adaptive:  # fused vdmpp::adaptive_bin_stats when vdmpp.kernels serves it
                sched.add_stats(stats, lam, mse)
        flag = torch.tensor(
            [float(stop_requested), float(self.data.error is not None)],
            device=d.device,
            dtype=torch.float64,
        )
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
            self.ema.update(self.model, self.step + 1)
            if adaptive:
                sched.apply_stats(d.all_reduce(stats))  # fused vdmpp::adaptive_apply_stats
            self.nonfinite_run = 0
        else:
            self.nonfinite_run += 1
            self._nonfinite.value += 1
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "loss": mean_loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "ok": ok,
            "bins": loss_bins.acc,
            "stop": stop > 0,
        }

    def _raise_data_error(self) -> None:
        """Every rank raises the same TrainingError naming the starved slot(s) and shards."""
        msgs = self.d.all_gather_object(self.data.error)
        self.opt.zero_grad(set_to_none=True)
        raise TrainingError("; ".join(m for m in msgs if m) + " (no step was taken)")

    # --- checkpoint / export / previews / metrics -----------------------------------------------
    def save_checkpoint(self) -> None:
        data = self.data.gather()  # collective: every rank calls
        if self.d.main:
            cfg_text, world = dumps(self.cfg), self.d.world
            state = self.checkpoints.state(self.step, config=cfg_text, data=data, world_size=world)
            best = self.evaluator.best if self.evaluator is not None else None
            protect = best["step"] if best and self.cfg.checkpoint.keep_best else None
            self.checkpoints.save(state, protect=protect)
            self.export()
        self.d.barrier()

    def export_meta(self) -> dict[str, Any]:
        """model.json of the EMA model now (what the export and in-training eval use)."""
        ema = self.ema.describe() if self.cfg.ema.kind != "standard" else None
        unc = self.objective.uncertainty_table()
        return export_meta(self.cfg, self.objective.schedule, self.step, ema=ema, uncertainty=unc)

    def export(self) -> None:
        write_export(self.out / "export", self.ema.module.state_dict(), self.export_meta())

    def save_samples(self) -> Path | None:
        if not self.d.main:
            return None
        return save_preview(self.cfg, self.ema.module, self.d.device, self.step, self.out)

    def corrupt_total(self) -> int:
        return self.data.corrupt_total()

    def schedule_spread(self) -> float:
        """max − min over ranks of the adaptive bins (0: every rank holds the same schedule)."""
        return schedule_spread(self.objective.schedule, self.d)

    def lambda_spread(self, n: int = 512) -> dict[str, float]:
        """λ's mean, std and quantiles under p(λ) (:func:`~vdmpp.train.metrics.lambda_spread`)."""
        return lambda_spread(self.objective.schedule, self.d.device, n)

    def _log_metrics(self, m: dict, metrics: MetricsLog) -> None:
        """One metrics row: the window's λ bins summed over ranks (collectives on every rank)."""
        bins = self.d.all_reduce(metrics.bins.clone())
        extra = {
            "images": self.step * self.global_batch,
            "nonfinite_steps": self.nonfinite_total,
            "corrupt_samples": self.corrupt_total(),
        }
        spread = self.schedule_spread()
        if self.d.main:
            extra.update(self.lambda_spread())
            extra.update(schedule_extras(self.objective.schedule, spread))
        metrics.write(
            self.step,
            self.cfg.steps,
            lr=m["lr"],
            bins=bins,
            extra=extra,
            schedule=self.objective.schedule,
            log=self.log,
        )

    def _evaluate(self, metrics: MetricsLog) -> bool:
        """``[eval]`` on the EMA model (every rank samples); True when it is the best so far."""
        assert self.evaluator is not None
        row, best = self.evaluator.run(self.step, self.ema.module, self.export_meta())
        if row is not None:
            metrics.write_row(row)
            self.log(InTrainingEval.describe(row))
        return best

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        self.nonfinite_run = 0
        if d.main:  # rows a killed session wrote past the checkpoint it resumes from
            MetricsLog.truncate(self.out, self.step)
        metrics = MetricsLog(
            self.out,
            main=d.main,
            every=cfg.log.every,
            bins=cfg.log.loss_bins,
            tensorboard=cfg.log.tensorboard,
            warn=self.warn,
        )
        self.t_start = metrics.t_start
        bar = runlog.StepBar(
            self.logger, cfg.log.progress and d.main, cfg.steps, self.step, cfg.name
        )
        result: dict[str, Any] = {"status": "done"}
        try:
            with Preemption() as pre:
                self._pre = pre
                while self.step < cfg.steps:
                    # --- one step; a signal that breaks its data wait applied nothing ---
                    at = self.data.boundary()
                    try:
                        m = self.train_step(stop_requested=pre.signal is not None)
                    except DataWaitInterrupted:
                        result = self._interrupted_in_data_wait(pre, at)
                        break
                    metrics.add(m, self.global_batch)
                    bar.update(m["loss"])
                    # --- non-finite patience ---
                    if self.nonfinite_run >= cfg.nan_patience:
                        self.save_checkpoint()
                        raise NonFiniteError(
                            f"{self.nonfinite_run} non-finite losses/gradients in a row at step "
                            f"{self.step}; checkpoint written, stopping (nan_patience)"
                        )
                    last = self.step >= cfg.steps
                    # --- metrics and previews ---
                    if metrics.due(self.step, last):
                        self._log_metrics(m, metrics)
                    if cfg.sample.every and (self.step % cfg.sample.every == 0 or last):
                        self.save_samples()
                        d.barrier()
                    ckpt_due = self.step % cfg.checkpoint.every == 0 or last
                    # --- evaluation (before this step's checkpoint: a kill repeats it) ---
                    if self.evaluator is not None and self.evaluator.due(self.step, last):
                        best = self._evaluate(metrics)
                        if best and cfg.checkpoint.keep_best and not ckpt_due and not m["stop"]:
                            self.save_checkpoint()
                    # --- post-hoc EMA snapshots ---
                    if d.main and self.ema.snapshot_due(self.step, ckpt_due):
                        self.ema.save_snapshot()
                    # --- preemption and checkpoints ---
                    if m["stop"]:
                        self.save_checkpoint()
                        self.log(f"signal received: checkpoint at step {self.step}, exiting")
                        result = {"status": "preempted"}
                        break
                    if ckpt_due:
                        self.save_checkpoint()
        finally:
            bar.close()
            metrics.close()
        result.update(step=self.step, out=str(self.out), nonfinite=self.nonfinite_total)
        return result

    def _interrupted_in_data_wait(self, pre: Preemption, at: tuple) -> dict[str, Any]:
        """A signal broke a data wait mid-step: nothing of the step was applied yet."""
        name = signal.Signals(pre.signal or signal.SIGTERM).name
        self.opt.zero_grad(set_to_none=True)
        if self.d.on:  # the other ranks are inside the step's collectives: no checkpoint
            raise PreemptedError(
                f"{name} received while rank {self.d.rank} waited {pre.grace:g} s for data at "
                f"step {self.step}: exiting without a new checkpoint (--resume continues from "
                f"the latest one)"
            )
        self.data.rewind(at)
        self.save_checkpoint()
        self.log(f"{name} received while waiting for data: checkpoint at step {self.step}, exiting")
        return {"status": "preempted"}

    def close(self) -> None:
        """Stop the DataLoader workers now (they ignore SIGTERM: ``data.ignore_stop_signals``)."""
        self.data.close()


def __getattr__(name: str) -> Any:
    """``vdmpp.train.trainer.train``: the entry point lives in :mod:`vdmpp.train.run`."""
    if name == "train":
        from .run import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
