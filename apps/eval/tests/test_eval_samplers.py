"""``vdmpp-eval sample --sampler NAME`` takes every sampler of ``vdmpp.samplers.SAMPLERS``
(issue 23): ``--help`` lists them, per-sampler options reach the function, an option a sampler
does not take is refused with one line, and the options are part of ``sample.json``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import vdmpp.samplers as S
from vdmpp.eval import cli
from vdmpp.eval import spec as spec_module
from vdmpp.eval.cli import main
from vdmpp.eval.model import load_model
from vdmpp.eval.sampling import generate
from vdmpp.eval.spec import SAMPLERS, SampleSpec, option_flags


def _sample(model, out, *extra) -> list[str]:
    return [
        "sample",
        str(model),
        "--seeds",
        "0-3",
        "--steps",
        "3",
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


def test_every_registered_sampler_is_offered_and_listed_in_help():
    assert set(S.SAMPLERS) <= set(SAMPLERS) and "edm" in SAMPLERS  # 0.2's name stays
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["sample"]
    text = sub.format_help()
    for name in S.SAMPLERS:
        assert f"  {name} " in text, name
    for key in option_flags():
        assert "--" + key.replace("_", "-") in text, key


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_every_sampler_draws_images_with_the_nfe_it_declares(export_dir, name):
    model, meta = load_model(export_dir)
    images, _, nfe = generate(model, meta, [0, 1], SampleSpec(sampler=name, steps=3))
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8
    row = S.SAMPLERS[name]
    if row.nfe is not None:
        assert nfe == row.nfe(3), (name, nfe)
    else:
        assert nfe > 0


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"])
def test_stochastic_samplers_keep_image_k_a_function_of_seed_k(export_dir, name):
    model, meta = load_model(export_dir)
    spec = SampleSpec(sampler=name, steps=3)
    a, _, _ = generate(model, meta, [0, 1, 2, 3, 4, 5], spec, batch_size=6)
    b, _, _ = generate(model, meta, [3, 4], spec, batch_size=1)
    np.testing.assert_array_equal(a[3:5], b)


def _value(key: str) -> list[str]:
    flag = option_flags()[key]
    if flag.type is bool:
        return []
    return [str(flag.choices[0]) if flag.choices else "1"]


@pytest.mark.parametrize("key", list(option_flags()))
def test_an_option_the_sampler_does_not_take_is_refused(export_dir, tmp_path, capsys, key):
    other = next(n for n in S.SAMPLERS if key not in S.SAMPLERS[n].options)
    flag = "--" + key.replace("_", "-")
    err = _refused(
        _sample(export_dir, tmp_path / "s", "--sampler", other, flag, *_value(key)), capsys
    )
    assert f"{flag}: sampler {other} does not take it" in err
    assert not (tmp_path / "s").exists()


def test_refusals_at_default_values_and_outside_choices(export_dir, tmp_path, capsys):
    out = tmp_path / "s"
    err = _refused(_sample(export_dir, out, "--sampler", "heun", "--eta", "0"), capsys)
    assert "--eta: sampler heun does not take it (its options: none)" in err
    err = _refused(_sample(export_dir, out, "--sampler", "ddim", "--churn", "0"), capsys)
    assert "--churn: sampler ddim does not take it (its options: --eta)" in err
    err = _refused(_sample(export_dir, out, "--sampler", "unipc", "--order", "5"), capsys)
    assert "--sampler unipc" in err and "'order'" in err and "1, 2, 3" in err
    err = _refused(_sample(export_dir, out, "--sampler", "dpmpp_sde", "--r", "inf"), capsys)
    assert "--r must be a finite number" in err
    assert not out.exists()


def test_options_reach_the_sampler_and_are_recorded(export_dir, tmp_path, capsys, monkeypatch):
    calls: list[dict] = []
    real = spec_module.sampler_row

    def row(name):
        r = real(name)

        def fn(*a, **k):
            calls.append(k)
            return r.fn(*a, **k)

        return dataclasses.replace(r, fn=fn)

    monkeypatch.setattr(spec_module, "sampler_row", row)
    out = tmp_path / "s"
    argv = _sample(
        export_dir, out, "--sampler", "dpmpp_2m_sde", "--eta", "0.5", "--solver-type", "heun"
    )
    assert main(argv) == 0
    assert calls and all(k["eta"] == 0.5 and k["solver_type"] == "heun" for k in calls)
    assert "s_noise" not in calls[0]  # left out: the sampler's default
    spec = json.loads((out / "sample.json").read_text())["spec"]
    assert spec["sampler"] == "dpmpp_2m_sde" and spec["eta"] == 0.5
    assert spec["options"] == {"solver_type": "heun"}
    assert main(argv) == 0  # the same settings resume
    capsys.readouterr()
    err = _refused([*argv[:-1], "midpoint"], capsys)
    assert "other settings" in err
    # and the defaults are the sampler's: euler_ancestral without --eta gets eta = 1
    calls.clear()
    assert main(_sample(export_dir, tmp_path / "a", "--sampler", "euler_ancestral")) == 0
    assert calls and all("eta" not in k for k in calls)


def test_python_spec_options(export_dir):
    """SampleSpec: 0.2's fields keep working; other options go in ``options``."""
    assert SampleSpec(sampler="heun", churn=0.0).check()  # at its default: unset
    assert SampleSpec(sampler="edm", churn=10.0).sampler_options() == {"churn": 10.0}
    spec = SampleSpec(sampler="lms", options={"order": 3})
    assert spec.check().sampler_options() == {"order": 3}
    with pytest.raises(spec_module.EvalError, match="--churn: sampler heun does not take it"):
        SampleSpec(sampler="heun", churn=1.0).check()
    with pytest.raises(spec_module.EvalError, match="--eta: sampler heun"):
        SampleSpec.from_options({"eta": 0.0}, sampler="heun").check()
