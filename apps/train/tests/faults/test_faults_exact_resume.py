"""The README's promise: the shipped digits config (``deterministic = true``) resumes bit for bit
on CPU, with no extra flag (it used to reseed the data stream on resume)."""

from __future__ import annotations

import torch

from vdmpp.train.checkpoint import find_latest
from vdmpp.train.config import load


def test_faults_shipped_digits_config_resumes_bit_identically(cli, small, tmp_path) -> None:
    assert load("digits").deterministic is True
    common = [s for s in small if not s.startswith("deterministic")]
    common += ["checkpoint.every=3", "data.shuffle_buffer=64"]

    def run(out, steps: int, *extra: str):
        r = cli(
            [
                "digits",
                *(a for s in [*common, f"steps={steps}", f"out={out}"] for a in ("--set", s)),
                *extra,
            ]
        )
        assert r.returncode == 0, r.stderr[-3000:]

    run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    run(tmp_path / "b", 6, "--resume")
    _, a = find_latest(tmp_path / "a" / "checkpoints")
    _, b = find_latest(tmp_path / "b" / "checkpoints")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a["schedule"]["ema"], b["schedule"]["ema"])
