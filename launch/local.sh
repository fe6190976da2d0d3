#!/usr/bin/env bash
# Runs Di[M]O on this machine, every local device on the data axis.
#
#   launch/local.sh [CONFIG] [WORKDIR] [--config.key=value ...]
#   DRY_RUN=1 launch/local.sh         # print the command instead of running it
#
# CONFIG defaults to configs/digits.py, WORKDIR to runs/<config name>. Rerunning with the same
# WORKDIR resumes from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-configs/digits.py}"
workdir="${2:-runs/$(basename "${config}" .py)}"
shift $(( $# > 2 ? 2 : $# ))
python="${PYTHON:-.venv/bin/python}"
cmd=("${python}" -m dimo_jax.main --config "${config}" --workdir "${workdir}" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
