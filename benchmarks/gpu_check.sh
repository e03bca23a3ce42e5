#!/usr/bin/env bash
# The accelerator check in one short run (< 5 minutes by default): issue 16's latency tables
# on the device (MLP, conv nets, one 4096 x 4096 layer at batch 1: int8/int4 weight-only
# against bf16), the `prune` ordinary step against plain adam (issue 16 asks <= 1.10x),
# the pruning overhead, and the int8 / weight-only test files on the device.
#
#   OUT=some/dir bash benchmarks/gpu_check.sh          # from the repository root
#   FULL=1 OUT=some/dir bash benchmarks/gpu_check.sh   # also the accuracy sections and sweep
#
# Uses the JAX already installed (the package is imported from the checkout, not
# installed). Each step has its own time limit and the whole run a budget (BUDGET seconds,
# default 280): a step that would start past it is skipped and says so. The JSON results and
# one log land in $OUT (at most 8 files come back from a device run: 6 here by default).
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
BUDGET=${BUDGET:-280}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT COMMAND...: runs it under its limit, appends to $OUT/steps.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if ((SECONDS + limit > BUDGET)); then
    echo "$name: skipped (would pass the ${BUDGET} s budget at ${SECONDS} s)" | tee -a "$OUT/steps.log"
    return
  fi
  echo "=== $name" >>"$OUT/steps.log"
  timeout "$limit" "$@" >>"$OUT/steps.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
}

{ nvidia-smi -L 2>/dev/null
  "$PY" -c "import jax, flax, optax, chex; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"; } | tee "$OUT/device.txt"

# Latency tables, few rounds (device timings are steadier than this shared CPU's).
step quantization_latency 130 "$PY" benchmarks/quantization.py --latency-only --rounds 5 \
  --out "$OUT/quantization_latency.json"
# prune's ordinary step against plain adam (1.58x on an H200 at ef40789).
step prune_step_variants 45 "$PY" benchmarks/prune_step_variants.py --reps 20 --out-dir "$OUT"
step pruning 45 "$PY" benchmarks/pruning.py --overhead-only --quick --out-dir "$OUT"
# The tests force JAX_PLATFORMS=cpu unless it is set: run these on the accelerator.
JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}" step tests 60 "$PY" -m pytest -q -x \
  -p no:cacheprovider tests/test_quant_int8_ops.py tests/test_quant_weight_only.py \
  tests/test_quant_interceptor.py
if [ -n "${FULL:-}" ]; then
  BUDGET=100000
  step quantization 600 "$PY" benchmarks/quantization.py --quick --out "$OUT/quantization.json"
  step sweep 300 "$PY" benchmarks/sweep.py --epochs 1 --repeats 1 --out-dir "$OUT"
fi
grep -E "^(FAILED|ERROR)" "$OUT/steps.log" | head -n 30
