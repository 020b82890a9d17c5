"""User errors of vdmpp-train: one line on stderr, exit 2, no traceback (each used to be a
traceback or, for non-finite numbers, a run that trained nothing)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from vdmpp.train import config as config_mod
from vdmpp.train.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _one_line_exit_2(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _sets(*s: str) -> list[str]:
    return [a for x in s for a in ("--set", x)]


@pytest.mark.parametrize(
    "bad",
    [
        "ema.halflife_images=inf",
        "optimizer.eps=inf",
        "objective.sigma_data=inf",
        "optimizer.warmup_images=nan",
        "optimizer.betas=[0.9, nan]",
        "sample.sigma_max=-inf",
    ],
)
def test_faults_non_finite_numbers_are_refused(bad, capsys) -> None:
    err = _one_line_exit_2(["digits", *_sets(bad), "--check"], capsys)
    assert bad.split("=")[0].split(".")[-1] in err and "finite" in err


def test_faults_non_utf8_config(tmp_path, capsys) -> None:
    f = tmp_path / "bad.toml"
    f.write_bytes(b'name = "caf\xe9"\nsteps = 10\n')  # Latin-1, not UTF-8
    assert "not UTF-8" in _one_line_exit_2([str(f)], capsys)


def test_faults_out_is_an_existing_file(small, tmp_path, capsys) -> None:
    f = tmp_path / "taken"
    f.write_text("not a directory")
    err = _one_line_exit_2(["digits", *_sets(*small, "steps=1", f"out={f / 'sub'}")], capsys)
    assert "is a file" in err


def test_faults_resume_with_another_model_config(small, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["digits", *_sets(*small, "steps=2", f"out={run}")]) == 0
    capsys.readouterr()
    other = [s for s in small if not s.startswith("model.overrides")]
    other.append(
        "model.overrides={model_channels=32, channel_mult=[1, 2], num_res_blocks=1, "
        "attention_resolutions=[], head_channels=16}"
    )
    err = _one_line_exit_2(["digits", *_sets(*other, "steps=4", f"out={run}"), "--resume"], capsys)
    assert "another model" in err and "model.overrides" in err


def test_faults_shards_from_a_broken_image(tmp_path, capsys) -> None:
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    err = _one_line_exit_2(["shards", str(tmp_path / "src"), str(tmp_path / "out")], capsys)
    assert "a.png" in err and "not a readable image" in err


def test_faults_shards_from_an_object_array_npz(tmp_path, capsys) -> None:
    f = tmp_path / "obj.npz"
    np.savez(f, images=np.array([{"x": 1}, None], dtype=object))  # needs pickle to load
    err = _one_line_exit_2(["shards", str(f), str(tmp_path / "out")], capsys)
    assert "obj.npz" in err and "pickled object arrays are refused" in err


def test_faults_config_toml_round_trips_strings_with_newlines_and_quotes() -> None:
    name = 'line 1\nline 2\t"quoted" \\ back\x7f\x01 é'
    cfg = config_mod.load("digits")
    cfg.name = name
    cfg.out = "runs/with\nnewline"
    back = tomllib.loads(config_mod.dumps(cfg))  # used to raise TOMLDecodeError
    assert back["name"] == name and back["out"] == "runs/with\nnewline"
    assert config_mod.from_dict(back).to_dict() == cfg.to_dict()


def test_faults_missing_shard_directory_says_how_to_make_one(small, tmp_path, capsys) -> None:
    """Not only ``--check``: the run itself names the exact ``vdmpp-train shards`` command."""
    src = tmp_path / "no-shards"
    err = _one_line_exit_2(
        ["digits", *_sets(*small, "steps=1", f"out={tmp_path / 'run'}", f"data.source={src}")],
        capsys,
    )
    assert f"vdmpp-train shards SRC {src} --resolution 8" in err, err
