"""Compatibility: ``vdmpp.train.shards`` re-exports the names it had; they live in
:mod:`vdmpp.train.data` (``writer``, ``sources``, ``cifar``, ``transform``, ``manifest``).

Setting a name here sets it in the module that owns it too, so patches of the writer's hooks
(``_write_part``, ``PROGRESS_EVERY_S``) made through this module take effect.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .data import cifar as _cifar
from .data import manifest as _manifest
from .data import sources as _sources
from .data import transform as _transform
from .data import writer as _writer
from .data.cifar import _unpickle_batch as _unpickle_batch
from .data.cifar import read_cifar
from .data.manifest import (
    FORMAT,
    INCOMPLETE,
    LABELS,
    MANIFEST,
    SHARD_RE,
    SKIPPED,
    VERIFY_AUTO_BYTES,
    check_manifest,
    sha256_file,
    shards_command,
    skipped_line,
    verify_shards,
)
from .data.sources import (
    DIGITS_SPLITS,
    IMAGE_SUFFIXES,
    SRC_KINDS,
    digits_images,
    folder_items,
    load_npz,
)
from .data.transform import png_bytes
from .data.writer import PROGRESS_EVERY_S, default_workers, write_shards
from .data.writer import _write_part as _write_part

__all__ = [
    "DIGITS_SPLITS",
    "FORMAT",
    "IMAGE_SUFFIXES",
    "INCOMPLETE",
    "LABELS",
    "MANIFEST",
    "PROGRESS_EVERY_S",
    "SHARD_RE",
    "SKIPPED",
    "SRC_KINDS",
    "VERIFY_AUTO_BYTES",
    "check_manifest",
    "default_workers",
    "digits_images",
    "folder_items",
    "load_npz",
    "png_bytes",
    "read_cifar",
    "sha256_file",
    "shards_command",
    "skipped_line",
    "verify_shards",
    "write_shards",
]

_OWNERS = (_writer, _sources, _cifar, _manifest, _transform)


class _Forwarding(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        for owner in _OWNERS:
            if name in vars(owner):
                setattr(owner, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Forwarding
