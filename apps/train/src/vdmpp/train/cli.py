"""``vdmpp-train CONFIG [--set key=value ...] [--resume]`` and ``vdmpp-train shards SRC OUT``."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]

from .errors import EXIT_CODES, EXIT_CONFIG  # the one exit-code table

_EPILOG = """\
examples:
  vdmpp-train digits                                   # shipped config, CPU, minutes
  vdmpp-train apps/train/configs/digits.toml --set steps=50 --set out=runs/try
  torchrun --nproc-per-node 8 -m vdmpp.train imagenet64 --set data.source=/data/in64
  vdmpp-train shards digits shards/digits --maxcount 500
  vdmpp-train shards /data/images shards/mine --resolution 64
  vdmpp-train configs                                  # list shipped configs
"""


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vdmpp-train",
        description="Train a diffusion model from a TOML config (single process or torchrun).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="a TOML file, or the name of a shipped config (digits, ...)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, value parsed as a TOML literal (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--check",
        action="store_true",
        help="dry run: resolve names, build model and objective, probe the data, check the "
        "device and batch split, print a summary; writes nothing",
    )
    return p


def _shards_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vdmpp-train shards",
        description="Write shuffled WebDataset shards (PNG + cls) and a manifest (dataset.json: "
        "counts, classes, resolution, sha256 per shard) from an image folder (unlabeled), a "
        "class-folder tree (labels from sorted folder names, labels.json), a CIFAR-10/100 python "
        "tarball, an .npz (images NHWC/NCHW uint8, optional labels) or 'digits'. Images are "
        "centre-cropped and resized (Lanczos) to --resolution; unreadable ones are skipped and "
        "listed in OUT/skipped.txt. `vdmpp-train shards DIR --verify` checks written shards.",
        epilog="examples:\n"
        "  vdmpp-train shards cifar-10-python.tar.gz shards/cifar10\n"
        "  vdmpp-train shards cifar-10-python.tar.gz shards/cifar10-test --split test\n"
        "  vdmpp-train shards /data/imagenet/train shards/in64 --resolution 64 --workers 16\n"
        "  vdmpp-train shards shards/in64 --verify",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="image folder, class-folder tree, CIFAR tarball, .npz or 'digits'")
    p.add_argument("out", nargs="?", help="output directory (shard-NNNNNN.tar + dataset.json)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="side after centre crop + resize (default: the first image's)",
    )
    p.add_argument(
        "--shard-size",
        "--maxcount",
        dest="maxcount",
        type=int,
        default=1000,
        help="samples per shard (default 1000)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: the CPUs available, at most 16)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.add_argument(
        "--split",
        choices=["train", "test", "all"],
        default=None,
        help="CIFAR: train (default) or test; digits: train, test or all",
    )
    p.add_argument(
        "--labels",
        choices=["auto", "folders", "none"],
        default="auto",
        help="image folders: class sub-folders or unlabeled (auto: folders unless "
        "images lie directly in SRC)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=[1, 3],
        default=None,
        help="1 or 3 (default: the first image's; colour into 1 converts to grey)",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the shards in SRC against their manifest (sizes and sha256)",
    )
    return p


def _shards(argv: list[str]) -> int:
    """``vdmpp-train shards``: write shards (or ``--verify`` them); one JSON line on stdout."""
    from .data import default_workers, skipped_line, verify_shards, write_shards

    p = _shards_parser()
    a = p.parse_args(argv)
    workers = a.workers if a.workers is not None else default_workers()
    if a.verify:
        if a.out is not None:
            p.error("--verify takes one shard folder: vdmpp-train shards DIR --verify")
        meta = verify_shards(a.src, workers=workers)
        print(json.dumps({"verified": a.src, "shards": meta["shards"], "count": meta["count"]}))
        return 0
    if a.out is None:
        p.error("the following arguments are required: out")
    try:
        meta = write_shards(
            a.src,
            a.out,
            maxcount=a.maxcount,
            resolution=a.resolution,
            seed=a.seed,
            workers=workers,
            progress=not a.no_progress,
            split=a.split,
            labels=a.labels,
            channels=a.channels,
        )
    except KeyboardInterrupt:
        print(
            f"vdmpp-train shards: interrupted; {a.out} has no manifest (training refuses it) "
            "until this command is rerun",
            file=sys.stderr,
        )
        return 130
    line = skipped_line(meta, a.out)
    if line:
        print(f"vdmpp-train shards: warning: {line}", file=sys.stderr)
    print(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .config import ConfigError

    try:
        if argv and argv[0] == "shards":
            return _shards(argv[1:])
        if argv and argv[0] == "configs":
            from .config import builtin_configs

            for name, path in sorted(builtin_configs().items()):
                print(f"{name}\t{path}")
            return 0
        a = _train_parser().parse_args(argv)
        from .config import load

        cfg = load(a.config, a.overrides)
        if a.check:
            from .check import dry_run

            print(dry_run(cfg, resume=a.resume))
            print(f"{a.config}: ok")
            return 0
        from .config import resolve_path
        from .distributed import dist_env
        from .errors import TrainingError
        from .trainer import train

        # train() logs every failure (with its rank) to stderr and RUN/log.txt and writes
        # RUN/status.json; here: the one JSON result line (rank 0) and the status's exit code.
        try:
            result = train(cfg, resume=a.resume, config_path=resolve_path(a.config))
        except TrainingError as e:
            result = e.result or {"status": e.status, "error": str(e)}
        except ConfigError:
            raise
        except Exception as e:
            result = getattr(e, "vdmpp_result", None)
            if result is None:
                raise
        if dist_env()[0] == 0:  # one result line per run, not per rank
            print(json.dumps(result), flush=True)
        return EXIT_CODES.get(result.get("status"), EXIT_CODES["failed"])
    except ConfigError as e:
        print(f"vdmpp-train: error: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
