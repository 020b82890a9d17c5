"""A stop signal while ``[eval]`` runs loses nothing: the evaluation finishes, the run
checkpoints and exits 75, and the resumed run ends with each eval row exactly once."""

from __future__ import annotations

import json
import signal
import sys
import textwrap


def test_faults_sigterm_during_evaluation(launch, cli, cli_env, small, tmp_path) -> None:
    run = tmp_path / "run"
    marker = tmp_path / "in-eval"
    sets = [
        *small,
        "steps=12",
        "log.every=2",
        "checkpoint.every=4",
        "eval.every=4",
        "eval.count=16",
        "eval.steps=3",
        "deterministic=true",
        f"out={run}",
    ]
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        import vdmpp.train.evaluate as E
        real = E.InTrainingEval.run
        def slow(self, step, *a, **kw):
            if step == 8:  # the signal arrives in here
                pathlib.Path({str(marker)!r}).write_text("x")
                time.sleep(3)
            return real(self, step, *a, **kw)
        E.InTrainingEval.run = slow
        from vdmpp.train.cli import main
        sys.exit(main({["digits", *(a for s in sets for a in ("--set", s))]!r}))
    """)
    p = launch([sys.executable, "-c", script], env=cli_env)
    p.wait_until(marker.is_file)
    p.kill_group(signal.SIGTERM)
    rc, out, err = p.finish(timeout=120)
    assert rc == 75, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["status"] == "preempted"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_value" in r] == [4, 8]  # the cut eval finished
    r = cli(["digits", *(a for s in sets for a in ("--set", s)), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_value" in r] == [4, 8, 12]  # none twice, none lost
    assert [r["step"] for r in rows if "eval_value" not in r] == [2, 4, 6, 8, 10, 12]
