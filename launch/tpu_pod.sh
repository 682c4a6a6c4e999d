#!/usr/bin/env bash
# Train on a Cloud TPU VM (a pod slice or a single host) from your workstation.
#
# usage: TPU_NAME=my-v4-128 ZONE=us-central2-b WORKDIR=gs://bucket/runs/imagen64 \
#          bash launch/tpu_pod.sh [--config.key=value ...]
#
# Three steps, each on every worker of the TPU (gcloud ... --worker=all):
#   sync   copy this working tree (tracked + untracked, not ignored files) to the workers with
#          `gcloud compute tpus tpu-vm scp`, or `git clone` it there (SYNC=git)
#   setup  launch/tpu_setup.sh: venv, the project, jax[tpu] at the pinned version, a device check
#   train  the same `suti train --config CONFIG --workdir WORKDIR --distributed ...` on every worker;
#          jax.distributed.initialize() finds the other workers by itself on Cloud TPU
# Arguments after the options go to `suti train` unchanged (e.g. --config.mesh.fsdp=8).
#
# WORKDIR must be storage that every worker sees: a gs:// bucket (Orbax writes checkpoints there;
# process 0 writes metrics.jsonl and TensorBoard events). Rerunning the same command resumes from the
# latest checkpoint in WORKDIR, so after a spot / preemptible TPU is preempted: recreate it and rerun
# (STEPS=sync,setup,train on a fresh VM, STEPS=train when the workers still have the venv).
#
# environment:
#   TPU_NAME, ZONE  the TPU VM and its zone (required)
#   PROJECT         Google Cloud project (default: gcloud's configured project)
#   WORKDIR         shared run folder, normally gs://... (required)
#   CONFIG          config file (default: configs/imagen64.py)
#   DATA            shards for --config.data.shards, e.g. 'gs://bucket/pairs/*.tar' (default: the config's)
#   STEPS           comma-separated subset of sync,setup,train (default: sync,setup,train)
#   SYNC            scp | git (default: scp)
#   GIT_URL, GIT_REF  for SYNC=git (default: this checkout's origin URL and HEAD commit)
#   REMOTE_DIR      repository folder on the workers, relative to the home folder (default: suti-jax)
#   DETACH=1        start training under nohup and return; logs in ~/REMOTE_DIR/train.log on each worker
#   LIBTPU_INIT_ARGS  passed on to the workers when set (TPU XLA flags)
#   GCLOUD_FLAGS    extra flags for every gcloud call, e.g. "--internal-ip" or "--tunnel-through-iap"
#   SUTI            the suti command on the workers (default: suti, from the venv)
#   DRY_RUN=1       print the commands instead of running them
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
# Prints a command so that it can be pasted back into a shell.
show() {
  local out="" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$arg "; else out+="'${arg//\'/\'\\\'\'}' "; fi
  done
  printf '+ %s\n' "${out% }"
}
run() { show "$@"; if [[ ${DRY_RUN:-0} != 1 ]]; then "$@"; fi; }
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }
# Quotes arguments for the remote shell that gcloud's --command runs.
remote_words() { local out="" arg; for arg in "$@"; do out+="$(printf '%q' "$arg") "; done; printf '%s' "${out% }"; }

if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/imagen64.py}
DATA=${DATA:-}
STEPS=${STEPS:-sync,setup,train}
SYNC=${SYNC:-scp}
REMOTE_DIR=${REMOTE_DIR:-suti-jax}
DETACH=${DETACH:-0}
SUTI=${SUTI:-suti}
[[ -n $TPU_NAME ]] || die "set TPU_NAME (the TPU VM name); see --help"
[[ -n $ZONE ]] || die "set ZONE (the TPU's zone); see --help"
[[ -n $WORKDIR ]] || die "set WORKDIR (shared storage, e.g. gs://bucket/run); see --help"
[[ -f $REPO_DIR/$CONFIG ]] || die "config $CONFIG not found under $REPO_DIR"
[[ $SYNC == scp || $SYNC == git ]] || die "SYNC must be scp or git, got '$SYNC'"
for step in ${STEPS//,/ }; do
  [[ $step == sync || $step == setup || $step == train ]] || die "unknown step '$step' in STEPS (sync,setup,train)"
done
if [[ $WORKDIR != gs://* ]]; then
  echo "tpu_pod.sh: warning: WORKDIR=$WORKDIR is not gs://; on a multi-host pod it must be a folder every" \
       "worker sees at the same path (a gcsfuse or NFS mount)" >&2
fi

read -ra gcloud_flags <<< "${GCLOUD_FLAGS:-}"
tpu_args=(--zone="$ZONE" --worker=all)
[[ -n $PROJECT ]] && tpu_args+=(--project="$PROJECT")
tpu_args+=(${gcloud_flags[@]+"${gcloud_flags[@]}"})  # bash 3 (macOS) rejects an empty "${a[@]}" under set -u
on_all_workers() { run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${tpu_args[@]}" --command="$1"; }
wants() { [[ ",$STEPS," == *",$1,"* ]]; }

if wants sync && [[ $SYNC == scp ]]; then
  tarball="${TMPDIR:-/tmp}/suti-jax-$$.tgz"
  echo "+ git ls-files --cached --others --exclude-standard | tar czf $tarball -C $REPO_DIR --null -T -"
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    trap 'rm -f "$tarball"' EXIT
    (cd "$REPO_DIR" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' path; do [[ -e $path ]] && printf '%s\0' "$path"; done |  # skip deleted files
      tar czf "$tarball" --null -T -)
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:suti-jax.tgz" "${tpu_args[@]}"
  on_all_workers "mkdir -p $(remote_words "$REMOTE_DIR") && tar xzf suti-jax.tgz -C $(remote_words "$REMOTE_DIR") && rm suti-jax.tgz"
elif wants sync; then
  GIT_URL=${GIT_URL:-$(git -C "$REPO_DIR" remote get-url origin 2>/dev/null || true)}
  GIT_REF=${GIT_REF:-$(git -C "$REPO_DIR" rev-parse HEAD)}
  [[ -n $GIT_URL ]] || die "SYNC=git needs GIT_URL (this checkout has no origin remote)"
  dir=$(remote_words "$REMOTE_DIR")
  on_all_workers "if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else git clone --quiet $(remote_words "$GIT_URL") $dir; fi && git -C $dir checkout --quiet --detach $(remote_words "$GIT_REF")"
fi

if wants setup; then
  on_all_workers "cd $(remote_words "$REMOTE_DIR") && bash launch/tpu_setup.sh"
fi

if wants train; then
  train=("$SUTI" train --config "$CONFIG" --workdir "$WORKDIR")
  [[ -n $DATA ]] && train+=("--config.data.shards=$DATA")
  train+=(--distributed "$@")
  prefix="cd $(remote_words "$REMOTE_DIR") && source .venv/bin/activate && "
  [[ -n ${LIBTPU_INIT_ARGS:-} ]] && prefix+="export LIBTPU_INIT_ARGS=$(remote_words "$LIBTPU_INIT_ARGS") && "
  if [[ $DETACH == 1 ]]; then
    on_all_workers "${prefix}nohup $(remote_words "${train[@]}") > train.log 2>&1 < /dev/null &"
    echo "tpu_pod.sh: training started in the background; follow worker 0 with:"
    echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f $REMOTE_DIR/train.log'"
  else
    on_all_workers "${prefix}$(remote_words "${train[@]}")"
  fi
fi
