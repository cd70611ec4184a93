#!/usr/bin/env bash
# Install pyserve with its test dependencies, build the kernels, and run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k sampling).
set -euo pipefail
cd "$(dirname "$0")/.."
# A fixed torch release unless one is installed already: an open range would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
python -m pytest -q "$@"
