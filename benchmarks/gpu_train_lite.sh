#!/usr/bin/env bash
# One GPU session: CUDA checks, then cascadepsp-lite training runs side by side within a time budget.
#
# Usage (repository root, a CUDA machine, the shared folder at ../shared or carried as .shared):
#   OUT=out/gpu BUDGET=540 bash benchmarks/gpu_train_lite.sh
# Environment:
#   BUDGET   seconds for the whole script (default 540); the runs get what the checks and a short
#            throughput probe leave, and their --steps are sized from the probe so that the cosine
#            schedule ends inside the budget.
#   RUNS     space-separated run names (default "a b"); ARCH_<name> holds each run's --arch-params
#            JSON (empty = the shipped v1 architecture), BATCH (default 16), WORKERS per run (default 7).
#   CHECKS   1 (default) runs the CUDA tests and a `refine run --device cuda` timing first.
#   DEV      training device (default cuda); PROBE_STEPS steps of the probe (default 100).
#   TRAIN_ARGS more `refine train` flags for every run, e.g. the lite-v3 mix (v3 itself: 1 750 CPU steps
#            from v2; a GPU run would continue it with --init cascadepsp-lite-v3):
#            TRAIN_ARGS="--init cascadepsp-lite-v3 --kinds shapes=0.3,portraits=0.2,aerial=0.2,cells=0.15,thin=0.15
#            --perturbations cascadepsp=0.4,lowres=0.25,blobs=0.15,detector=0.2"
# Writes under $OUT: env.txt, checks.log, <run>.tar (best/final weights, log, config), <run>_checkpoint.pt.
set -u
OUT=${OUT:-out/gpu}
BUDGET=${BUDGET:-540}
RUNS=${RUNS:-"a b"}
BATCH=${BATCH:-16}
WORKERS=${WORKERS:-7}
CHECKS=${CHECKS:-1}
DEV=${DEV:-cuda}
PROBE_STEPS=${PROBE_STEPS:-100}
read -r -a TA <<< "${TRAIN_ARGS:-}"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
mkdir -p "$OUT" runs/gpu
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ ! -e ../shared ] && [ -d .shared ]; then ln -s "$PWD/.shared" ../shared; fi
PY=${PY:-python3}
refine() { "$PY" -m refine_cli "$@"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c \
  "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"; nproc; } \
  >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$CHECKS" = 1 ]; then
  (
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cascadepsp_model.py tests/test_magnet_models.py \
      tests/test_magnet_points.py tests/test_cascadepsp_inference.py -x -k "cuda or CUDA or gpu" -rs 2>&1
    s=../shared/data/cascadepsp-samples
    for dev in cuda cpu; do
      /usr/bin/time -f "$dev wall %e s, max RSS %M KB" "$PY" -m refine_cli run $s/aeroplane.jpg \
        --mask $s/aeroplane_coarse.png --method cascade --device $dev --out "runs/gpu/aeroplane_$dev.png" \
        --overwrite 2>&1 | tail -c 1500
    done
    "$PY" - <<'EOF'
import cv2, numpy as np
a = cv2.imread("runs/gpu/aeroplane_cuda.png", 0); b = cv2.imread("runs/gpu/aeroplane_cpu.png", 0)
if a is None or b is None:
    print("aeroplane cuda/cpu comparison: an output is missing")
else:
    d = np.abs(a.astype(int) - b.astype(int))
    inter = ((a >= 128) & (b >= 128)).sum(); union = ((a >= 128) | (b >= 128)).sum()
    print(f"aeroplane cuda vs cpu: max |diff| {d.max()} (8-bit), pixels differing by >1: {(d > 1).sum()}, "
          f"binary IoU {inter / union:.6f}")
EOF
  ) >"$OUT/checks.log" 2>&1
  echo "checks done at $(elapsed) s"; tail -n 25 "$OUT/checks.log"
fi

arch_flag() {  # sets AF to the run's --arch-params flag (an array: the JSON holds spaces)
  local v="ARCH_$1"; AF=(); if [ -n "${!v:-}" ]; then AF=(--arch-params "${!v}"); fi
}

# throughput probe: every run concurrently, as they will run
for r in $RUNS; do
  rm -rf "runs/gpu/probe_$r"; arch_flag "$r"
  refine train --out "runs/gpu/probe_$r" --device "$DEV" --batch-size "$BATCH" --workers "$WORKERS" --threads 2 \
    --steps "$PROBE_STEPS" --val-every 0 --val-n 2 "${AF[@]}" "${TA[@]}" -q >/dev/null 2>"$OUT/probe_$r.err" &
done
wait
declare -A SPS
for r in $RUNS; do
  SPS[$r]=$("$PY" -c "
import json; recs=[json.loads(l) for l in open('runs/gpu/probe_$r/log.jsonl') if '\"train\"' in l]
recs = recs[1:] or recs  # the first window holds the workers' start
print(max(0.01, sum(x['sec_per_step'] for x in recs) / len(recs)))" 2>/dev/null || echo 1)
  echo "probe $r: ${SPS[$r]} s/step"
done
LEFT=$(( BUDGET - $(elapsed) - 45 ))
if [ "$LEFT" -lt 90 ]; then echo "only $LEFT s left after the checks and the probe: no training run"; exit 1; fi
for r in $RUNS; do
  steps=$("$PY" -c "print(max(200, int(($LEFT - 30) / ${SPS[$r]} / 100) * 100))")
  ve=$(( steps / 4 ))
  echo "run $r: $steps steps (val every $ve) in ~$LEFT s"
  rm -rf "runs/gpu/$r"; arch_flag "$r"
  refine train --out "runs/gpu/$r" --device "$DEV" --batch-size "$BATCH" --workers "$WORKERS" --threads 2 \
    --steps "$steps" --val-every "$ve" --ckpt-every "$ve" "${AF[@]}" "${TA[@]}" -v 2>"$OUT/$r.err" &
done
wait
for r in $RUNS; do
  cp "runs/gpu/$r/checkpoint.pt" "$OUT/${r}_checkpoint.pt" 2>/dev/null
  tar -C runs/gpu -cf "$OUT/$r.tar" --exclude checkpoint.pt "$r"
  grep '"val"' "runs/gpu/$r/log.jsonl" | cut -c1-260
done
echo "done at $(elapsed) s"
