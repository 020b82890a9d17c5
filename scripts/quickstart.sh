#!/usr/bin/env bash
# vdmpp quickstart: install, train the digits config on the CPU, sample, and report bits/dim,
# the digits Fréchet distance, class accuracy and a sample grid. Run inside a venv:
#
#   python3 -m venv .venv && . .venv/bin/activate && bash scripts/quickstart.sh
#
# Safe to rerun: installs are skipped when vdmpp is importable, a finished run is not retrained
# (an interrupted one resumes), sampling resumes, reference features are cached. Numbers are
# reported only for a run whose RUN/status.json says "done": a preempted or failed training
# exits non-zero (75: preempted, rerun to resume) and prints no metrics.
# Knobs (environment): VDMPP_QUICKSTART_OUT (runs/quickstart), VDMPP_QUICKSTART_STEPS (2000),
# VDMPP_QUICKSTART_SAMPLES (500), VDMPP_QUICKSTART_INSTALL=1 (force reinstall),
# VDMPP_TORCH (torch==2.13.0: what to install when torch is absent).
set -Eeuo pipefail
trap 'echo "quickstart: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${VDMPP_QUICKSTART_OUT:-runs/quickstart}
STEPS=${VDMPP_QUICKSTART_STEPS:-2000}  # digits.toml's own step count
SAMPLES=${VDMPP_QUICKSTART_SAMPLES:-500}
RUN="$OUT/run"
START=$(date +%s)
say() { printf '\n==> %s\n' "$*"; }

if [[ -z "${VIRTUAL_ENV:-}" && "${VDMPP_QUICKSTART_ALLOW_SYSTEM:-0}" != 1 ]]; then
  echo "quickstart: activate a virtual environment first:" >&2
  echo "  python3 -m venv .venv && . .venv/bin/activate && bash scripts/quickstart.sh" >&2
  echo "(or set VDMPP_QUICKSTART_ALLOW_SYSTEM=1 to install into $($PY -c 'import sys; print(sys.prefix)'))" >&2
  exit 2
fi

say "1/6 PyTorch"
if $PY -c "import torch" 2>/dev/null; then
  echo "using the installed torch $($PY -c 'import torch; print(torch.__version__)')"
else
  $PY -m pip install "${VDMPP_TORCH:-torch==2.13.0}"
fi
TORCH_PIN="torch==$($PY -c 'import torch; print(torch.__version__)')"

say "2/6 vdmpp libraries and apps"
if [[ "${VDMPP_QUICKSTART_INSTALL:-0}" != 1 ]] \
   && $PY -c "import vdmpp.schedules, vdmpp.losses, vdmpp.samplers, vdmpp.models, vdmpp.train; from vdmpp.eval._compat import import_torch_fidelity as f; f()" 2>/dev/null \
   && command -v vdmpp-train >/dev/null && command -v vdmpp-eval >/dev/null; then
  echo "already installed (VDMPP_QUICKSTART_INSTALL=1 reinstalls)"
else
  # The constraint keeps the torch above: pip must not swap it for another build.
  $PY -m pip install -c <(echo "$TORCH_PIN") \
    ./libs/schedules ./libs/losses ./libs/samplers ./libs/models ./apps/train ./apps/eval
fi

say "3/6 train digits.toml for $STEPS steps on the CPU -> $RUN"
# A run is finished when its status.json says "done" (vdmpp.train.status) at >= $STEPS steps.
run_done() {
  [[ -f "$RUN/status.json" ]] && $PY - "$RUN/status.json" "$STEPS" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
sys.exit(0 if s.get("status") == "done" and s.get("step", 0) >= int(sys.argv[2]) else 1)
PYEOF
}
if run_done; then
  echo "already trained ($RUN/export)"
else
  resume=()
  [[ -d "$RUN/checkpoints" ]] && resume=(--resume)
  rc=0
  vdmpp-train digits --set "steps=$STEPS" --set "out=$RUN" --set device=cpu \
    --set sample.every=0 --set "checkpoint.every=$STEPS" "${resume[@]}" || rc=$?
  if (( rc != 0 )); then
    status=$($PY -c "import json, sys; s = json.load(open(sys.argv[1])); print(f\"{s['status']} at step {s.get('step')}/{s.get('steps')}\")" \
      "$RUN/status.json" 2>/dev/null || echo "unknown")
    if (( rc == 75 )); then
      echo "quickstart: training $status (checkpoint written): no results to report; rerun this script to resume" >&2
    else
      echo "quickstart: training did not finish ($status, exit $rc; see $RUN/log.txt): no results to report" >&2
    fi
    exit "$rc"
  fi
fi
run_done || { echo "quickstart: $RUN/status.json does not say done at step $STEPS: no results to report" >&2; exit 1; }
[[ -f "$RUN/export/model.json" ]] || { echo "quickstart: training wrote no export" >&2; exit 1; }

# One samples directory per trained step: sampling resumes, but never mixes two models.
STEP=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$RUN/export/model.json")
SAMPLES_DIR="$OUT/samples-step$STEP"
say "4/6 sample $SAMPLES digits (Heun, 18 steps = 35 NFE) -> $SAMPLES_DIR"
vdmpp-eval sample "$RUN" --sampler heun --steps 18 --seeds "0-$((SAMPLES - 1))" \
  --out "$SAMPLES_DIR" --device cpu > "$OUT/sample.json"

say "5/6 digits Fréchet distance and class accuracy"
vdmpp-eval metrics "$SAMPLES_DIR" --ref digits:all --device cpu > "$OUT/metrics.json"

say "6/6 bits/dim on the digits test split, and plots"
vdmpp-eval bpd "$RUN" --data digits:test --draws 4 --device cpu > "$OUT/bpd.json"
vdmpp-eval plot --out "$OUT/plots" --run "$RUN" > /dev/null

$PY - "$OUT" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, sys
out, secs = sys.argv[1], int(sys.argv[2])
m = json.load(open(f"{out}/metrics.json"))["digits"]
b = json.load(open(f"{out}/bpd.json"))
s = json.load(open(f"{out}/sample.json"))
print(f"""
vdmpp quickstart — done in {secs // 60} min {secs % 60} s
  bits/dim (VDM bound, digits test split):  {b['bpd']:.3f} ± {b['stderr']:.3f}  ({b['images']} images x {b['draws']} draws)
  digits Fréchet distance (classifier features, NOT Inception FID):  {m['frechet_distance']:.3f}
  class accuracy of class-conditional samples:  {m.get('class_accuracy', float('nan')):.3f}  (classifier on real test digits: {m['classifier_test_accuracy']:.3f})
  precision / recall (classifier features):  {m['precision']:.3f} / {m['recall']:.3f}
outputs:
  sample grid   {s['grid']}
  samples       {s['samples']}
  model         {out}/run/export/
  numbers       {out}/metrics.json  {out}/bpd.json
  plots         {out}/plots/
""")
PYEOF
