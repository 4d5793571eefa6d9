#!/usr/bin/env bash
# One GPU session, in the order that matters if time runs out: the tests with
# the compiled kernels, the kernel block/warp sweep, the main-workload
# benchmark (all ops and providers), the V sweep, the packed case, the
# whole-step benchmark (0.5B config, then 1.5B if time is left). Results land in $OUT
# (default benchmarks/results/session). Liger-Kernel is used when importable
# (a wheel in .whl/ is installed to /tmp/site first).
set -uo pipefail
OUT=${OUT:-benchmarks/results/session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"; } \
  | tee "$OUT/env.txt"
timeout 110 python3 -m pytest -q -x -p no:cacheprovider tests/test_logprobs.py tests/test_entropy.py \
  tests/test_codegen.py::test_compiled_kernel_cache_is_bounded_on_gpu tests/test_linear.py tests/test_losses.py \
  tests/test_cuda_graphs.py tests/test_syncs.py tests/test_tail_checks.py \
  > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?"; tail -4 "$OUT/pytest.txt"
timeout 130 python3 -m benchmarks.tune --vs 151936,32000,262144 --out "$OUT/tune.csv" 2>&1 \
  | grep -E "copy|best|BLOCK_V=(4096|8192)"
# The benchmarks below run with the sweep's fastest tile at the main V (if any).
if [ -s "$OUT/tune_best.txt" ]; then export GSPO_KERNELS_LARGE_V=$(cat "$OUT/tune_best.txt"); fi
echo "GSPO_KERNELS_LARGE_V=${GSPO_KERNELS_LARGE_V:-default}" | tee -a "$OUT/env.txt"
timeout 190 python3 -m benchmarks.gpu --sweeps main --out "$OUT/gpu_main.csv" 2>&1 | tee "$OUT/gpu_main.txt" | tail -40
timeout 80 python3 -m benchmarks.gpu --ops sequence_logprobs,token_entropy --sweeps v --no-compile \
  --out "$OUT/gpu_v.csv" 2>&1 | tail -30
timeout 40 python3 -m benchmarks.packed --device cuda --out "$OUT/packed.csv" 2>&1 | tail -4
timeout 150 python3 -m benchmarks.step --configs qwen2-0.5b --out "$OUT/step.csv" 2>&1 | tee "$OUT/step.txt" | tail -20
