#!/usr/bin/env bash
# One command for a lent GPU machine: build the CUDA kernels in place for sm_90, run every
# GPU-marked test and the engine on CUDA, time the kernels and the LLM engine, and leave a summary
# and the JSON results in $OUT (default build/gpu-check). About 8 minutes; --quick about 3.
#
#   scripts/gpu-check.sh [--quick]          on the GPU machine (Python 3.12, torch+CUDA, Triton, nvcc)
#   scripts/gpu-check.sh --fetch-wheels     here, first: packages that machine lacks, into .whl/
#
# The machine has no network: what it lacks travels as wheels in .whl/ (ignored by git; pass it
# in the device tool's `carry`). Every step has its own time limit, and a failing step does not
# stop the later ones: the summary says what passed, what failed and what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=("diffusers==0.42.1")  # the reference schedulers of tests/test_denoise.py
GPU_TESTS=(tests/test_attention.py tests/test_sampling.py tests/test_denoise.py tests/test_gpu.py
           tests/test_quantization.py tests/test_layer_ops.py)

if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls -l .whl
  exit 0
fi

quick=0
[ "${1:-}" = "--quick" ] && quick=1
OUT="${OUT:-build/gpu-check}"
mkdir -p "$OUT"
summary="$OUT/summary.md"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the outcome
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  printf '| %s | %s | %ss |\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)")" \
    "$(( $(date +%s) - start ))" >> "$summary"
  tail -3 "$OUT/$name.log"
}

{
  echo "# pyserve GPU check ($([ $quick = 1 ] && echo quick || echo full)), $(date -u +%FT%TZ)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  python3 -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')"
  nvcc --version 2>/dev/null | tail -1
  echo
  echo "| step | result | time |"
  echo "| --- | --- | --- |"
} > "$summary"

# Build: the C++ and CUDA extensions in place (no isolation, no downloads), Hopper code only.
step build 240 env PYSERVE_CUDA=1 PYSERVE_CUDA_ARCHS=90-real \
  python3 -m pip install --no-build-isolation --no-deps --no-index -e .
step backends 60 python3 -c "
from pyserve import kernels; from pyserve.kernels import cuda
print('back-ends:', kernels.available(), '| cuda:', cuda.UNAVAILABLE_REASON or 'ok', cuda._C_cuda.versions())
assert {'cuda', 'triton'} <= set(kernels.available())"

# Tests: everything marked gpu in the kernel and engine suites (the back-end cases on "cuda", and
# tests/test_gpu.py, whose last test runs the engine on CUDA against the CPU). The server suites
# need packages that machine lacks and have no GPU cases.
if [ $quick = 1 ]; then
  step gpu-tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" \
    -k "not 256000 and not 152064 and not 1e8 and not 2_to_the_31" --junitxml="$OUT/gpu-tests.xml"
else
  step gpu-tests 270 python3 -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" --junitxml="$OUT/gpu-tests.xml"
fi

# Timings: kernels against torch baselines and the card's measured peaks; the engine on CUDA.
if [ $quick = 1 ]; then
  step bench-kernels 60 python3 bench/kernel_ops.py --gpu-only --quick --ops prefill,decode --results "$OUT"
else
  step bench-kernels 100 python3 bench/kernel_ops.py --gpu-only --results "$OUT"
  step bench-llm 80 python3 bench/llm_throughput.py --device cuda --quick --requests 64 --results "$OUT"
fi

python3 - "$OUT" >> "$summary" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
gpu = out / "kernels-gpu.json"
if gpu.exists():
    data = json.loads(gpu.read_text())
    print(f"\nKernels on {data['device']}: copy {data['copy_bandwidth_gbs']} GB/s, "
          f"bf16 matmul {data.get('bf16_matmul_tflops')} TFLOP/s (measured)\n")
    print("| op | case | backend | ours ms | baseline | speed-up | extra |\n| --- | --- | --- | ---: | --- | ---: | --- |")
    for r in data["rows"]:
        extra = ", ".join(f"{k}={r[k]}" for k in ("gflops", "pct_of_bf16_peak", "gb_per_s", "pct_of_copy_bw") if k in r)
        print(f"| {r['op']} | {r['case']} | {r['backend']} | {r['ours_ms']} | {r['baseline']} {r['baseline_ms']} ms | "
              f"{r['speedup']}x | {extra} |")
for llm in out.glob("llm-throughput*.json"):
    d = json.loads(llm.read_text())
    print(f"\nLLM engine on {d['device']} ({d['dtype']}): {d['pyserve_tokens_per_s']} tokens/s vs transformers "
          f"{d['transformers_tokens_per_s']} ({d['throughput_ratio']}x); batch-1 decode {d['batch1_decode_tokens_per_s']} tokens/s")
PY
echo
cat "$summary"
exit $status
