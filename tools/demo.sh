#!/usr/bin/env bash
# The main job on the bundled default (`tox -e demo`): train the photos domain classifier and the
# 16 px EDM teacher on the bundled photographs, then measure the teacher with the evaluation suite
# (FD / KID / IS / precision-recall on the domain network's features) across samplers and step
# counts, and write rows, a table and a sample grid under runs/demo/. Rerunning resumes / reuses.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash tools/venv.sh
py="$root/.venv/bin/python"
out="${DEMO_OUT:-runs/demo}"
weights="${PAGODA_WEIGHTS:-$root/weights}"
mkdir -p "$out" "$weights"
export PAGODA_WEIGHTS="$weights"

# 1. The download-free feature network: a small CNN trained on the bundled photos (~1 min).
if [ ! -f "$weights/domain-photos.safetensors" ]; then
  "$py" -m pagoda domain -o "$weights/domain-photos.safetensors"
fi

# 2. Stage 1: the EDM teacher at 16 px (resumes if interrupted; a finished run is reused).
"$py" -m pagoda teacher --preset photos --out "$out/teacher"

# 3. Reference statistics of the held-out photos, then the metrics sweep.
"$py" -m eval.ref photos:heldout:16 --extractor domain -o "$out/ref-photos16-domain.npz"
"$py" -m eval.run --ckpt "$out/teacher/teacher.safetensors" --ref "$out/ref-photos16-domain.npz" \
  --extractor domain --metrics fid,kid,is,pr,dc --sampler heun,euler --steps 4,8,16 \
  --num-samples 1000 --batch 250 --out "$out/results.jsonl"

# 4. Per-class FD and precision / recall of the Heun-16 cell (the teacher is class-conditional).
"$py" -m eval.run --ckpt "$out/teacher/teacher.safetensors" --ref "$out/ref-photos16-domain.npz" \
  --extractor domain --metrics fid,pr --sampler heun --steps 16 --per-class \
  --num-samples 1000 --batch 250 --out "$out/results-per-class.jsonl"

# 5. A sample grid to look at.
"$py" -m pagoda sample --ckpt "$out/teacher/teacher.safetensors" --seeds 0-63 -o "$out/samples.png"
echo "demo: rows in $out/results.jsonl and $out/results-per-class.jsonl, samples in $out/samples.png"
