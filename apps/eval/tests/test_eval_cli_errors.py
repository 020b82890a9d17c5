"""User errors of vdmpp-eval: one line on stderr, exit 2, no traceback; and a model.json that
asks for a huge model is refused before anything is allocated."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from vdmpp.eval.cli import main
from vdmpp.eval.model import EvalError, load_model
from vdmpp.eval.sampling import _chunk_done


def _one_line_exit_2(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("batch", ["-1", "0"])
def test_eval_sample_batch_must_be_positive(export_dir, tmp_path, capsys, batch) -> None:
    out = tmp_path / "s"
    err = _one_line_exit_2(
        [
            "sample",
            str(export_dir),
            "--seeds",
            "0-3",
            "--out",
            str(out),
            "--batch",
            batch,
            "--device",
            "cpu",
            "--no-progress",
        ],
        capsys,
    )
    assert "--batch must be >= 1" in err
    assert not (out / "chunks").exists()  # no empty chunks that would count as done


def test_eval_empty_chunk_is_not_done(tmp_path) -> None:
    p = tmp_path / "c.npz"
    np.savez(p, images=np.zeros((0, 8, 8, 1), np.uint8), seeds=np.arange(4))
    assert not _chunk_done(p, [0, 1, 2, 3])  # what --batch -1 used to leave behind


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("resolution", "8"),
        ("process", "xx"),
        ("sigma_data", -1.0),
        ("model", "tiny"),
        ("num_classes", 0),
        ("channels", 9),
        ("parameterization", None),
        ("data_range", [1, -1]),
        ("step", -3),
        ("logsnr_min", "inf"),
    ],
)
def test_eval_bad_model_json_fields(export_dir, tmp_path, capsys, key, value) -> None:
    d = tmp_path / "export"
    shutil.copytree(export_dir, d)
    meta = json.loads((d / "model.json").read_text())
    meta[key] = value
    (d / "model.json").write_text(json.dumps(meta))
    err = _one_line_exit_2(
        ["sample", str(d), "--seeds", "0", "--out", str(tmp_path / "s"), "--device", "cpu"], capsys
    )
    assert key in err


def test_eval_huge_model_json_refused_before_allocating(export_dir, tmp_path, monkeypatch):
    import vdmpp.models as models

    real = models.build
    devices = []

    def spy(*a, **k):
        devices.append(torch.empty(0).device.type)  # the default device at build time
        assert devices[-1] == "meta", "model built for real before the header check"
        return real(*a, **k)

    monkeypatch.setattr(models, "build", spy)
    d = tmp_path / "export"
    shutil.copytree(export_dir, d)
    meta = json.loads((d / "model.json").read_text())
    meta["model"]["overrides"].update(
        model_channels=4096, channel_mult=[1, 2, 4, 8], num_res_blocks=4
    )  # tens of GB of float32
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(EvalError, match="do not match the model"):
        load_model(d)
    assert devices == ["meta"]


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_eval_corrupt_png_in_data(export_dir, tmp_path, capsys) -> None:
    (tmp_path / "sh").mkdir()
    _tar(tmp_path / "sh" / "a.tar", {"k0.png": b"\x89PNG\r\n\x1a\nbroken", "k0.cls": b"1"})
    err = _one_line_exit_2(
        [
            "bpd",
            str(export_dir),
            "--data",
            str(tmp_path / "sh"),
            "--device",
            "cpu",
            "--no-progress",
        ],
        capsys,
    )
    assert "k0.png" in err and "not a readable image" in err


def test_eval_label_outside_the_models_classes(export_dir, tmp_path, capsys) -> None:
    f = tmp_path / "d.npz"
    np.savez(f, images=np.zeros((3, 8, 8, 1), np.uint8), labels=np.array([0, 12, 3]))
    err = _one_line_exit_2(
        ["bpd", str(export_dir), "--data", str(f), "--device", "cpu", "--no-progress"], capsys
    )
    assert "label 12" in err
