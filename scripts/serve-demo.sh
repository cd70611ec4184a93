#!/usr/bin/env bash
# Install pyserve and serve a tiny random Llama made on the spot over the OpenAI API (port 8000)
# and msgpack (port 8001). Extra arguments go to `pyserve serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
# A fixed torch release unless one is installed already: an open range would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
model_dir="${PYSERVE_DEMO_DIR:-${TMPDIR:-/tmp}/pyserve-tiny-llama}"
[ -f "$model_dir/config.json" ] || python scripts/make_tiny_model.py "$model_dir"
exec pyserve serve "$model_dir" --served-model-name tiny-llama "$@"
