"""Data of a run: sources → shards (:mod:`.writer`), their manifest, the training stream.

======================  ==================================================================
:mod:`.sources`         digits, ``.npz``, CIFAR, image folders: one record iterator each
:mod:`.cifar`           CIFAR python batches through a restricted unpickler
:mod:`.transform`       channel handling, centre crop + Lanczos resize, PNG bytes
:mod:`.writer`          ``vdmpp-train shards``: parallel, deterministic shard writing
:mod:`.manifest`        ``dataset.json`` / ``labels.json``: writing, validation, checksums
:mod:`.stream`          :class:`ShardStream`, the loader, :func:`probe`
======================  ==================================================================
"""

from .manifest import (
    MANIFEST,
    check_manifest,
    shards_command,
    skipped_line,
    validate_manifests,
    verify_shards,
)
from .sources import DIGITS_SPLITS, SRC_KINDS, Record, Source, digits_images, load_npz, open_source
from .stream import (
    ShardStream,
    StreamSpec,
    StreamStarved,
    decode_sample,
    expand_source,
    ignore_stop_signals,
    make_loader,
    probe,
    shutdown_loader,
    stable_seed,
)
from .writer import default_workers, write_shards

__all__ = [
    "DIGITS_SPLITS",
    "MANIFEST",
    "SRC_KINDS",
    "Record",
    "ShardStream",
    "Source",
    "StreamSpec",
    "StreamStarved",
    "check_manifest",
    "decode_sample",
    "default_workers",
    "digits_images",
    "expand_source",
    "ignore_stop_signals",
    "load_npz",
    "make_loader",
    "open_source",
    "probe",
    "shards_command",
    "shutdown_loader",
    "skipped_line",
    "stable_seed",
    "validate_manifests",
    "verify_shards",
    "write_shards",
]
