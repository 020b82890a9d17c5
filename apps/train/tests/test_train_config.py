"""Config parsing, --set overrides, validation before training, shipped paper configs."""

from __future__ import annotations

import pytest
import torch

from vdmpp.train import config as C
from vdmpp.train.objective import Objective, build_net

SHIPPED = ["digits", "cifar10", "imagenet64", "imagenet128-uvit"]


@pytest.mark.parametrize("name", SHIPPED)
def test_train_shipped_config_parses_and_builds(name: str) -> None:
    cfg = C.load(name)
    assert C.resolve_path(name).name == f"{name}.toml"
    with torch.device("meta"):  # the ImageNet models are 150–300M parameters
        model = build_net(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    obj = Objective(cfg)  # schedule + weighting + loss build on CPU
    assert float(obj.schedule.logsnr_min) == cfg.objective.logsnr_min
    # the resolved config written to config.toml reads back to the same config
    assert C.from_dict(C.tomllib.loads(C.dumps(cfg))) == cfg


def test_train_paper_settings_imagenet64() -> None:
    """VDM++ App. H, ImageNet 64×64."""
    cfg = C.load("imagenet64")
    assert cfg.model.name == "adm64" and cfg.batch.global_size == 4096
    assert cfg.batch.per_device == 32 and cfg.steps == 700_000
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.grad_clip == 1.0
    assert cfg.ema.halflife_images == 50e6 and cfg.optimizer.warmup_images == 10e6
    o = cfg.objective
    assert (o.logsnr_min, o.logsnr_max) == (-20.0, 20.0)
    assert o.adaptive and o.adaptive_bins == 100 and o.adaptive_decay == 0.999
    assert o.time_sampler == "low_discrepancy" and not cfg.data.augment_flip


def test_train_set_overrides_are_toml_literals_never_eval() -> None:
    cfg = C.load(
        "digits",
        [
            "steps=7",
            "optimizer.lr=3e-4",
            "optimizer.betas=[0.9, 0.99]",
            "data.augment_flip=true",
            "model.overrides.dropout=0.1",
            "name=__import__('os').getcwd()",  # not TOML: kept as a plain string
            "out=runs/x y",
            "data.num_classes=none",
        ],
    )
    assert cfg.steps == 7 and cfg.optimizer.lr == 3e-4 and cfg.optimizer.betas == [0.9, 0.99]
    assert cfg.data.augment_flip is True and cfg.model.overrides["dropout"] == 0.1
    assert cfg.name == "__import__('os').getcwd()" and cfg.out == "runs/x y"
    assert cfg.data.num_classes is None


@pytest.mark.parametrize(
    ("assignment", "needle"),
    [
        ("steps=0", "steps"),
        ("stepz=10", "unknown key 'stepz'"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.lr=fast", "optimizer.lr must be a number"),
        ("objective.parameterization=score2", "objective.parameterization"),
        ("objective.logsnr_min=30", "logsnr_min"),
        ("batch.per_device=5", "batch.per_device"),
        ("data.channels=2", "data.channels"),
        ("precision=fp8", "precision"),
        ("data.augment_flip=1", "true or false"),
        ("optimizer.nope=1", "unknown key 'optimizer.nope'"),
        ("steps", "key=value"),
    ],
)
def test_train_bad_config_value_is_a_clear_error(assignment: str, needle: str) -> None:
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        C.load("digits", [assignment])


def test_train_model_override_contradicting_data_is_refused() -> None:
    cfg = C.load("digits", ["model.overrides.resolution=32"])
    with pytest.raises(C.ConfigError, match="contradicts data"):
        build_net(cfg)


def test_train_unknown_weighting_and_model_are_config_errors() -> None:
    with pytest.raises(C.ConfigError, match="weighting"):
        Objective(C.load("digits", ["objective.weighting=nonsense"]))
    with pytest.raises(C.ConfigError, match="model"):
        build_net(C.load("digits", ["model.name=nonsense"]))


def test_train_cli_bad_config_exits_before_training(cli, tmp_path) -> None:
    out = tmp_path / "run"
    r = cli(["digits", "--set", f"out={out}", "--set", "optimizer.lr=0"])
    assert r.returncode == 2, r.stderr
    assert "optimizer.lr" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = cli(["no-such-config.toml"])
    assert r.returncode == 2 and "shipped configs" in r.stderr
