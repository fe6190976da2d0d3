#!/usr/bin/env bash
# Runs Di[M]O on every worker of a Cloud TPU VM pod slice, from a workstation, in one command.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b CONFIG=configs/maskgit_imagenet256.py \
#     WORKDIR=/mnt/bucket/runs/imagenet launch/tpu_pod.sh [--config.key=value ...]
#   DRY_RUN=1 ... launch/tpu_pod.sh    # print the gcloud command instead of running it
#
# Variables (the first four are required):
#   TPU_NAME  the TPU VM (pod slice) name, as in `gcloud compute tpus tpu-vm list`
#   ZONE      its zone
#   CONFIG    the config file, a path inside REPO_DIR on the workers
#   WORKDIR   checkpoints, samples and metrics; every worker writes its shards of each
#             checkpoint there, so it must be shared: a bucket mounted with gcsfuse at the
#             same path on every worker (metrics and grids use local file APIs, not gs://)
#   PROJECT   the Google Cloud project (default: gcloud's configured one)
#   REPO_DIR  where this repository is checked out on every worker (default: ~/dimo_jax); it is
#             expanded by the workers' shell, so `~` and `$HOME` work
#   SETUP     a command each worker runs first, e.g. "pip install -e .[tpu] -c constraints.txt"
#   PYTHON    the workers' Python (default: python3)
#
# Each worker starts the same `python -m dimo_jax.main`; JAX finds the other workers from the
# TPU metadata (dimo_jax/distributed.py). Rerunning with the same WORKDIR resumes.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM pod slice name}"
: "${ZONE:?set ZONE to the zone of the TPU VM}"
: "${CONFIG:?set CONFIG to the config file (a path inside REPO_DIR)}"
: "${WORKDIR:?set WORKDIR to a directory every worker can write, e.g. a gcsfuse mount}"
repo_dir="${REPO_DIR:-~/dimo_jax}"

train=("${PYTHON:-python3}" -m dimo_jax.main --config "${CONFIG}" --workdir "${WORKDIR}" "$@")
remote="cd ${repo_dir} && "
if [[ -n "${SETUP:-}" ]]; then
  remote+="${SETUP} && "
fi
remote+="$(printf '%q ' "${train[@]}")"
cmd=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  cmd+=(--project "${PROJECT}")
fi
cmd+=(--worker=all --command "${remote% }")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
