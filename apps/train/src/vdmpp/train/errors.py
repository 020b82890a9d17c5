"""The errors of a run and the one table of what each means as an exit code and a status.

=====================  ====  ===========================================================
status                 exit  meaning
=====================  ====  ===========================================================
``done``               0     trained to ``steps``; checkpoint and export are final
``preempted``          75    SIGTERM/SIGINT: checkpoint written, ``--resume`` continues
                             (75 is ``EX_TEMPFAIL`` of sysexits.h: "try again later")
``stopped-nonfinite``  4     ``nan_patience`` non-finite steps in a row; checkpoint written
``failed``             3     any other error (starved data stream, a crash); see log.txt
(config error)         2     the config or command line is wrong; no run was started
=====================  ====  ===========================================================
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EXIT_CODES",
    "EXIT_CONFIG",
    "STATUSES",
    "ConfigError",
    "NonFiniteError",
    "PreemptedError",
    "TrainingError",
]

STATUSES = ("done", "preempted", "stopped-nonfinite", "failed")
EXIT_CODES = {"done": 0, "failed": 3, "stopped-nonfinite": 4, "preempted": 75}
EXIT_CONFIG = 2


class ConfigError(ValueError):
    """A configuration that cannot be trained; the message names the key and the fix."""


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must look at (e.g. too many non-finite losses).

    ``status`` is the run's final status (:mod:`vdmpp.train.status`); ``result`` is the result
    record (step, out, ...) once :func:`~vdmpp.train.trainer.train` has written ``status.json``.
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
