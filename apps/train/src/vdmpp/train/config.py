"""Typed run configuration: TOML → dataclasses, ``--set a.b=value`` overrides, validation.

Every field below is a key of the TOML file (top-level fields at the top, the rest in a table
of the same name). Overrides are parsed as TOML literals (``--set optimizer.lr=2e-4``,
``--set data.augment_flip=true``, ``--set model.overrides.dropout=0.1``); a value that is not
a TOML literal is taken as a bare string (``--set out=runs/x``). Nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from vdmpp.schedules import PROCESSES

from .errors import ConfigError
from .objective import check_objective
from .toml_io import apply_override, build, config_diff, dumps, parse_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BatchConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "EvalConfig",
    "LogConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "SampleConfig",
    "apply_override",
    "builtin_configs",
    "config_diff",
    "dumps",
    "load",
    "parse_value",
    "resolve_path",
]

# Schedules, weightings and parameterizations come from the libraries' registries
# (vdmpp.train.objective.check_objective): no list of them is kept here.
PRECISIONS = ("fp32", "bf16")
TIME_SAMPLERS = ("uniform", "low_discrepancy")


@dataclass
class DataConfig:
    source: str = "digits"  # "digits", a directory of *.tar shards, or a brace pattern
    resolution: int = 16
    channels: int = 1
    num_classes: int | None = 10  # None: unconditional
    augment_flip: bool = False  # random horizontal flip
    workers: int = 0  # DataLoader workers per data stream
    shuffle_buffer: int = 1000
    # "replay": on resume, re-read the stream up to the saved position (exact; reads bytes again)
    # "reseed": start a fresh stream seeded with the resume step (cheap; for big datasets)
    # "auto": replay when deterministic = true, else reseed
    resume: str = "auto"


@dataclass
class ModelConfig:
    name: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    schedule: str = "cosine"
    schedule_args: dict[str, Any] = field(default_factory=dict)
    weighting: str = "sigmoid"
    weighting_args: dict[str, Any] = field(default_factory=dict)
    parameterization: str = "eps"
    process: str = "vp"
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    adaptive: bool = True  # VDM++ adaptive schedule (App. F/H); replaces `schedule` for training
    adaptive_bins: int = 100
    adaptive_decay: float = 0.999
    time_sampler: str = "low_discrepancy"
    sigma_data: float = 0.5
    uncertainty: bool = False  # EDM2 eq. 21: learned u(λ), loss·e^{−u} + u
    label_dropout: float = 0.0  # P(label → null class) per example: trains CFG's unconditional D


@dataclass
class OptimizerConfig:
    name: str = "adam"  # "adam" or "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_images: float = 0.0  # linear LR warm-up over this many training images
    grad_clip: float = 1.0  # global-norm clip; 0 disables


@dataclass
class EMAConfig:
    kind: str = "standard"  # "standard" (EDM: one EMA) or "power" (EDM2 post-hoc EMA profiles)
    halflife_images: float | None = None  # standard: half-life in images (takes precedence)
    decay: float = 0.9999  # standard: per-step decay when halflife_images is not set
    # power: σ_rel of the tracked power-function profiles (EDM2 eq. 123); the first is exported
    std: list[float] = field(default_factory=lambda: [0.050, 0.100])
    snapshot_every_images: float = 0.0  # power: RUN/phema/ snapshot interval; 0 = each checkpoint


@dataclass
class BatchConfig:
    global_size: int = 64  # images per optimizer step, all ranks together
    per_device: int = 0  # micro-batch per forward; 0 = global_size / world_size


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep: int = 3
    keep_best: bool = False  # [eval]: also checkpoint the best-scoring step, never pruned


@dataclass
class LogConfig:
    every: int = 50
    tensorboard: bool = False
    loss_bins: int = 10  # per-λ-bin loss in the metrics
    progress: bool = True


@dataclass
class SampleConfig:
    every: int = 0  # 0 disables preview grids
    count: int = 64
    steps: int = 32  # steps on EDM's ρ-grid
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sampler: str = "heun"  # any vdmpp.samplers.SAMPLERS name, at its default options


@dataclass
class EvalConfig:
    every: int = 0  # evaluate the EMA model every N steps (VDM++ App. H); 0 = off
    count: int = 500  # samples per evaluation, seeds 0..count-1, shared over the ranks
    sampler: str = "heun"  # any vdmpp.samplers.SAMPLERS name
    steps: int = 18  # EDM ρ-grid steps
    metric: str = "digits"  # "digits" (FD of the digits classifier) or "fid" (Inception)
    fid_weights: str = ""  # metric = "fid": a local Inception weights file (offline)
    fid_reference: str = ""  # metric = "fid": reference images (npz, shards or folder)
    bpd: bool = False  # also VDM's bound (bits/dim) on held-out data
    bpd_data: str = "digits"  # held-out images for the bound ("digits" = its test split)
    bpd_limit: int = 256  # images of bpd_data used
    batch: int = 128


@dataclass
class Config:
    name: str = "run"
    out: str = "runs/run"
    seed: int = 0
    steps: int = 1000
    precision: str = "fp32"
    deterministic: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda"
    compile: bool = False
    nan_patience: int = 20  # stop (with a checkpoint) after this many non-finite steps in a row
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------------------------------
    def validate(self) -> Config:
        """Raise :class:`ConfigError` naming the first bad key; return self when all is well.

        The one check of a run (CLI load, :func:`~vdmpp.train.trainer.train` and ``--check``
        all call it): a config already validated in this exact state returns at once.
        """
        text = dumps(self)
        if self.__dict__.get("_validated") == text:
            return self
        _check_finite(self, "")  # inf/nan pass `> 0` checks and then train nothing
        _check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _check(self.nan_patience >= 1, "nan_patience", self.nan_patience, "must be >= 1")
        d = self.data
        _check(d.resolution >= 1, "data.resolution", d.resolution, "must be >= 1")
        _check(d.channels in (1, 3), "data.channels", d.channels, "must be 1 or 3")
        _check(
            d.num_classes is None or d.num_classes >= 1,
            "data.num_classes",
            d.num_classes,
            "must be >= 1 (omit it for unconditional training)",
        )
        _check(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
        _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 1")
        _choice("data.resume", d.resume, ("auto", "replay", "reseed"))
        _check(bool(d.source), "data.source", d.source, "must name 'digits' or shards")
        if d.source == "digits":  # checked here, before any shard is written
            _check(
                d.channels == 1 and d.num_classes in (10, None) and d.resolution >= 8,
                "data.source",
                d.source,
                f"has 1 channel, 10 classes and 8×8 images (data.channels = {d.channels}, "
                f"num_classes = {d.num_classes}, resolution = {d.resolution}); set "
                "data.channels = 1, data.num_classes = 10 (or none) and data.resolution >= 8",
            )
        o = self.objective
        _choice("objective.process", o.process, PROCESSES)
        _choice("objective.time_sampler", o.time_sampler, TIME_SAMPLERS)
        _check(
            math.isfinite(o.logsnr_min)
            and math.isfinite(o.logsnr_max)
            and o.logsnr_min < o.logsnr_max,
            "objective.logsnr_min/logsnr_max",
            [o.logsnr_min, o.logsnr_max],
            "need finite logsnr_min < logsnr_max",
        )
        _check(o.adaptive_bins >= 1, "objective.adaptive_bins", o.adaptive_bins, "must be >= 1")
        _check(0 < o.adaptive_decay < 1, "objective.adaptive_decay", o.adaptive_decay, "in (0, 1)")
        _check(o.sigma_data > 0, "objective.sigma_data", o.sigma_data, "must be > 0")
        _check(0 <= o.label_dropout < 1, "objective.label_dropout", o.label_dropout, "in [0, 1)")
        check_objective(self)  # names from the libraries' registries, built once
        p = self.optimizer
        _choice("optimizer.name", p.name, ("adam", "adamw"))
        _check(p.lr > 0 and math.isfinite(p.lr), "optimizer.lr", p.lr, "must be > 0")
        _check(
            len(p.betas) == 2 and all(0 <= b < 1 for b in p.betas),
            "optimizer.betas",
            p.betas,
            "must be two numbers in [0, 1)",
        )
        _check(p.eps > 0, "optimizer.eps", p.eps, "must be > 0")
        _check(p.weight_decay >= 0, "optimizer.weight_decay", p.weight_decay, "must be >= 0")
        _check(p.warmup_images >= 0, "optimizer.warmup_images", p.warmup_images, "must be >= 0")
        _check(p.grad_clip >= 0, "optimizer.grad_clip", p.grad_clip, "must be >= 0 (0: off)")
        e = self.ema
        _check(
            e.halflife_images is None or e.halflife_images > 0,
            "ema.halflife_images",
            e.halflife_images,
            "must be > 0",
        )
        _check(0 <= e.decay < 1, "ema.decay", e.decay, "must lie in [0, 1)")
        _choice("ema.kind", e.kind, ("standard", "power"))
        if e.kind == "power":
            from .phema import MAX_STD

            _check(
                len(e.std) >= 1
                and len(set(e.std)) == len(e.std)
                and all(0 < s <= MAX_STD for s in e.std),
                "ema.std",
                e.std,
                f"must list distinct σ_rel in (0, {MAX_STD:.4f}] (EDM2 eq. 123)",
            )
        _check(
            e.snapshot_every_images >= 0,
            "ema.snapshot_every_images",
            e.snapshot_every_images,
            "must be >= 0 (0: with every checkpoint)",
        )
        b = self.batch
        _check(b.global_size >= 1, "batch.global_size", b.global_size, "must be >= 1")
        _check(b.per_device >= 0, "batch.per_device", b.per_device, "must be >= 0 (0: auto)")
        _check(
            b.per_device == 0 or b.global_size % b.per_device == 0,
            "batch.per_device",
            b.per_device,
            f"must divide batch.global_size = {b.global_size}",
        )
        c = self.checkpoint
        _check(c.every >= 1, "checkpoint.every", c.every, "must be >= 1")
        _check(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1")
        _check(self.log.every >= 1, "log.every", self.log.every, "must be >= 1")
        _check(self.log.loss_bins >= 1, "log.loss_bins", self.log.loss_bins, "must be >= 1")
        s = self.sample
        _check(s.every >= 0, "sample.every", s.every, "must be >= 0 (0: off)")
        _check(s.count >= 1 and s.steps >= 1, "sample.count/steps", [s.count, s.steps], ">= 1")
        _sampler("sample.sampler", s.sampler)
        v = self.eval
        _check(v.every >= 0, "eval.every", v.every, "must be >= 0 (0: off)")
        _check(
            v.count >= 2 and v.steps >= 1 and v.batch >= 1 and v.bpd_limit >= 1,
            "eval.count/steps/batch/bpd_limit",
            [v.count, v.steps, v.batch, v.bpd_limit],
            "need count >= 2 and the rest >= 1",
        )
        _sampler("eval.sampler", v.sampler)
        _choice("eval.metric", v.metric, ("digits", "fid"))
        self.__dict__["_validated"] = text
        return self

    def micro_batches(self, world_size: int) -> tuple[int, int]:
        """(per-device micro-batch, accumulation steps) for ``world_size`` ranks."""
        g, b = self.batch.global_size, self.batch.per_device
        if b == 0:
            if g % world_size:
                raise ConfigError(
                    f"batch.global_size = {g} is not divisible by the world size {world_size}"
                )
            b = g // world_size
        if g % (b * world_size):
            raise ConfigError(
                f"batch.global_size = {g} must be a multiple of batch.per_device ({b}) × "
                f"world size ({world_size})"
            )
        return b, g // (b * world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key} = {value!r} {why}")


def _check_finite(node: Any, key: str) -> None:
    """Every float of the config (nested tables and arrays too) must be finite."""
    if dataclasses.is_dataclass(node):
        for f in fields(node):
            sub = getattr(node, f.name)
            dot = "." if dataclasses.is_dataclass(sub) else ""
            _check_finite(sub, f"{key}{f.name}{dot}")
        return
    if isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"config: {key} = {node!r} must be a finite number")
    if isinstance(node, list | tuple):
        for i, x in enumerate(node):
            _check_finite(x, f"{key}[{i}]")
    elif isinstance(node, dict):
        for k, x in node.items():
            _check_finite(x, f"{key}.{k}")


def _sampler(key: str, name: str) -> None:
    from vdmpp.samplers import SAMPLERS

    _choice(key, name, tuple(SAMPLERS))


def _choice(key: str, value: Any, options: tuple[Any, ...]) -> None:
    if value not in options:
        raise ConfigError(f"config: {key} = {value!r} is not one of {', '.join(map(str, options))}")


def builtin_configs() -> dict[str, Path]:
    """The configs shipped in the wheel, by stem (``digits``, ``cifar10``, ...)."""
    root = resources.files("vdmpp.train") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def resolve_path(spec: str | Path) -> Path:
    """A config file path, or the name of a shipped config."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = builtin_configs()
    if str(spec) in shipped:
        return shipped[str(spec)]
    raise ConfigError(
        f"no config file {str(spec)!r}; shipped configs: {', '.join(sorted(shipped))}"
    )


def from_dict(raw: dict[str, Any]) -> Config:
    """A :class:`Config` from a raw TOML dict (types coerced, unknown keys refused)."""
    return build(Config, raw, "")


def load(spec: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (path or shipped name), apply ``--set`` overrides, validate."""
    path = resolve_path(spec)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (TOML files are UTF-8): {e.reason} at byte {e.start}"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    return from_dict(raw).validate()
