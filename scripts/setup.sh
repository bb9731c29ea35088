#!/usr/bin/env bash
# Create .venv and install mmfuse with everything it needs (CPU machine, no hub access needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so nothing below pulls a different build.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# The serve extra (FastAPI + uvicorn) and the export extra (onnx, onnxscript, onnxruntime) too, so the test suite
# covers `mmfuse serve` and `mmfuse export`.
.venv/bin/python -m pip install -q -e ".[dev,serve,export,stream]"
