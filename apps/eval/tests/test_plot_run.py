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


def _eval_rows() -> list[dict]:
    """Training rows plus in-training evaluation rows, as vdmpp-train's [eval] writes them."""
    rows = _rows()
    for step, fd, bpd in ((10, 9.0, 8.1), (30, 5.0, 7.6)):
        rows.append({"step": step, "eval_metric": "digits_fd", "eval_value": fd, "eval_bpd": bpd})
    return rows


def _figure(run, out, monkeypatch):
    figs = []
    real = P._save
    monkeypatch.setattr(P, "_save", lambda fig, path: (figs.append(fig), real(fig, path))[1])
    path, titles = P.draw_run(run, out)
    assert path.is_file()
    return {ax.get_title(): ax for ax in figs[0].axes if ax.get_title()}, titles


def test_in_training_evaluation_panels(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _write(run, _eval_rows())
    (run / "best.json").write_text(json.dumps({"step": 30, "metric": "digits_fd", "value": 5.0}))
    by_title, titles = _figure(run, tmp_path / "run.png", monkeypatch)
    ev = by_title["in-training evaluation: digits_fd"]
    (line,) = [ln for ln in ev.get_lines() if ln.get_marker() == "o"]
    assert list(line.get_xdata()) == [10, 30] and list(line.get_ydata()) == [9.0, 5.0]
    assert any(ln.get_xdata()[0] == 30 for ln in ev.get_lines() if ln is not line)  # best step
    (b,) = by_title["in-training bits/dim (VDM bound, held-out)"].get_lines()
    assert list(b.get_ydata()) == [8.1, 7.6]
    assert "training loss (mean over the log interval)" in titles
    assert P.UNCERTAINTY_TITLE not in titles


def test_uncertainty_panel_beside_density_and_bin_loss(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _write(run, _rows())
    (run / "export").mkdir()
    unc = {"logsnr": [-10.0, 0.0, 10.0], "u": [0.0, math.log(2.0), math.log(0.5)]}
    (run / "export" / "model.json").write_text(json.dumps({"format": "x", "uncertainty": unc}))
    by_title, titles = _figure(run, tmp_path / "run.png", monkeypatch)
    assert titles[:3] == ["adaptive schedule p(λ)", "loss per λ bin (step 30)", P.UNCERTAINTY_TITLE]
    (eu,) = by_title[P.UNCERTAINTY_TITLE].get_lines()
    assert list(eu.get_ydata()) == pytest.approx([1.0, 2.0, 0.5])
    assert not any(t.startswith("in-training") for t in titles)
    rc = main(["plot", "--out", str(tmp_path / "plots"), "--run", str(run), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert P.UNCERTAINTY_TITLE in json.loads(cap.out)["run_panels"]
