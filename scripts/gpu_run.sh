#!/usr/bin/env bash
# The GPU checks of the search, in one script (issue 14): Ray from the offline wheels, the GPU tests,
# the packing sweep (python -m fvae.bench tune --gpu) and a short default.yaml search at the chosen
# packing on an S&P-500-sized synthetic panel. Every log and figure goes to $OUT.
#
#   OUT=gpu-out bash scripts/gpu_run.sh setup|tests|packing|search|all
#
# On an offline GPU machine, from a checkout that carries .whl/ (a wheel set of Ray and Optuna plus its
# validate.py): each stage fits in one 10-minute command; run `setup tests packing` in one call and
# `search` in the next. FVAE_CPU_DRY_RUN=1 runs every stage on the CPU, tiny, to check the script.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
SCRATCH=${FVAE_SCRATCH:-${TMPDIR:-/tmp}}  # where the wheels are installed and the synthetic panel is written
SITE=$SCRATCH/fvae-site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu_run: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=$SITE:${PYTHONPATH:-} PATH=$SITE/bin:$PATH
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
PY=${PY:-python3}
DRY=${FVAE_CPU_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then STOCKS=60; DAYS=300; SAMPLES=2; SEARCH=2; BUDGET=240; else STOCKS=500; DAYS=2500; SAMPLES=8; SEARCH=30; BUDGET=420; fi
DATA=$SCRATCH/fvae-gpu-data-$STOCKS-$DAYS

stage_setup() {
  { date; nvidia-smi || echo "no nvidia-smi"; $PY -c "import torch, ray, optuna; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'); print('ray', ray.__version__, 'optuna', optuna.__version__)"; } 2>&1 | tee "$OUT/device.txt"
  if [ -f .whl/validate.py ] && [ "$DRY" != 1 ]; then timeout 200 $PY .whl/validate.py > "$OUT/validate.log" 2>&1; echo "validate.py: exit $?" | tee -a "$OUT/device.txt"; fi
  [ -f "$DATA/meta.json" ] || $PY -m fvae.data synthetic --out "$DATA" --stocks $STOCKS --days $DAYS --seed 0 2>&1 | tail -2
}

stage_tests() {
  if ! $PY -c "import pytest" 2>/dev/null; then echo "gpu_run: no pytest on this machine: GPU tests not run" | tee "$OUT/tests.log"; return; fi
  local sel="-m gpu"; [ "$DRY" = 1 ] && sel="tests/test_gpu.py tests/test_train.py -k gpu_or_cuda"
  timeout 300 $PY -m pytest -q -p no:cacheprovider $sel -rs 2>&1 | tail -30 | tee "$OUT/tests.log"
}

stage_packing() {
  local flag="--gpu"; [ "$DRY" = 1 ] && flag=""
  timeout 420 $PY -m fvae.bench tune $flag --data "$DATA" --space search_spaces/smoke.yaml --num-samples $SAMPLES \
    --packing-out "$OUT/packing.json" --ignore-other-ray 2>&1 | grep -v "^\[fvae\] epoch\|^(" | tee "$OUT/bench_tune.log" | tail -40
}

stage_search() {
  local gpu_args=""; [ "$DRY" != 1 ] && gpu_args="--packing $OUT/packing.json"
  local start; start=$(date +%s); : > "$OUT/search_figures.txt"
  local mon=""
  if command -v nvidia-smi >/dev/null; then
    (while sleep 2; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits; done) > "$OUT/gpu_util.csv" &
    mon=$!
  fi
  # shellcheck disable=SC2086
  timeout $((BUDGET + 120)) $PY -m fvae.tune --data "$DATA" --space search_spaces/default.yaml --num-samples $SEARCH \
    --time-budget-s $BUDGET --out "$OUT/search" $gpu_args 2>&1 | grep -v "^\[fvae\] epoch\|^(" > "$OUT/search.log"
  echo "search: exit $?, $(( $(date +%s) - start )) s" | tee -a "$OUT/search.log"
  [ -n "$mon" ] && kill "$mon" && awk -F', ' '{u+=$1; m=($2>m?$2:m); n++} END {if (n) printf "GPU utilisation %.0f %% mean over %d samples, peak memory %d MiB\n", u/n, n, m}' "$OUT/gpu_util.csv" | tee -a "$OUT/search_figures.txt"
  $PY - "$OUT/search/summary.json" <<'PY' | tee -a "$OUT/search_figures.txt"
import json, sys
s = json.load(open(sys.argv[1]))
t = s["trials"]; ok = [x for x in t if x["status"] != "ERROR"]
print(f"trials {len(t)} ({len(t) - len(ok)} failed) in {s['seconds']:.0f} s: {len(ok) / s['seconds'] * 3600:.0f} trials/h")
print(f"epochs run {sum(x['epochs'] for x in t)}; ASHA stopped {s['asha_stopped']}, patience {s['patience_stopped']}")
b = s["best"]
print(f"best valid Rank ICIR {b['valid_rank_icir']:.3f} (trial {b['trial_id']}), test Rank IC {b['test']['rank_ic']:.4f}" if b else "no best trial")
PY
}

for stage in "${@:-all}"; do
  case $stage in
    setup) stage_setup ;; tests) stage_tests ;; packing) stage_packing ;; search) stage_search ;;
    all) stage_setup; stage_tests; stage_packing; stage_search ;;
    *) echo "gpu_run: unknown stage '$stage' (setup|tests|packing|search|all)"; exit 2 ;;
  esac
done
