#!/usr/bin/env bash
# GPU check (run on a CUDA host from the repository root), one script of at most 8 minutes:
#   1. python -m stream.tools.gpucheck (<= 6.5 min): backend equivalence against eager float32, the
#      encoder and whole-path table for batch sizes 1-256, then the step path with the encoder
#      stubbed out for batches of 64 and 256 (path_utt_per_s_b64 / _b256, path_vs_encoder_b256;
#      issue 15's target is >= 0.5). Each row goes to stderr as soon as it is measured.
#   2. the gpu-marked tests (<= 1.5 min): backends vs eager float32, streaming step CUDA vs CPU.
# Extra arguments go to stream.tools.gpucheck (--model DIR, --json, --path-seconds S).
#
# TensorRT rows need torch-tensorrt, which is NOT installed on the lent check machines (its
# libraries come from NVIDIA's package index, which they cannot reach) and has not been run
# by this project. On a GPU host that reaches PyPI and pypi.nvidia.com (README, "Encoder backends"):
#   pip install 'torch==2.14.*'                       # torch-tensorrt 2.14 pins torch 2.14
#   python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > /tmp/torch.txt
#   pip install --constraint /tmp/torch.txt -e '.[tensorrt]'
#   python -c 'import torch_tensorrt, tensorrt; print(torch_tensorrt.__version__, tensorrt.__version__)'
#   deploy/gpu-check.sh       # tensorrt rows appear, with max |tensorrt - eager fp32|
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
status=0
timeout --signal=INT --kill-after=10 390 $PY -m stream.tools.gpucheck "$@" || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu-check: stream.tools.gpucheck ran past 390 s and was stopped; rows measured so far are above (stderr)" >&2
fi
timeout --kill-after=10 80 $PY -m pytest -q -m gpu tests/model/test_backends.py || status=$?
exit "$status"
