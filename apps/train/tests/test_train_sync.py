"""A training step reads tensors on the host only where it plans to (one batched read per step).

On a GPU every such read (``float(t)``, ``.item()``, ``.tolist()``) stalls the stream. The
trainer gathers loss, grad norm and the stop flag into one read per step; a learned schedule's
λ range is a pair of 0-d parameters and must not add reads of its own. On a CPU there is no
stream, so reads are recorded at the dispatcher (``aten::_local_scalar_dense`` and friends).
"""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vdmpp.train import config as C
from vdmpp.train.trainer import Trainer

HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"}


class HostReads(TorchDispatchMode):
    """Counts host reads by the innermost vdmpp frame that caused them; torch.optim's own reads
    (its step counter lives on the host unless ``capturable=True``) are out of scope."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_READS:
            stack = traceback.extract_stack()
            if not any("/torch/optim/" in f.filename for f in stack):
                site = next(
                    (
                        f"{f.filename.rsplit('/', 1)[-1]}:{f.name}"
                        for f in reversed(stack)
                        if "/vdmpp/" in f.filename
                    ),
                    "?",
                )
                self.sites[site] += 1
        return func(*args, **(kwargs or {}))


def _reads_per_step(tmp_path, small, schedule: str) -> Counter[str]:
    overrides = [
        *small,
        "objective.adaptive=false",
        f"objective.schedule='{schedule}'",
        "steps=4",
        f"out='{tmp_path / schedule}'",
        "deterministic=false",
    ]
    trainer = Trainer(C.load("digits", overrides))
    trainer.train_step()  # first step: lazy init, data pipeline start
    counts = []
    for _ in range(2):
        rec = HostReads()
        with rec:
            trainer.train_step()
        counts.append(rec.sites)
    assert counts[0] == counts[1], counts  # the same every step
    return counts[0]


@pytest.mark.parametrize("schedule", ["learned"])
def test_a_learned_schedule_adds_no_host_read(tmp_path, small, schedule):
    torch.set_num_threads(1)
    fixed = _reads_per_step(tmp_path, small, "cosine")
    learned = _reads_per_step(tmp_path, small, schedule)
    assert learned == fixed, (learned, fixed)
    assert not [s for s in learned if s.startswith("trainer.py")], learned
