#!/usr/bin/env bash
# The first-GPU check of vdmpp in one command, for a fresh H100/H200 machine with no internet:
# build (FORCE_CUDA=1, this device's arch only) -> smoke call of every op (60 s, a hang is
# reported) -> CUDA pytest -> exactness -> CUDA graphs / side stream / sync debug -> benchmarks
# -> training, each phase under its own timeout, all within --budget seconds (default 480),
# logs and JSON written to $OUT (or --out DIR) as it goes. Phases: scripts/gpu_check.py.
#
#   scripts/gpu_check.sh [--out DIR] [--budget S] [--only build,smoke] [--cpu-dry-run]
#
# Wheels the machine lacks (webdataset, braceexpand for the training phase) are installed from
# .whl/ when that folder is there (carried by the device tool; csrc/README.md).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/vdmpp-site .whl/*.whl && export PYTHONPATH="/tmp/vdmpp-site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" scripts/gpu_check.py --python "$PY" "$@"
