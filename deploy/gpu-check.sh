#!/usr/bin/env bash
# GPU check (run on a CUDA host from the repository root): backend equivalence against eager
# float32, the encoder table for batch sizes 1-256, and the GPU-marked tests.
# TensorRT rows need `pip install 'emotion-monitor[tensorrt]'`; without it they are skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
$PY -m model.gpucheck "$@"
$PY -m pytest -q -m gpu tests/model/test_backends.py
