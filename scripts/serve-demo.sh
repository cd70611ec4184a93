#!/usr/bin/env bash
# Install pyserve with the diffusion, finetune and retrieval extras and serve the built-in demo
# models (a chat model, a text-to-image pipeline, a VAE, a GAN, a forecaster, an embedder and a
# reranker) over the OpenAI and KServe V2 APIs (port 8000) and msgpack (port 8001), with
# fine-tuning jobs and vector stores ready. Extra arguments go to `pyserve serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
# A fixed torch release unless one is installed already: an open range would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[diffusion,finetune,retrieval]"
exec pyserve serve "$@"
