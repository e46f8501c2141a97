#!/usr/bin/env bash
# One device-tool call's worth of GPU checks (build, correctness, timing), results under $OUT:
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
# The GPU machine already has torch/triton/transformers/safetensors/accelerate/pytest-benchmark;
# only pdmoe itself is installed here, without touching those.
set -uo pipefail
OUT=${OUT:-/tmp/pdmoe-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"

# Correctness: bf16/fp32 kernels against float64, CUDA-graph decode, the model on the Triton path.
python3 -m pytest -q -x tests/test_kernels_gpu.py tests/test_kernels_moe_mlp.py tests/test_model_parts.py \
  2>&1 | tee "$OUT/tests.log" | tail -15
python3 tests/test_kernels_compile.py --all 2>&1 | tail -3 | tee -a "$OUT/tests.log"

# Timing: kernels vs the eager loop and grouped_mm, then model and CPT throughput.
python3 -m pytest --benchmark -q bench/bench_kernels.py bench/bench_model.py bench/bench_cpt.py \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=min,mean,ops 2>&1 | tee "$OUT/bench.log" | tail -40
