"""Progress of long eval work: a bar on a terminal, plain lines (no ``\\r``) in a log."""

from __future__ import annotations

import io
import logging

from vdmpp.eval.model import load_model
from vdmpp.eval.sampling import SampleSpec, run_shard
from vdmpp.train.log import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_off_a_terminal_bar_on_one() -> None:
    log = io.StringIO()
    p = Progress(10, "img", desc="sample", stream=log, every=0.0)
    for _ in range(5):
        p.update(2)
    p.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [ln.split(" img")[0] for ln in lines] == [
        f"sample: {k}/10" for k in (2, 4, 6, 8, 10, 10)
    ]
    assert "(100%)" in lines[-1] and "ETA 0s" in lines[-1]
    quiet = io.StringIO()
    p = Progress(10, "img", desc="sample", stream=quiet, every=3600.0)
    p.update(4)  # within `every` of the start: no line yet
    assert quiet.getvalue() == ""
    p.close()  # the final count is always reported
    assert quiet.getvalue().startswith("sample: 4/10 img (40%)")
    off = io.StringIO()
    p = Progress(10, "img", desc="sample", stream=off, enabled=False, every=0.0)
    p.update(10)
    p.close()
    assert off.getvalue() == ""
    tty = _Tty()
    p = Progress(10, "img", desc="sample", stream=tty, every=0.0)
    p.update(10)
    p.close()
    assert "\r" in tty.getvalue() and "sample: 10/10 img (" not in tty.getvalue()  # tqdm's bar


def test_sampling_logs_progress_lines_in_a_log(export_dir, tmp_path, caplog) -> None:
    model, meta = load_model(export_dir, "cpu")
    with caplog.at_level(logging.INFO, logger="vdmpp.eval"):
        stats = run_shard(
            model,
            meta,
            list(range(6)),
            SampleSpec("euler", 2),
            tmp_path / "s",
            chunk=3,
            batch_size=3,
            progress=True,
        )
    assert stats["done"] == 6
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sample: ")]
    assert lines and lines[-1].startswith("sample: 6/6 img (100%)"), lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vdmpp.eval"):
        run_shard(
            model,
            meta,
            list(range(6, 9)),
            SampleSpec("euler", 2),
            tmp_path / "s2",
            chunk=3,
            batch_size=3,
            progress=False,
        )
    assert not [r for r in caplog.records if r.getMessage().startswith("sample: ")]
