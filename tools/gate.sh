#!/usr/bin/env bash
# The gate on metrics (`tox -e gate`, run by .ci/run): the smoke pipeline (python -m bench.demo --preset smoke:
# teacher, pairs, G, guided G, grown G, PD, eval, cost; fixed seeds) from an empty folder, then its rows against
# the committed baseline with `python -m eval.gate`. Exit 0 pass, 1 regression, 2 bad input.
#
#   bash tools/gate.sh            # run and compare
#   bash tools/gate.sh --update   # run and write the baseline (commit it, and say why in the commit message)
#
# The instrument is fixed: the domain classifier whose features every metric uses is committed
# (tests/data/gate/domain-photos.safetensors), so only the pipeline under test can move the numbers.
# Tolerances: README "CI gate" gives the spread they were derived from.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/bin/python"
out="${PAGODA_GATE_OUT:-$root/runs/gate}"
baseline="$root/tests/data/gate/smoke-baseline.jsonl"
metrics="fid,fdr,kid,is,precision,recall,drift_rms,nfe"
tolerance="${PAGODA_GATE_TOLERANCE:-fid=+6%,fdr=+6%,kid=+14%,is=-4%,precision=-0.04,recall=-0.14,drift_rms=+2%}"
rm -rf "$out"
"$py" -m bench.demo --preset smoke --out "$out" --weights-dir "$root/tests/data/gate"
if [ "${1:-}" = "--update" ]; then
  exec "$py" -m eval.gate --results "$out/results" --metrics "$metrics" --write-baseline "$baseline"
fi
exec "$py" -m eval.gate --results "$out/results" --baseline "$baseline" --metrics "$metrics" --tolerance "$tolerance"
