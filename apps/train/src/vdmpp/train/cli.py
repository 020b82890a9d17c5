"""``vdmpp-train CONFIG [--set key=value ...] [--resume]`` and ``vdmpp-train shards SRC OUT``."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]

# Exit codes (vdmpp.train.status): 0 done, 2 config/command-line error (no run), 3 failed,
# 4 stopped-nonfinite, 75 preempted (EX_TEMPFAIL: resume later).
EXIT_CONFIG = 2
EXIT_TRAINING = 3
EXIT_NONFINITE = 4
EXIT_PREEMPTED = 75

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
        description="Write shuffled WebDataset shards (PNG + cls) from an image folder with one "
        "sub-folder per class, an .npz (images [N,H,W,C] uint8, labels), or 'digits'.",
    )
    p.add_argument("src", help="'digits', an .npz file, or a folder of class sub-folders")
    p.add_argument("out", help="output directory (shard-NNNNNN.tar + dataset.json)")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--resolution", type=int, default=None, help="resize/pad to this side")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .config import ConfigError

    try:
        if argv and argv[0] == "shards":
            a = _shards_parser().parse_args(argv[1:])
            from .data import write_shards

            meta = write_shards(
                a.src, a.out, maxcount=a.maxcount, resolution=a.resolution, seed=a.seed
            )
            print(json.dumps(meta))
            return 0
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
        from .status import EXIT_CODES
        from .trainer import TrainingError, dist_env, train

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
        return EXIT_CODES.get(result.get("status"), EXIT_TRAINING)
    except ConfigError as e:
        print(f"vdmpp-train: error: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
