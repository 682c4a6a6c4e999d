#!/usr/bin/env bash
# The toy world end to end on a laptop CPU: write a toy web crawl, then train the toy base model on it.
#
# usage: bash launch/local_cpu.sh [--config.key=value ...]            (from the repository root)
#        DEVICES=8 FSDP=2 bash launch/local_cpu.sh                    (8 simulated devices, mesh 4 x 2)
#        PROCESSES=2 DEVICES=2 bash launch/local_cpu.sh               (2 local processes, a multi-host rehearsal)
#
#   1. `suti data toyweb --out ROOT/toyweb --pages PAGES --image-size 16 ...` (skipped when its shards exist)
#   2. `suti train --config configs/toy.py --workdir ROOT/train --config.data.shards='ROOT/toyweb/*.tar'`
#      for STEPS steps, logging every LOG_EVERY steps and saving every CHECKPOINT_EVERY steps.
# Arguments after the options go to `suti train` unchanged. Rerunning the same command resumes training
# from ROOT/train; SIGTERM makes the trainer save before it exits.
# DEVICES=N splits the CPU into N XLA devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) and
# sets --config.mesh.data=-1 --config.mesh.fsdp=FSDP. PROCESSES=P starts P processes joined by
# --coordinator localhost:PORT --num-processes P --process-id I, with gloo CPU collectives; each reads
# its own slice of the shards. The batch must divide by DEVICES x PROCESSES.
#
# environment:
#   ROOT        folder for the toy web and the run (default: ${TMPDIR:-/tmp}/suti-local)
#   CONFIG      config file (default: configs/toy.py)
#   PAGES       toy web pages (default: 300)      SEED  toy web seed (default: 0)
#   SHARD_SIZE  toy web samples per shard (default: 100, ~17 shards; at least one shard per process)
#   STEPS       training steps (default: 300)     LOG_EVERY  (default: 10)   CHECKPOINT_EVERY  (default: 100)
#   BATCH       batch size (default: the config's, 32)
#   DEVICES     simulated XLA CPU devices per process (default: 1)
#   FSDP        mesh.fsdp when DEVICES or PROCESSES > 1 (default: 1)
#   PROCESSES   local processes (default: 1)      PORT  coordinator port (default: 12355)
#   SUTI        the suti command (default: suti)
#   DRY_RUN=1   print the commands instead of running them
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
is_count() { [[ $1 =~ ^[0-9]+$ && $1 -ge 1 ]]; }

exit_on_help "$@"

ROOT=${ROOT:-${TMPDIR:-/tmp}/suti-local}
CONFIG=${CONFIG:-configs/toy.py}
PAGES=${PAGES:-300}
SEED=${SEED:-0}
SHARD_SIZE=${SHARD_SIZE:-100}
STEPS=${STEPS:-300}
LOG_EVERY=${LOG_EVERY:-10}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-100}
BATCH=${BATCH:-}
DEVICES=${DEVICES:-1}
FSDP=${FSDP:-1}
PROCESSES=${PROCESSES:-1}
PORT=${PORT:-12355}
SUTI=${SUTI:-suti}
[[ -f $CONFIG ]] || die "config $CONFIG not found (run from the repository root)"
for name in PAGES SHARD_SIZE STEPS LOG_EVERY CHECKPOINT_EVERY DEVICES FSDP PROCESSES PORT; do
  is_count "${!name}" || die "$name must be a positive integer, got '${!name}'"
done
[[ -z $BATCH ]] || is_count "$BATCH" || die "BATCH must be a positive integer, got '$BATCH'"
if [[ -n $BATCH ]] && (( BATCH % (DEVICES * PROCESSES) != 0 )); then
  die "BATCH=$BATCH does not divide by DEVICES x PROCESSES = $((DEVICES * PROCESSES))"
fi

toyweb_dir=$ROOT/toyweb
workdir=$ROOT/train
if [[ -f $toyweb_dir/00000.tar ]]; then
  echo "local_cpu.sh: toy web already in $toyweb_dir (delete it to rewrite)"
else
  # Small shards: every process reads its own subset of them, so there must be at least PROCESSES shards.
  run "$SUTI" data toyweb --out "$toyweb_dir" --pages "$PAGES" --seed "$SEED" --image-size 16 \
    --shard-size "$SHARD_SIZE"
fi

train=("$SUTI" train --config "$CONFIG" --workdir "$workdir" "--config.data.shards=$toyweb_dir/*.tar"
       "--config.train.steps=$STEPS" "--config.train.log_every=$LOG_EVERY"
       "--config.train.checkpoint_every=$CHECKPOINT_EVERY")
[[ -n $BATCH ]] && train+=("--config.train.batch_size=$BATCH")
env_vars=()  # run through `env` only when there is something to set
if (( DEVICES > 1 )); then
  xla_flags="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
  env_vars+=("XLA_FLAGS=${xla_flags# }")
fi
if (( DEVICES > 1 || PROCESSES > 1 )); then
  train+=(--config.mesh.data=-1 "--config.mesh.fsdp=$FSDP")
fi

if (( PROCESSES == 1 )); then
  if (( ${#env_vars[@]} )); then run env "${env_vars[@]}" "${train[@]}" "$@"; else run "${train[@]}" "$@"; fi
  exit 0
fi

# Several processes on this machine, as on a multi-host pod. CPU collectives across processes need gloo.
env_vars+=(JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo)
[[ ${DRY_RUN:-0} == 1 ]] || mkdir -p "$ROOT"
pids=()
stop_all() { local pid; for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < PROCESSES; i++)); do
  cmd=(env ${env_vars[@]+"${env_vars[@]}"} "${train[@]}" --distributed --coordinator "localhost:$PORT"
       --num-processes "$PROCESSES" --process-id "$i" "$@")
  log=$ROOT/process-$i.log
  printf '%s > %s 2>&1 &\n' "$(show "${cmd[@]}")" "$log"
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    "${cmd[@]}" > "$log" 2>&1 &
    pids+=($!)
  fi
done
[[ ${DRY_RUN:-0} != 1 ]] || exit 0
echo "local_cpu.sh: $PROCESSES processes started; logs: $ROOT/process-*.log"
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    status=1
    echo "local_cpu.sh: process $i failed; last lines of $ROOT/process-$i.log:" >&2
    tail -n 20 "$ROOT/process-$i.log" >&2 || true
    stop_all  # the others would wait forever in a collective
  fi
done
tail -n 3 "$ROOT/process-0.log"
exit "$status"
