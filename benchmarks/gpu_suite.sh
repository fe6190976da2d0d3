#!/usr/bin/env bash
# The device suite in one command on a GPU machine whose image lacks ml-collections (and
# tensorflow, tfds, clu, which the suite does not import): installs the wheels of .whl/ (if
# any) into a private folder, then runs benchmarks/gpu_suite.py with its output under $OUT.
#
#   bash benchmarks/gpu_suite.sh [--budget_s 480] [--size real|tiny] [--sections ...]
#
# Fill .whl/ once where pip reaches PyPI (README, "On one GPU: the device suite"):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl ml-collections==1.1.0
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dimo_jax_site .whl/*.whl
  export PYTHONPATH="/tmp/dimo_jax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PYTHON" benchmarks/gpu_suite.py --out "${OUT:-gpu_suite_out}" "$@"
