"""vdmpp-eval checks before it works: --device, the metrics' inputs, --help, --version.

Every error path: exit 2, exactly one line on stderr, no traceback — and, for ``metrics``, no
image sampled (the sampler is replaced by one that fails the test if it is ever called).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch

from vdmpp.eval import cli
from vdmpp.eval.cli import main


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_sampling(monkeypatch):
    """Failure injection: any call of the sampler fails the test."""
    import vdmpp.eval.sampling as S

    def boom(*a, **k):
        raise AssertionError("sampled before the inputs were checked")

    monkeypatch.setattr(S, "generate", boom)
    monkeypatch.setattr(S, "run_shard", boom)


def _commands(export_dir, tmp_path, device: str) -> list[list[str]]:
    return [
        [
            "sample",
            str(export_dir),
            "--seeds",
            "0-3",
            "--out",
            str(tmp_path / "s"),
            "--device",
            device,
        ],
        ["metrics", str(export_dir), "--ref", "digits", "--num", "4", "--device", device],
        ["bpd", str(export_dir), "--data", "digits", "--device", device],
    ]


@pytest.mark.parametrize("device", ["gpu", "cuda0", "cuda:x", "CPU", ""])
def test_device_syntax_refused_up_front(device, export_dir, tmp_path, capsys, no_sampling):
    for args in _commands(export_dir, tmp_path, device):
        assert main(args) == 2
        line = _one_line(capsys.readouterr().err)
        assert "is not a device; use cpu, cuda, cuda:N, mps or auto" in line, line
    assert not (tmp_path / "s").exists()


def test_cuda_unavailable(export_dir, tmp_path, capsys, monkeypatch, no_sampling):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        for args in _commands(export_dir, tmp_path, device):
            assert main(args) == 2
            line = _one_line(capsys.readouterr().err)
            assert "no CUDA device is available" in line and "--device cpu" in line
    assert not (tmp_path / "s").exists()


def test_cuda_index_out_of_range(export_dir, tmp_path, capsys, monkeypatch, no_sampling):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli._device("cuda:1") == "cuda:1"
    assert main(_commands(export_dir, tmp_path, "cuda:2")[2]) == 2
    assert "has 2 CUDA device(s), cuda:0 to cuda:1" in _one_line(capsys.readouterr().err)


def test_mps_unavailable(monkeypatch) -> None:
    class NoMPS:
        @staticmethod
        def is_available() -> bool:
            return False

    monkeypatch.setattr(torch.backends, "mps", NoMPS)
    with pytest.raises(cli.EvalError, match="MPS backend is not available"):
        cli._device("mps")
    assert cli._device("cpu") == "cpu"
    assert cli._device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_metrics_checks_inception_weights_before_sampling(
    export_dir, tmp_path, capsys, monkeypatch, no_sampling
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.zeros(4, np.int64))
    assert (
        main(["metrics", str(export_dir), "--ref", str(ref), "--num", "4", "--device", "cpu"]) == 2
    )
    assert "Inception weights not found" in _one_line(capsys.readouterr().err)
    assert (
        main(
            [
                "metrics",
                str(export_dir),
                "--ref",
                str(ref),
                "--inception-weights",
                str(tmp_path / "nope.pth"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "nope.pth does not exist" in _one_line(capsys.readouterr().err)


@pytest.fixture
def fake_inception(tmp_path):
    """A file that passes the weights check (the right keys); never run through a network."""
    from vdmpp.eval.metrics import _INCEPTION_KEYS

    path = tmp_path / "inception.pth"
    torch.save({k: torch.zeros(1) for k in _INCEPTION_KEYS}, path)
    return path


def test_metrics_checks_reference_and_resolution_before_sampling(
    export_dir, tmp_path, capsys, fake_inception, no_sampling
) -> None:
    base = [
        "metrics",
        str(export_dir),
        "--num",
        "4",
        "--device",
        "cpu",
        "--inception-weights",
        str(fake_inception),
    ]
    assert main([*base, "--ref", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in _one_line(capsys.readouterr().err)
    ref = tmp_path / "ref16.npz"  # the model is 8×8×1
    np.savez(ref, images=np.zeros((4, 16, 16, 1), np.uint8), labels=np.zeros(4, np.int64))
    assert main([*base, "--ref", str(ref)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "16×16×1" in line and "8×8×1" in line and "--resolution 8" in line


def test_metrics_names_checked(export_dir, capsys, no_sampling) -> None:
    assert main(["metrics", str(export_dir), "--ref", "digits", "--metrics", "fid,fdi"]) == 2
    assert "subset of fid,isc,kid,prc" in _one_line(capsys.readouterr().err)


def test_metrics_progress_bar_and_no_progress(export_dir, capsys) -> None:
    args = [
        "metrics",
        str(export_dir),
        "--ref",
        "digits",
        "--num",
        "4",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err  # not a terminal: plain progress lines, no tqdm bar
    assert "[vdmpp-eval] metrics: sampling 4 images" in err and "\r" not in err
    assert main([*args, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_every_subcommand_has_no_progress_and_documented_defaults() -> None:
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"sample", "metrics", "bpd", "phema", "plot"}
    for name, sub in subs.choices.items():
        opts = {o for a in sub._actions for o in a.option_strings}
        assert "--no-progress" in opts, name
        for a in sub._actions:
            assert a.help, (name, a.dest)  # every option says what it does
        text = sub.format_help()
        assert "(default: " in text, name
    sample = subs.choices["sample"].format_help()
    for shown in ("(default: heun)", "(default: 18)", "(default: auto)", "(default: 500)"):
        assert shown in sample, shown


def test_version_lists_every_vdmpp_package_and_torch() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vdmpp.eval", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    for dist in (
        "vdmpp-schedules",
        "vdmpp-losses",
        "vdmpp-samplers",
        "vdmpp-models",
        "vdmpp-kernels",
        "vdmpp-train",
        "vdmpp-eval",
        "torch",
    ):
        assert dist in lines, r.stdout
    assert lines["torch"].startswith(torch.__version__.split("+")[0])


def test_plot_no_progress(tmp_path, capsys) -> None:
    assert main(["plot", "--out", str(tmp_path), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "schedules.png").is_file() and (tmp_path / "weightings.png").is_file()


# --- the one grid writer (vdmpp.train.grid), shared by training previews and `sample` -----------
def test_grid_columns_are_classes_and_upscaled() -> None:
    from vdmpp.train.grid import image_grid

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=37)
    images = (labels[:, None, None, None] * 20 + 5).astype(np.uint8) * np.ones(
        (1, 8, 8, 1), np.uint8
    )
    g = image_grid(images, labels=labels, num_classes=10)
    scale = 8  # an 8×8 digit becomes 64×64
    rows = int(np.bincount(labels, minlength=10).max())
    assert g.shape == ((rows * 9 + 1) * scale, (10 * 9 + 1) * scale, 1)
    for k in range(10):
        for r in range(int((labels == k).sum())):
            y, x = (1 + r * 9) * scale, (1 + k * 9) * scale
            assert (g[y : y + 8 * scale, x : x + 8 * scale] == k * 20 + 5).all(), (k, r)
    with pytest.raises(ValueError, match="class indices"):
        image_grid(images, labels=labels + 5, num_classes=10)


def test_sample_grid_has_classes_as_columns_and_a_caption(export_dir, tmp_path) -> None:
    from PIL import Image

    out = tmp_path / "s"
    assert (
        main(
            [
                "sample",
                str(export_dir),
                "--seeds",
                "0-19",
                "--steps",
                "2",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    with Image.open(out / "grid.png") as im:
        caption = im.text["Description"]
        width = im.width
    assert "heun 2 steps" in caption and "seeds 0-19" in caption and "columns = classes" in caption
    assert width == (10 * 9 + 1) * 8  # ten class columns of upscaled 8×8 digits
