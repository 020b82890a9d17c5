"""Checkpoints of another format, pickles, missing files: refused with a clear message."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from vdmpp.eval.cli import main
from vdmpp.eval.model import EvalError, load_model


def test_pickle_checkpoint_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ("model.pt", "model.pkl", "ckpt.pth"):
        path = tmp_path / name
        with open(path, "wb") as f:
            pickle.dump({"w": Evil()}, f)
        with pytest.raises(EvalError, match="never pickles"):
            load_model(path)
    rc = main(["sample", str(tmp_path / "model.pt"), "--seeds", "0-1", "--out", str(tmp_path)])
    err = capsys.readouterr()
    assert rc == 2 and "refusing a .pt file" in err.err and "pwned" not in err.out


def test_training_checkpoint_refused(tmp_path):
    path = tmp_path / "ckpt-000000010.pt"
    torch.save({"format": "vdmpp-train-checkpoint", "model": {}}, path)
    with pytest.raises(EvalError, match="export"):
        load_model(path)


def test_other_format_refused(export_dir, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(export_dir, d)
    meta = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**meta, "format": "diffusers"}))
    with pytest.raises(EvalError, match="format is not 'vdmpp-model'"):
        load_model(d)
    (d / "model.json").unlink()
    with pytest.raises(EvalError, match=r"model\.json"):
        load_model(d / "ema.safetensors")
    (d / "ema.safetensors").write_bytes(b"\x00" * 64)
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(EvalError, match="safetensors"):
        load_model(d)


def test_missing_checkpoint(tmp_path, capsys):
    rc = main(["bpd", str(tmp_path / "nope"), "--data", "digits"])
    assert rc == 2 and "no such checkpoint" in capsys.readouterr().err


def test_sampling_args_checked_against_the_model(export_dir, tmp_path, capsys):
    rc = main(
        ["sample", str(export_dir), "--seeds", "0-1", "--out", str(tmp_path), "--class", "12"]
    )
    assert rc == 2 and "outside the model's classes" in capsys.readouterr().err
    rc = main(["sample", str(export_dir), "--seeds", "0-1", "--out", str(tmp_path), "--steps", "0"])
    assert rc == 2 and "--steps" in capsys.readouterr().err
