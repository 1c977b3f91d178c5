#!/usr/bin/env bash
# The prepared GPU check (one run on a lent H100/H200, under 9 minutes; the GPU machine has
# torch, triton, transformers and peft, no vLLM and no package registry). It runs, each step
# with its own time limit so one hang cannot eat the budget:
#   1. the kernel correctness tests on CUDA (tests/test_ops.py: Triton compiled, the CUDA op,
#      CUDA-graph capture of the ops, the Triton prefill pooler; tests/test_cuda_source.py: nvcc
#      builds of csrc/; tests/test_prefill.py: the prefill generator vs generate_vectors on CUDA);
#   2. the kernel bandwidth benchmark (benchmarks/kernels/bench_gather_scale.py) and the prefill
#      generator per step, old path vs Triton pooler vs torch pooler (bench_prefill_pool.py);
#   3. CUDA-graph capture of the decode scaling in a torch decode loop, checked replay by replay
#      (benchmarks/kernels/cuda_graph_decode.py);
#   4. the transformers-level PEDRO vs multi-LoRA decode comparison (benchmarks/hf_decode_compare.py).
# Results go to $OUT (the device tool's output folder) or the folder given, then are
# committed under benchmarks/results/gpu/.
#
#   run: bash benchmarks/gpu_check.sh            (carry .gpu_wheels if pytest is missing there:
#        pip download pytest -d .gpu_wheels, then carry=[".gpu_wheels"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
start=$(date +%s)
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/$name.txt"
}
"$PY" - > "$OUT/env.json" <<'PYEOF'
import json, platform, torch
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = repr(e)
print(json.dumps(info))
PYEOF
cat "$OUT/env.json"
"$PY" -m pytest --version >/dev/null 2>&1 || "$PY" -m pip install --no-index --find-links .gpu_wheels pytest >/dev/null 2>&1
step kernel_tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops.py tests/test_cuda_source.py \
    tests/test_prefill.py
step bench_gather_scale 120 "$PY" benchmarks/kernels/bench_gather_scale.py --out "$OUT"
step bench_prefill_pool 60 "$PY" benchmarks/kernels/bench_prefill_pool.py --out "$OUT"
step cuda_graph_decode 60 "$PY" benchmarks/kernels/cuda_graph_decode.py --out "$OUT/cuda_graph_decode.json"
step hf_decode_compare 150 "$PY" benchmarks/hf_decode_compare.py --model random:smollm2-135m --batch-sizes 8 64 \
    --num-tenants 1 8 32 --output-len 32 --output-json "$OUT/hf_decode_compare.json"
echo "gpu_check: $(( $(date +%s) - start )) s in all" | tee -a "$OUT/summary.txt"
