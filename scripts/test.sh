#!/usr/bin/env bash
# Install pyserve with its test dependencies, build the kernels, and run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k sampling). The install and the kernel build
# are skipped when nothing they depend on changed since the last run (PYSERVE_REINSTALL=1 forces them).
set -euo pipefail
cd "$(dirname "$0")/.."
# A fixed torch release unless one is installed already: an open range would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
stamp_file="build/.installed-stamp"
stamp=$( (python -c "import sys; print(sys.prefix)"; cat pyproject.toml setup.py CMakeLists.txt;
          find csrc -type f | sort | xargs cat) | sha256sum | cut -d' ' -f1)
if [ "${PYSERVE_REINSTALL:-0}" != 1 ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] \
   && python -c "import pyserve._C, pyserve_plugins" 2>/dev/null; then
  echo "pyserve is installed and its kernels are built (PYSERVE_REINSTALL=1 to redo)"
else
  python -m pip install --quiet -e ".[test]"
  mkdir -p build && echo "$stamp" > "$stamp_file"
fi
python -m pytest -q --durations=15 "$@"
# The kernels pick AVX-512 or AVX2 paths at run time, and machines have either: on an AVX-512 one,
# the packed-weight and decode-step tests run again on the AVX2 paths.
if [ $# -eq 0 ] && [ "$(python -c 'from pyserve.kernels import cpu; print(cpu.best_isa())')" = avx512 ]; then
  PYSERVE_CPU_ISA=avx2 python -m pytest -q tests/test_quantization.py tests/test_layer_ops.py
fi
