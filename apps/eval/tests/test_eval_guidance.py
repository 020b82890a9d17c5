"""Guidance in ``vdmpp-eval sample`` (issue 22): CFG only on a model trained with label dropout
(``--force-guidance`` otherwise), ``--guidance-interval LO HI``, ``--guide RUN_OR_EXPORT``
(autoguidance), each refusal one line with exit 2, and the flags reaching
``vdmpp.samplers.guided``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vdmpp.samplers as S
from vdmpp.eval.cli import main
from vdmpp.eval.model import denoiser_for, load_model


def _export(export_dir, directory, *, num_classes=10, seed=0, **fields):
    """A tiny random-weight export like conftest's, with other classes/seed/model.json fields."""
    from vdmpp.train.export import build_model, write_export

    meta = json.loads((export_dir / "model.json").read_text())
    for key in ("format", "version", "weights_sha256"):
        meta.pop(key, None)
    meta["model"]["overrides"]["num_classes"] = num_classes
    meta.update(num_classes=num_classes, **fields)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model({"format": "vdmpp-model", "version": 1, **meta})
    write_export(directory, model.state_dict(), meta)
    return directory


@pytest.fixture(scope="module")
def models(export_dir, tmp_path_factory):
    """The conftest export (no label_dropout in model.json) and its siblings."""
    root = tmp_path_factory.mktemp("guidance")
    return {
        "absent": export_dir,
        "zero": _export(export_dir, root / "zero" / "export", label_dropout=0.0),
        "cfg": _export(export_dir, root / "cfg" / "export", label_dropout=0.1),
        "guide": _export(export_dir, root / "guide" / "export", seed=1),
        "uncond": _export(export_dir, root / "uncond" / "export", num_classes=None),
        "uncond_guide": _export(export_dir, root / "ug" / "export", num_classes=None, seed=1),
    }


@pytest.fixture
def spy(monkeypatch):
    """Record every vdmpp.samplers.guided call, then guide for real."""
    calls: list[tuple[tuple, dict]] = []
    real = S.guided

    def guided(*a, **k):
        calls.append((a, k))
        return real(*a, **k)

    monkeypatch.setattr(S, "guided", guided)
    return calls


def _sample(model, out, *extra) -> list[str]:
    return [
        "sample",
        str(model),
        "--seeds",
        "0-3",
        "--steps",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        "--grid",
        "0",
        *extra,
    ]


def _refused(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("which", ["absent", "zero"])
def test_cfg_without_label_dropout_refused_naming_cause_and_fix(
    models, tmp_path, capsys, spy, which
):
    err = _refused(_sample(models[which], tmp_path / "s", "--guidance", "2"), capsys)
    assert "label_dropout = 0" in err and "--force-guidance" in err and "null-class" in err
    assert spy == [] and not (tmp_path / "s").exists()
    # metrics refuses it too, before anything is drawn
    err = _refused(
        [
            "metrics",
            str(models[which]),
            "--ref",
            "digits",
            "--num",
            "4",
            "--guidance",
            "2",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert "--force-guidance" in err and spy == []


def test_force_guidance_and_a_trained_null_class_reach_guided(models, tmp_path, capsys, spy):
    assert (
        main(_sample(models["absent"], tmp_path / "f", "--guidance", "2", "--force-guidance")) == 0
    )
    assert main(_sample(models["cfg"], tmp_path / "c", "--guidance", "1.5")) == 0
    (a1, k1), (a2, k2) = spy[0], spy[-1]
    assert a1[1] == 2.0 and a2[1] == 1.5 and k1 == k2 == {}  # CFG: no guide, no interval
    with np.load(tmp_path / "c" / "samples.npz") as z:
        assert z["images"].shape == (4, 8, 8, 1)
    spec = json.loads((tmp_path / "f" / "sample.json").read_text())["spec"]
    assert spec["guidance"] == 2.0 and "force_guidance" not in spec  # a check, not a setting


def test_unconditional_model_refuses_cfg_as_before(models, tmp_path, capsys):
    err = _refused(_sample(models["uncond"], tmp_path / "s", "--guidance", "2"), capsys)
    assert "--guidance needs a class-conditional model" in err


def test_guidance_interval_reaches_guided_and_is_recorded(models, tmp_path, capsys, spy):
    out = tmp_path / "s"
    assert (
        main(_sample(models["cfg"], out, "--guidance", "2", "--guidance-interval", "0.5", "inf"))
        == 0
    )
    assert spy[-1][1] == {"interval": (0.5, float("inf"))}
    assert json.loads((out / "sample.json").read_text())["spec"]["guidance_interval"] == [0.5, None]
    capsys.readouterr()
    err = _refused(
        _sample(models["cfg"], out, "--guidance", "2", "--guidance-interval", "0.5", "10"), capsys
    )
    assert "other settings" in err  # resume refuses a changed interval


@pytest.mark.parametrize(("lo", "hi"), [("5", "1"), ("-1", "3"), ("1", "1"), ("nan", "2")])
def test_bad_guidance_interval_refused(models, tmp_path, capsys, lo, hi):
    err = _refused(
        _sample(models["cfg"], tmp_path / "s", "--guidance", "2", "--guidance-interval", lo, hi),
        capsys,
    )
    assert "--guidance-interval" in err and "0 <= LO < HI" in err


@pytest.mark.parametrize("flag", [["--guidance-interval", "0.5", "5"], ["--guide", "X"]])
def test_guidance_flags_need_guidance(models, tmp_path, capsys, flag):
    err = _refused(_sample(models["cfg"], tmp_path / "s", *flag), capsys)
    assert f"{flag[0]} needs --guidance w" in err


def test_guide_is_loaded_and_passed_to_guided(models, tmp_path, capsys, spy):
    """Autoguidance needs no label dropout: the guide gets the same class labels."""
    out = tmp_path / "s"
    assert (
        main(_sample(models["absent"], out, "--guidance", "2", "--guide", str(models["guide"])))
        == 0
    )
    (args, kw) = spy[-1]
    assert args[1] == 2.0 and set(kw) == {"guide"}
    gm, gmeta = load_model(models["guide"])
    x, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 3.0)
    labels = torch.tensor([1, 7])
    with torch.no_grad():
        want = denoiser_for(gm, gmeta)(x, sigma, class_labels=labels)
        np.testing.assert_allclose(kw["guide"](x, sigma, class_labels=labels), want)
    rec = json.loads((out / "sample.json").read_text())
    assert rec["spec"]["guide"] == str(models["guide"].resolve()) and rec["guide_step"] == 0
    capsys.readouterr()
    err = _refused(
        _sample(models["absent"], out, "--guidance", "2", "--guide", str(models["cfg"])), capsys
    )
    assert "other settings" in err  # another guide: not the same samples


def test_unconditional_model_can_be_autoguided(models, tmp_path, spy):
    assert (
        main(
            _sample(
                models["uncond"],
                tmp_path / "s",
                "--guidance",
                "2",
                "--guide",
                str(models["uncond_guide"]),
            )
        )
        == 0
    )
    assert set(spy[-1][1]) == {"guide"}


@pytest.mark.parametrize("guide", ["uncond", "missing"])
def test_guide_of_another_shape_or_missing_refused(models, tmp_path, capsys, spy, guide):
    path = models.get(guide, tmp_path / "nope")
    err = _refused(
        _sample(models["absent"], tmp_path / "s", "--guidance", "2", "--guide", str(path)), capsys
    )
    assert err.startswith("vdmpp-eval sample: error: --guide")
    assert ("num_classes" in err) if guide == "uncond" else ("no such checkpoint" in err)
    assert spy == [] and not (tmp_path / "s" / "chunks").exists()
