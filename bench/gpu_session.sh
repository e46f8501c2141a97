#!/usr/bin/env bash
# One device-tool call's worth of GPU checks, results under $OUT (under 10 minutes on an H100/H200):
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
# 1. GPU tests (bf16/fp32 against float64, TMA and pointer paths, grouped_mm dispatch, CUDA-graph
#    decode, transformers models on the "pdmoe" experts), 2. kernel benchmarks (pdmoe with and without grouped_mm
#    dispatch, the eager loop, grouped_mm; % of dense matmul; decode GB/s with and without graphs),
# 3. the Hopper compile report of this machine's Triton, 4. model and CPT benchmarks if time is left.
# Each stage has its own time limit, so a hang in one still leaves the others' results under $OUT.
# The machine already has torch/triton/transformers/safetensors/accelerate/pytest-benchmark; only
# pdmoe itself is installed here, without touching those.
set -uo pipefail
OUT=${OUT:-/tmp/pdmoe-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$SECONDS
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, show the tail
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, ${SECONDS}s elapsed)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "exit $? after $((SECONDS - START))s" | tee -a "$OUT/$name.log"
  tail -25 "$OUT/$name.log"
}

stage tests 150 python3 -m pytest -q -m gpu tests/
stage bench_kernels 300 python3 -m pytest --benchmark -q bench/bench_kernels.py \
  --benchmark-json="$OUT/bench_kernels.json" --benchmark-columns=median,ops
stage compile_report 90 python3 tests/test_kernels_compile.py --report --jobs "$(nproc)"
LEFT=$((570 - (SECONDS - START)))
if [ "$LEFT" -gt 60 ]; then
  stage bench_model "$LEFT" python3 -m pytest --benchmark -q bench/bench_model.py bench/bench_cpt.py \
    --benchmark-json="$OUT/bench_model.json" --benchmark-columns=median,ops
fi
python3 - "$OUT/bench_kernels.json" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
try:
    runs = json.load(open(sys.argv[1]))["benchmarks"]
except (OSError, ValueError, KeyError):
    sys.exit("no kernel benchmark results")
for run in runs:
    info = run.get("extra_info", {})
    pct = info.get("pct_of_dense_bf16", info.get("pct_of_copy_bw", 0))
    rate = f"{info['tflops']:7.1f} TF/s" if "tflops" in info else f"{info.get('weight_gb_per_s', 0):7.0f} GB/s"
    print(f"{run['name'][:90]:90} {info.get('ms', 0):9.3f} ms {rate} {pct:5.1f} %")
EOF
