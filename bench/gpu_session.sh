#!/usr/bin/env bash
# A first-contact GPU session in one device-tool call, under 480 s, results under $OUT as they come:
#   run(command="bash bench/gpu_session.sh", timeout_s=540)
# 1. smoke        every kernel launched once on its own (compile time, error vs float64, traceback),
#                 then the fallbacks (PyTorch reference, torch._grouped_mm)          bench/gpu_smoke.py
# 2. correctness  the gpu-marked tests, -x off, junit XML                           tests/test_kernels_gpu.py
# 3. table        bf16 training shapes fwd / fwd+bwd against loop and grouped_mm, % of a dense matmul;
#                 decode GB/s against the copy bandwidth, with and without a CUDA graph  bench/gpu_table.py
# 4. if time is left: a bounded tile search (bench/gpu_tiles.py), then the CPT step (bench/bench_cpt.py).
# Every stage has its own limit, cut to what is left of the 480 s, so a hang in one still leaves the
# others' results. Without a GPU this is a rehearsal (kernels in Triton's interpreter, tiny shapes,
# limits x4): every stage must run to its end or skip with its reason, so that the GPU call can fail
# only where the GPU differs. The device machine has torch/triton/transformers/safetensors/accelerate/
# pytest-benchmark and no registry: only pdmoe itself is installed, without touching those.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pdmoe-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
TOTAL=480
SCALE=1
if ! nvidia-smi >/dev/null 2>&1; then
  SCALE=4
  TOTAL=$((TOTAL * SCALE))
  echo "no GPU: a CPU rehearsal (limits x$SCALE)" | tee "$OUT/device.txt"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
if ! python3 -c "import torch, triton, transformers, pdmoe; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/device.txt"; then
  echo "pdmoe does not import here: nothing else can run"
  exit 1
fi

left() { echo $((TOTAL - (SECONDS - START))); }

stage() {  # stage NAME SECONDS COMMAND...: at most SECONDS (x SCALE, and no more than is left), logged
  local name=$1 limit=$(($2 * SCALE)) rc
  shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 20 ]; then
    echo "== $name skipped: $(left) s left of ${TOTAL} s" | tee "$OUT/$name.log"
    return
  fi
  echo "== $name (limit ${limit}s, $((SECONDS - START))s elapsed)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "(stopped at its ${limit} s limit)" >>"$OUT/$name.log"
  echo "exit $rc after $((SECONDS - START))s" | tee -a "$OUT/$name.log"
}

stage smoke 60 python3 bench/gpu_smoke.py --out "$OUT/smoke"
grep -E "^(FAIL|[0-9]+ of [0-9]+ steps)" "$OUT/smoke.log"
stage tests 120 python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" -o junit_family=xunit1
tail -4 "$OUT/tests.log"
stage table 170 python3 bench/gpu_table.py --out "$OUT/table" --budget-s $((140 * SCALE))
stage tiles 90 python3 bench/gpu_tiles.py --out "$OUT/tiles" --budget-s $((70 * SCALE))
stage cpt 120 python3 -m pytest --benchmark -q bench/bench_cpt.py -p no:cacheprovider

echo "== summary after $((SECONDS - START))s"
cat "$OUT/table/table.md" 2>/dev/null || echo "no table"
python3 - "$OUT/tiles/tiles.json" <<'EOF'
import json, sys
try:
    best = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit("no tile search results")
for kernel, shapes in best.items():
    for shape, found in shapes.items():
        print(f"tiles {kernel:<12} {shape:<22} {found['ms']:.3f} ms shipped best: {found['shipped_is_best']}")
EOF
grep -E "tok/s|step" "$OUT/cpt.log" | tail -4
