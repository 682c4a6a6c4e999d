#!/usr/bin/env bash
# Train on one GPU machine: a single process that drives all of its GPUs.
#
# usage: WORKDIR=/data/runs/imagen64 bash launch/gpu_single_node.sh [--config.key=value ...]
#
# Runs `suti train --config CONFIG --workdir WORKDIR ...` once (no --distributed: one process sees every
# local GPU as a device of the mesh). Arguments after the options go to `suti train` unchanged,
# e.g. --config.mesh.data=-1 --config.mesh.fsdp=8 --config.model.dtype=bfloat16.
# Rerunning the same command resumes from the latest checkpoint in WORKDIR; Ctrl-C or SIGTERM makes the
# trainer save before it exits.
#
# Install JAX for CUDA first (in the project's venv), at the version pinned in setup.py:
#   pip install -e ".[dev]" && pip install "jax[cuda12]==<version>"    (jax[cuda13] for CUDA 13 drivers)
#
# environment:
#   WORKDIR      run folder: checkpoints, metrics.jsonl, TensorBoard events (required)
#   CONFIG       config file (default: configs/imagen64.py)
#   DATA         shards for --config.data.shards (default: the config's)
#   GPUS         which GPUs, as CUDA_VISIBLE_DEVICES (default: all; e.g. GPUS=0,1,2,3)
#   MEM_FRACTION share of each GPU's memory JAX preallocates, XLA_PYTHON_CLIENT_MEM_FRACTION (default: 0.90)
#   GPU_XLA_FLAGS  XLA flags added to XLA_FLAGS (default: --xla_gpu_enable_latency_hiding_scheduler=true,
#                which overlaps FSDP all-gathers / reduce-scatters with compute)
#   SUTI         the suti command (default: suti)
#   DRY_RUN=1    print the command instead of running it
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

exit_on_help "$@"

WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/imagen64.py}
DATA=${DATA:-}
GPUS=${GPUS:-}
MEM_FRACTION=${MEM_FRACTION:-0.90}
GPU_XLA_FLAGS=${GPU_XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}
SUTI=${SUTI:-suti}
[[ -n $WORKDIR ]] || die "set WORKDIR (the run folder); see --help"
[[ -f $CONFIG ]] || die "config $CONFIG not found (run from the repository root or give a path)"

env_vars=("XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
xla_flags="${XLA_FLAGS:-} $GPU_XLA_FLAGS"
env_vars+=("XLA_FLAGS=${xla_flags# }")
[[ -n $GPUS ]] && env_vars+=("CUDA_VISIBLE_DEVICES=$GPUS")

train=("$SUTI" train --config "$CONFIG" --workdir "$WORKDIR")
[[ -n $DATA ]] && train+=("--config.data.shards=$DATA")
run env "${env_vars[@]}" "${train[@]}" "$@"
