"""``vdmpp-eval``: sample | metrics | bpd | phema | plot.

    vdmpp-eval sample RUN --sampler heun --steps 18 --seeds 0-49999 --out OUT
    torchrun --nproc-per-node 8 -m vdmpp.eval sample RUN --seeds 0-49999 --out OUT
    vdmpp-eval metrics OUT --ref SHARDS [--inception-weights PATH]
    vdmpp-eval metrics RUN --ref digits --num 1000        # samples drawn in memory
    vdmpp-eval bpd RUN --data digits --draws 4 [--method vlb|ode|both]
    vdmpp-eval phema RUN --std 0.08 --out EXPORT      # or --sweep --out EXPORTS
    vdmpp-eval plot --out plots/ [--run RUN]

User errors (bad paths, formats, arguments) print one line to stderr and exit with status 2.
So does a training run that is not ``done`` (its ``status.json`` says preempted, running,
stopped-nonfinite or failed): ``sample``, ``metrics`` and ``bpd`` refuse to report results of
it unless ``--allow-partial`` is given. Progress bars only on a terminal; otherwise (a SLURM or
CI log) plain timestamped lines from the ``vdmpp.eval`` logger on stderr. The result is one
JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import fields
from typing import Any

from . import commands
from .model import EvalError
from .runtime import device_name
from .spec import SAMPLERS, SampleSpec, option_flags, sampler_row

__all__ = ["EvalError", "build_parser", "main"]

_device = device_name  # the --device check (vdmpp.eval.runtime)
_PACKAGES = (
    "vdmpp-schedules",
    "vdmpp-losses",
    "vdmpp-samplers",
    "vdmpp-models",
    "vdmpp-kernels",
    "vdmpp-train",
    "vdmpp-eval",
    "torch",
    "torch-fidelity",
)


def _versions() -> str:
    """One line per vdmpp distribution and torch: ``name version`` (or ``not installed``)."""
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for dist in _PACKAGES:
        try:
            lines.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            lines.append(f"{dist} not installed")
    return "\n".join(lines)


class _Version(argparse.Action):
    """``--version``: one line per package (argparse's own action would re-wrap them)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(_versions())
        parser.exit()


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--sampler",
        default="heun",
        choices=SAMPLERS,
        metavar="NAME",
        help="one of vdmpp.samplers.SAMPLERS (listed below; edm = edm_stochastic)",
    )
    g.add_argument(
        "--steps",
        type=int,
        default=18,
        help="grid steps N (Heun: 2N-1 NFE; dpm_adaptive chooses its own steps)",
    )
    o = p.add_argument_group(
        "sampler options",
        "Each is taken only by the samplers named in [...] (with their defaults);\n"
        "given with another sampler it is refused. Left out: the sampler's default.",
    )
    for key, flag in option_flags().items():
        where = ", ".join(f"{name} {_shown(d)}" for name, d in flag.defaults.items())
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{flag.help} [{where}]"}
        if flag.type is bool:
            o.add_argument(_flag(key), action="store_true", **kw)
        else:  # numbers: each sampler's own range is checked by vdmpp.samplers.check_options
            choices = flag.choices if flag.type is str else None
            o.add_argument(_flag(key), type=flag.type, choices=choices, **kw)
    g.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="guidance strength w (1: off): CFG through the null class, or autoguidance with "
        "--guide; CFG needs a model trained with label dropout (model.json label_dropout > 0)",
    )
    g.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="guide only for LO < σ <= HI (Kynkäänniemi et al. 2024; HI may be inf); one "
        "evaluation of the model elsewhere",
    )
    g.add_argument(
        "--guide",
        default=None,
        metavar="RUN_OR_EXPORT",
        help="autoguidance (Karras et al. 2024): guide with this model (same resolution, "
        "channels and classes, e.g. an earlier or smaller one) instead of the null class",
    )
    g.add_argument(
        "--force-guidance",
        action="store_true",
        help="allow CFG on a model trained without label dropout (its null class is untrained)",
    )
    g.add_argument("--sigma-min", type=float, default=0.002, help="smallest σ of the grid")
    g.add_argument("--sigma-max", type=float, default=80.0, help="largest σ of the grid")
    g.add_argument("--rho", type=float, default=7.0, help="ρ of EDM's σ grid (EDM eq. 5)")
    g.add_argument(
        "--class",
        dest="class_label",
        type=int,
        default=None,
        help="one class for every image (default: seed %% num_classes)",
    )
    g.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast the network"
    )
    g.add_argument("--batch", type=int, default=64, help="images per sampler call")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (terminal) or progress lines (log); warnings only",
    )


def _add_allow_partial(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="use a training run whose status.json is not 'done' (preempted, "
        "running, stopped-nonfinite, failed); its numbers are not final",
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(default: Any) -> str:
    return "auto" if default is None else str(default)


def _samplers_epilog() -> str:
    """``--help``: every sampler, what it is and the options it takes."""
    lines = ["samplers (--sampler NAME; vdmpp.samplers.SAMPLERS):"]
    for name in SAMPLERS:
        row = sampler_row(name)
        opts = [_flag(k) for k in row.options if k in option_flags()]
        alias = f" (= {row.name})" if row.name != name else ""
        lines.append(f"  {name:<19}{row.help}{alias}" + (f"; {' '.join(opts)}" if opts else ""))
    return "\n".join(lines)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the epilog's sampler list kept as written."""


def _spec(a: argparse.Namespace) -> SampleSpec:
    """The parsed sampling flags as a SampleSpec (the options given on the command line only:
    their flags default to argparse.SUPPRESS)."""
    flags = option_flags()
    names = [f.name for f in fields(SampleSpec) if f.name not in flags]
    kw = {k: getattr(a, k) for k in names if hasattr(a, k)}
    if kw.get("guidance_interval") is not None:
        kw["guidance_interval"] = tuple(kw["guidance_interval"])
    given = {k: getattr(a, k) for k in flags if hasattr(a, k)}
    return SampleSpec.from_options(given, **kw)


def _common(a: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"progress": not a.no_progress}
    for name in ("device", "allow_partial", "batch"):
        if hasattr(a, name):
            kw[name] = getattr(a, name)
    return kw


def _run(a: argparse.Namespace) -> dict[str, Any]:
    """The command's function with the parsed arguments (vdmpp.eval.commands)."""
    kw = _common(a)
    if a.command == "sample":
        return commands.sample(
            a.checkpoint, seeds=a.seeds, out=a.out, spec=_spec(a), chunk=a.chunk, grid=a.grid, **kw
        )
    if a.command == "metrics":
        return commands.metrics(
            a.source,
            ref=a.ref,
            inception_weights=a.inception_weights,
            metrics=a.metrics,
            kid_subsets=a.kid_subsets,
            num=a.num,
            seeds=a.seeds,
            spec=_spec(a),
            **kw,
        )
    if a.command == "bpd":
        return commands.bpd(
            a.checkpoint,
            data=a.data,
            method=a.method,
            draws=a.draws,
            discrete_steps=a.discrete_steps,
            limit=a.limit,
            seed=a.seed,
            rtol=a.rtol,
            atol=a.atol,
            divergence=a.divergence,
            sigma_min=a.sigma_min,
            sigma_max=a.sigma_max,
            ode_batch=a.ode_batch,
            out=a.out,
            **kw,
        )
    if a.command == "phema":
        return commands.phema(
            a.run, out=a.out, std=a.std, sweep=a.sweep, at_images=a.at_images, **kw
        )
    return commands.plot(out=a.out, run=a.run, **kw)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="vdmpp-eval", description=__doc__.split("\n")[0], formatter_class=fmt
    )
    p.add_argument("--version", action=_Version, help="versions of every vdmpp package and torch")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "sample",
        help="draw images for a list of seeds (resumable, sharded)",
        formatter_class=_Formatter,
        epilog=_samplers_epilog(),
    )
    s.add_argument("checkpoint", help="run dir, RUN/export or RUN/export/ema.safetensors")
    s.add_argument("--seeds", required=True, help="e.g. 0-49999 or 0,5,10-19")
    s.add_argument("--out", required=True, help="output directory (chunks/, samples.npz)")
    s.add_argument("--chunk", type=int, default=500, help="seeds per resumable chunk file")
    s.add_argument("--grid", type=int, default=64, help="images in grid.png (0: none)")
    _add_sampling_args(s)
    _add_allow_partial(s)

    m = sub.add_parser(
        "metrics",
        help="FID/IS/KID/PR (and the digits FD/accuracy)",
        formatter_class=_Formatter,
        epilog=_samplers_epilog(),
    )
    m.add_argument("source", help="a `sample` output dir, an .npz, or a checkpoint to sample")
    m.add_argument(
        "--ref",
        required=True,
        help="digits[:train|:test|:all], shards dir/pattern, .npz or sample dir",
    )
    m.add_argument(
        "--inception-weights",
        default=None,
        help="local Inception file; None: $VDMPP_INCEPTION_WEIGHTS, then torch hub's cache",
    )
    m.add_argument(
        "--metrics",
        default="fid,isc,kid,prc",
        help="comma-separated subset of fid,isc,kid,prc (Inception)",
    )
    m.add_argument("--kid-subsets", type=int, default=100, help="KID subsets")
    m.add_argument("--num", type=int, default=1000, help="images to sample from a checkpoint")
    m.add_argument("--seeds", default=None, help="seeds to sample (overrides --num)")
    _add_sampling_args(m)
    _add_allow_partial(m)

    b = sub.add_parser(
        "bpd",
        help="bits/dim on held-out data: VDM's bound and/or the PF-ODE likelihood",
        formatter_class=fmt,
    )
    b.add_argument("checkpoint", help="run dir, RUN/export or RUN/export/ema.safetensors")
    b.add_argument("--data", required=True, help="digits[:test|:train|:all], shards or .npz")
    b.add_argument(
        "--method",
        default="vlb",
        choices=commands.BPD_METHODS,
        help="vlb: VDM's variational bound; ode: the probability-flow ODE likelihood "
        "(uniform dequantization, resumable); both: side by side on the same images",
    )
    b.add_argument("--draws", type=int, default=1, help="vlb: MC draws of (t, ε) per image")
    b.add_argument("--discrete-steps", type=int, default=None, help="vlb: T of the discrete bound")
    b.add_argument(
        "--limit", "--count", dest="limit", type=int, default=0, help="only the first N images"
    )
    b.add_argument("--batch", type=int, default=256, help="vlb: images per forward pass")
    b.add_argument("--seed", type=int, default=0, help="seed of the (t, ε) draws / u and probes")
    o = b.add_argument_group("ode (--method ode|both; vdmpp.samplers.log_likelihood)")
    o.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    o.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    o.add_argument(
        "--divergence",
        default="auto",
        choices=("auto", "exact", "hutchinson"),
        help="tr ∂D/∂x exactly (d backward passes) or by one Rademacher probe; auto: exact "
        "up to 256 dimensions",
    )
    o.add_argument(
        "--sigma-min",
        type=float,
        default=None,
        help="σ where the density is taken (default: EDM's 0.002, raised to e^{-λmax/2})",
    )
    o.add_argument(
        "--sigma-max",
        type=float,
        default=None,
        help="σ of the Gaussian prior (default: EDM's 80, lowered to e^{-λmin/2})",
    )
    o.add_argument(
        "--ode-batch", type=int, default=64, help="images per ODE solve (one step size each)"
    )
    o.add_argument(
        "--out",
        default=None,
        help="folder of the per-batch results (resume); default $VDMPP_CACHE/bpd/<settings hash>",
    )
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_allow_partial(b)

    e = sub.add_parser(
        "phema",
        help="post-hoc EMA (EDM2): an export at any σ_rel from the run's RUN/phema snapshots",
        formatter_class=fmt,
    )
    e.add_argument("run", help="a vdmpp-train run directory with phema/ and export/")
    e.add_argument(
        "--std", type=float, nargs="+", default=None, metavar="S", help="σ_rel of each export"
    )
    e.add_argument(
        "--sweep",
        type=int,
        nargs="?",
        const=6,
        default=None,
        metavar="N",
        help="N σ_rel log-spaced from 0.02 to 0.2 (N=6: 0.020 0.032 0.050 0.080 0.126 0.200)",
    )
    e.add_argument(
        "--at-images",
        type=int,
        default=None,
        metavar="N",
        help="the image count of the snapshot to reconstruct at (default: the last)",
    )
    e.add_argument(
        "--out",
        required=True,
        help="the export (one σ_rel), or a folder of OUT/std-0.050/ ... (several)",
    )
    e.add_argument("--no-progress", action="store_true", help="warnings only")
    _add_allow_partial(e)

    q = sub.add_parser(
        "plot", help="schedules, weightings, a run's p(λ) and training curves", formatter_class=fmt
    )
    q.add_argument("--out", required=True, help="directory for the PNG files")
    q.add_argument("--run", default=None, help="a vdmpp-train run directory")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from vdmpp.train.log import configure, console

    from .runtime import rank

    handler = console(configure("eval", rank=rank(), buffer=False))
    if a.no_progress and handler is not None:
        handler.setLevel(logging.WARNING)  # --no-progress: neither a bar nor progress lines
    try:
        result = _run(a)
    except EvalError as e:
        msg = re.sub(r"\s*\n\s*", " ", str(e).strip())  # one line, always
        print(f"vdmpp-eval {a.command}: error: {msg}", file=sys.stderr)
        return 2
    if result:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
