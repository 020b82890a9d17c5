"""``train(cfg)``: one run from start-up to its outcome — the result record, ``status.json``,
the exit status — and a clean leave of the process group."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import log as runlog
from . import status as run_status
from .config import Config
from .errors import ConfigError, TrainingError
from .trainer import Trainer

__all__ = ["train"]


def train(
    cfg: Config, *, resume: bool = False, config_path: str | Path | None = None
) -> dict[str, Any]:
    """Train ``cfg`` (validated first); return the result record.

    The record is {"status", "step", "steps", "out", "nonfinite", "exit_code"} with status
    ``done`` or ``preempted``; a run that stops otherwise raises :class:`TrainingError`
    (``stopped-nonfinite``: :class:`NonFiniteError`; ``failed``) with the record as its
    ``result``; any other exception carries it as ``vdmpp_result``. Rank 0 writes the status
    to ``RUN/status.json`` and the record as the last line of ``RUN/log.txt``
    (:mod:`vdmpp.train.status`). ``config_path`` is the config file, for the log's summary.
    """
    cfg.validate()  # a no-op when the CLI validated this config already
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
            logger.error(
                "training failed: %s",
                why,
                exc_info=not isinstance(e, KeyboardInterrupt | ConfigError),
            )
            raise
        finally:
            result.update(
                step=trainer.step,
                steps=cfg.steps,
                out=str(trainer.out),
                nonfinite=trainer.nonfinite_total,
                exit_code=run_status.EXIT_CODES[result["status"]],
            )
            _finish(trainer, result)
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


def _finish(self: Trainer, result: dict[str, Any]) -> None:
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
