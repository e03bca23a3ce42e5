#!/usr/bin/env bash
# The accelerator check, in one short run: the benchmarks of issues 3, 4 and 6 (int8 paths,
# pruning overhead, vmapped sweep) and the int8/pruning test files, on the default backend.
#
#   OUT=some/dir bash benchmarks/gpu_check.sh     # from the repository root
#
# Uses the JAX already installed (the package is imported from the checkout, not
# installed). Each step has its own time limit; the JSON results and one log land in $OUT.
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
LIMIT=${LIMIT:-150}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: runs it under the time limit, appends to $OUT/steps.log
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== $name" >>"$OUT/steps.log"
  timeout "$LIMIT" "$@" >>"$OUT/steps.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
}

{ nvidia-smi -L 2>/dev/null
  "$PY" -c "import jax, flax, optax, chex; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"; } | tee "$OUT/device.txt"

# At most 8 files come back from a device run: 6 here (device, log, 4 JSON).
step quantization "$PY" benchmarks/quantization.py ${QUICK:+--quick} --out "$OUT/quantization.json"
# --overhead-only keeps the CPU accuracy section, with that run's own provenance.
step pruning "$PY" benchmarks/pruning.py --overhead-only ${QUICK:+--quick} --out-dir "$OUT"
step prune_step_variants "$PY" benchmarks/prune_step_variants.py ${QUICK:+--reps 20} \
  --out-dir "$OUT"
step sweep "$PY" benchmarks/sweep.py ${QUICK:+--epochs 1 --repeats 1} --out-dir "$OUT"
# The tests force JAX_PLATFORMS=cpu unless it is set: run these on the accelerator.
JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}" step tests "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_quant_int8_ops.py tests/test_quant_interceptor.py tests/test_quant_core.py \
  tests/test_prune_select.py tests/test_prune_transform.py
grep -E "^(FAILED|ERROR)" "$OUT/steps.log" | head -n 30
