"""``SAMPLERS`` and ``check_options``: every name resolves, options match the signatures."""

from __future__ import annotations

import inspect

import pytest

import vdmpp.samplers as S
from vdmpp.samplers import SAMPLERS, check_options
from vdmpp.samplers.registry import COMMON

DESIGN_NAMES = {
    "euler", "heun", "edm_stochastic", "ddpm", "ddim", "euler_ancestral", "dpm_2",
    "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde",
    "dpmpp_3m_sde", "unipc", "dpm_adaptive",
}  # fmt: skip


def test_every_sampler_of_the_design_is_registered_and_exported():
    assert set(SAMPLERS) == DESIGN_NAMES
    for name, spec in SAMPLERS.items():
        assert spec.name == name and getattr(S, name) is spec.fn
        assert name in S.__all__


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_options_are_the_functions_keyword_arguments(name):
    spec = SAMPLERS[name]
    params = inspect.signature(spec.fn).parameters
    own = {k: p for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in COMMON}
    assert set(own) == set(spec.options), name
    for key, opt in spec.options.items():
        assert own[key].default == opt.default, (name, key)
        assert opt.help and opt.type in (float, int, str, bool)
        if opt.choices is not None:
            assert opt.default in opt.choices
    assert set(COMMON) <= set(params)  # the common signature
    assert list(params)[:3] == ["denoiser", "noise", "sigmas"]


def test_check_options_accepts_and_coerces():
    assert check_options("dpmpp_2m_sde", {"eta": 1, "solver_type": "heun"}) == {
        "eta": 1.0,
        "solver_type": "heun",
    }
    assert isinstance(check_options("ddim", {"eta": 1})["eta"], float)
    assert check_options("unipc", {"order": 3}) == {"order": 3}
    assert check_options("heun", {"use_kernels": None}) == {"use_kernels": None}
    assert check_options("dpmpp_2m") == {} and check_options("dpmpp_2m", {}) == {}


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("dpmpp_2m", {"eta": 0.5}, "sampler 'dpmpp_2m' does not take option 'eta'"),
        ("heun", {"order": 2}, "sampler 'heun' does not take option 'order'"),
        ("unipc", {"rtol": 0.1}, "sampler 'unipc' does not take option 'rtol'"),
        ("nope", {}, "unknown sampler 'nope'"),
        ("unipc", {"order": 4}, "option 'order' must be one of 1, 2, 3"),
        ("unipc", {"order": 2.0}, "option 'order' must be int"),
        ("ddim", {"eta": "0.5"}, "option 'eta' must be float"),
        ("ddim", {"eta": True}, "option 'eta' must be float"),
        ("dpmpp_2m_sde", {"solver_type": "rk4"}, "must be one of midpoint, heun"),
    ],
)
def test_check_options_refuses_with_one_line(name, opts, match):
    with pytest.raises(ValueError, match=match) as e:
        check_options(name, opts)
    assert "\n" not in str(e.value)


def test_nfe_formula_is_declared_for_every_grid_sampler():
    for spec in SAMPLERS.values():
        assert (spec.nfe is None) == (not spec.grid)
        if spec.grid:
            assert spec.nfe(18) in (18, 35)
