"""``vdmpp-eval plot --run``: the training curves (loss, grad norm, lr, throughput against step)
next to p(λ) and the per-bin loss, drawn from exactly what metrics.jsonl holds."""

from __future__ import annotations

import json
import math

import pytest

from vdmpp.eval import plot as P
from vdmpp.eval.cli import main


def _rows() -> list[dict]:
    rows = []
    for step in (10, 20, 30):
        rows.append(
            {
                "step": step,
                "loss": 1.0 / step,
                "grad_norm": 2.0 + step,
                "lr": 1e-4 * step,
                "images_per_s": 100.0 + step,
                "loss_per_logsnr_bin": {"edges": [-10.0, 0.0, 10.0], "loss": [0.5, None]},
                "adaptive_density": [0.04, 0.06],
            }
        )
    rows[1]["grad_norm"] = math.nan  # a skipped (non-finite) interval: left out of the curve
    return rows


def _write(run, rows, extra: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + extra
    (run / "metrics.jsonl").write_text(text)


def test_curve_reads_steps_and_values(tmp_path):
    rows = _rows()
    resumed = {**rows[2], "loss": 0.5}  # a resumed run logs step 30 again: the later one wins
    _write(tmp_path / "run", [*rows, resumed], extra='{"step": 40, "lo')  # torn last line
    recs = P.read_metrics(tmp_path / "run")
    assert len(recs) == 4
    assert P.curve(recs, "loss") == ([10, 20, 30], [0.1, 0.05, 0.5])
    assert P.curve(recs, "grad_norm") == ([10, 30], [12.0, 32.0])
    assert P.curve(recs, "absent") == ([], [])


def test_plot_run_draws_every_curve_from_metrics(tmp_path, monkeypatch):
    _write(tmp_path / "run", _rows())
    figs = []
    real = P._save
    monkeypatch.setattr(P, "_save", lambda fig, path: (figs.append(fig), real(fig, path))[1])
    path = P.plot_run(tmp_path / "run", tmp_path / "out" / "run.png")
    assert path.is_file() and path.stat().st_size > 0
    axes = figs[0].axes
    assert len(axes) == 6
    by_title = {ax.get_title(): ax for ax in axes}
    assert "adaptive schedule p(λ)" in by_title
    for key, title, _log in P.CURVES:
        ax = by_title[title]
        (line,) = ax.get_lines()
        want = P.curve(_rows(), key)
        assert list(line.get_xdata()) == want[0], key
        assert list(line.get_ydata()) == pytest.approx(want[1]), key
        assert ax.get_xlabel() == "step"
    assert by_title["training loss (mean over the log interval)"].get_yscale() == "log"
    bars = by_title["adaptive schedule p(λ)"].patches
    assert [b.get_height() for b in bars] == [0.04, 0.06]


def test_plot_cli_with_run_and_missing_metrics(tmp_path, capsys):
    _write(tmp_path / "run", _rows())
    rc = main(["plot", "--out", str(tmp_path / "plots"), "--run", str(tmp_path / "run")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "\r" not in cap.err  # no progress bar off a terminal
    files = json.loads(cap.out)["files"]
    assert files[-1].endswith("run.png")
    rc = main(["plot", "--out", str(tmp_path / "plots"), "--run", str(tmp_path / "nowhere")])
    cap = capsys.readouterr()
    assert rc == 2 and "no metrics.jsonl" in cap.err and len(cap.err.strip().splitlines()) == 1
