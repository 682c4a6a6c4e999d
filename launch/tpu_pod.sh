#!/usr/bin/env bash
# Train on a Cloud TPU VM (a pod slice or a single host) from your workstation.
#
# usage: TPU_NAME=my-v4-128 ZONE=us-central2-b MOUNT_BUCKET=my-bucket WORKDIR=/mnt/my-bucket/runs/imagen64 \
#          bash launch/tpu_pod.sh [--config.key=value ...]
#
# Steps, each on every worker of the TPU (gcloud ... --worker=all):
#   sync   copy this working tree (tracked + untracked, not ignored files) to the workers with
#          `gcloud compute tpus tpu-vm scp`, or `git clone` it there (SYNC=git)
#   setup  launch/tpu_setup.sh: venv, the project, jax[tpu] at the pinned version, a device check
#          (and gcsfuse when MOUNT_BUCKET is set)
#   mount  only with MOUNT_BUCKET: `gcsfuse GCSFUSE_FLAGS MOUNT_BUCKET MOUNT_POINT` (skipped where mounted)
#   train  the same `suti train --config CONFIG --workdir WORKDIR --distributed ...` on every worker;
#          jax.distributed.initialize() finds the other workers by itself on Cloud TPU
# Arguments after the options go to `suti train` unchanged (e.g. --config.mesh.fsdp=8).
#
# WORKDIR must be a filesystem path every worker sees: a bucket mounted with gcsfuse on every worker
# (MOUNT_BUCKET does that) or a Filestore NFS mount. `suti train` writes ordinary files there (Orbax
# checkpoints from every process; metrics.jsonl, TensorBoard events, sample grids from process 0) and
# rejects gs:// URLs. Rerunning the same command resumes from the latest checkpoint in WORKDIR, so after a
# spot / preemptible TPU is preempted: recreate it and rerun (the default STEPS on a fresh VM;
# STEPS=mount,train on a restarted one, which still has the venv but lost its mounts).
#
# environment:
#   TPU_NAME, ZONE  the TPU VM and its zone (required)
#   PROJECT         Google Cloud project (default: gcloud's configured project)
#   WORKDIR         run folder every worker sees, e.g. /mnt/my-bucket/runs/x; not a gs:// URL (required)
#   MOUNT_BUCKET    a Cloud Storage bucket to mount on every worker with gcsfuse (default: none)
#   MOUNT_POINT     where to mount it (default: /mnt/MOUNT_BUCKET)
#   GCSFUSE_FLAGS   gcsfuse options (default: --implicit-dirs --rename-dir-limit=200000; Orbax finishes
#                   a checkpoint by renaming its folder, which gcsfuse refuses on a flat bucket without the limit)
#   CONFIG          config file (default: configs/imagen64.py)
#   DATA            shards for --config.data.shards, e.g. 'gs://bucket/pairs/{00000..01023}.tar' (a brace
#                   pattern: * is expanded only for local paths; default: the config's)
#   STEPS           comma-separated subset of sync,setup,mount,train
#                   (default: sync,setup,train, and mount too when MOUNT_BUCKET is set)
#   SYNC            scp | git (default: scp)
#   GIT_URL, GIT_REF  for SYNC=git (default: this checkout's origin URL and HEAD commit)
#   REMOTE_DIR      repository folder on the workers, relative to the home folder (default: suti-jax)
#   DETACH=1        start training under nohup and return; logs in ~/REMOTE_DIR/train.log on each worker
#   LIBTPU_INIT_ARGS  passed on to the workers when set (TPU XLA flags)
#   GCLOUD_FLAGS    extra flags for every gcloud call, e.g. "--internal-ip" or "--tunnel-through-iap"
#   SUTI            the suti command on the workers (default: suti, from the venv)
#   DRY_RUN=1       print the commands instead of running them
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# Quotes arguments for the remote shell that gcloud's --command runs.
remote_words() { local out="" arg; for arg in "$@"; do out+="$(printf '%q' "$arg") "; done; printf '%s' "${out% }"; }

exit_on_help "$@"

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/imagen64.py}
DATA=${DATA:-}
MOUNT_BUCKET=${MOUNT_BUCKET:-}
MOUNT_POINT=${MOUNT_POINT:-/mnt/$MOUNT_BUCKET}
GCSFUSE_FLAGS=${GCSFUSE_FLAGS:---implicit-dirs --rename-dir-limit=200000}
if [[ -n $MOUNT_BUCKET ]]; then STEPS=${STEPS:-sync,setup,mount,train}; else STEPS=${STEPS:-sync,setup,train}; fi
SYNC=${SYNC:-scp}
REMOTE_DIR=${REMOTE_DIR:-suti-jax}
DETACH=${DETACH:-0}
SUTI=${SUTI:-suti}
[[ -n $TPU_NAME ]] || die "set TPU_NAME (the TPU VM name); see --help"
[[ -n $ZONE ]] || die "set ZONE (the TPU's zone); see --help"
[[ -n $WORKDIR ]] || die "set WORKDIR (a folder every worker sees, e.g. /mnt/my-bucket/runs/x); see --help"
[[ $WORKDIR != *://* ]] || die "WORKDIR=$WORKDIR is a URL, but suti train writes ordinary files:" \
  "mount the bucket on every worker (MOUNT_BUCKET=my-bucket runs gcsfuse) and set WORKDIR=/mnt/my-bucket/..."
[[ -f $REPO_DIR/$CONFIG ]] || die "config $CONFIG not found under $REPO_DIR"
[[ $SYNC == scp || $SYNC == git ]] || die "SYNC must be scp or git, got '$SYNC'"
for step in ${STEPS//,/ }; do
  [[ $step =~ ^(sync|setup|mount|train)$ ]] || die "unknown step '$step' in STEPS (sync,setup,mount,train)"
done
if [[ -n $MOUNT_BUCKET ]]; then
  [[ $MOUNT_BUCKET =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "MOUNT_BUCKET is a bucket name (my-bucket), got '$MOUNT_BUCKET'"
  [[ $MOUNT_POINT == /* ]] || die "MOUNT_POINT must be an absolute path, got '$MOUNT_POINT'"
  MOUNT_POINT=${MOUNT_POINT%/}
  if [[ $WORKDIR != "$MOUNT_POINT"/* ]]; then
    echo "tpu_pod.sh: warning: WORKDIR=$WORKDIR is not under MOUNT_POINT=$MOUNT_POINT; on a multi-host pod" \
         "it must be a folder every worker sees at the same path" >&2
  fi
elif [[ ,$STEPS, == *,mount,* ]]; then
  die "STEPS has mount but MOUNT_BUCKET is not set"
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
  setup_env=""
  [[ -n $MOUNT_BUCKET ]] && setup_env="MOUNT_BUCKET=$(remote_words "$MOUNT_BUCKET") "  # installs gcsfuse
  on_all_workers "cd $(remote_words "$REMOTE_DIR") && ${setup_env}bash launch/tpu_setup.sh"
fi

mount_point=$(remote_words "$MOUNT_POINT")
if wants mount; then
  # gcsfuse runs as the ssh user, so that user owns the mount point; a live mount is left as it is.
  # GCSFUSE_FLAGS goes in unquoted: it is a list of options for the worker's shell.
  on_all_workers "if mountpoint -q $mount_point; then echo $mount_point already mounted; else sudo mkdir -p $mount_point && sudo chown \"\$(id -u):\$(id -g)\" $mount_point && gcsfuse ${GCSFUSE_FLAGS} $(remote_words "$MOUNT_BUCKET") $mount_point; fi"
fi

if wants train; then
  train=("$SUTI" train --config "$CONFIG" --workdir "$WORKDIR")
  [[ -n $DATA ]] && train+=("--config.data.shards=$DATA")
  train+=(--distributed "$@")
  prefix="cd $(remote_words "$REMOTE_DIR") && source .venv/bin/activate && "
  # Without its mount, each worker would write its own local WORKDIR and no checkpoint would be whole.
  [[ -n $MOUNT_BUCKET ]] && prefix="mountpoint -q $mount_point || { echo $mount_point is not mounted on \$(hostname): run STEPS=mount >&2; exit 1; }; $prefix"
  [[ -n ${LIBTPU_INIT_ARGS:-} ]] && prefix+="export LIBTPU_INIT_ARGS=$(remote_words "$LIBTPU_INIT_ARGS") && "
  if [[ $DETACH == 1 ]]; then
    on_all_workers "${prefix}nohup $(remote_words "${train[@]}") > train.log 2>&1 < /dev/null &"
    echo "tpu_pod.sh: training started in the background; follow worker 0 with:"
    echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f $REMOTE_DIR/train.log'"
  else
    on_all_workers "${prefix}$(remote_words "${train[@]}")"
  fi
fi
