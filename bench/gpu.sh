#!/usr/bin/env bash
# One prepared GPU check (< 8 min): on a machine whose image has torch/transformers/accelerate but no
# deepspeed, install the carried wheels, then run bench.gpu (1b recipe, zero2, bf16, 30 steps).
#   here:  python3 -m pip wheel --no-deps deepspeed==0.19.8 -w .whl   (+ the pure-python deps it lacks)
#   there: bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
python3 -m bench.gpu
