#!/usr/bin/env bash
# Set up SuTI-JAX on one Cloud TPU VM worker (tpu_pod.sh runs it on every worker at once).
#
# usage: bash launch/tpu_setup.sh [--help]      (run from the repository root on the TPU VM)
#
# Creates a virtual environment, installs the project with its dev extras, installs jax[tpu] at the
# version pinned in setup.py (so jax, jaxlib and libtpu match), and checks that JAX sees the TPU chips.
# Run it on all workers of a pod at the same time: TPU initialisation waits for every host of the slice,
# so the check hangs on a lone worker. Rerunning is safe (the venv is reused, pip skips what is there).
# With MOUNT_BUCKET set it also installs gcsfuse from Google's apt repository (if it is not on PATH);
# tpu_pod.sh then mounts the bucket.
#
# environment (all optional):
#   PYTHON       interpreter for the venv (default: the first of python3.12, python3.11 on PATH; needs >= 3.11)
#   VENV         venv folder (default: .venv in the repository root)
#   EXTRAS       pip extras of the project (default: dev)
#   JAX_VERSION  jax version for jax[tpu] (default: the jax==X pin read from setup.py)
#   LIBTPU_LINKS pip --find-links page for libtpu (default: Google's libtpu release page)
#   TORCH_INDEX  extra pip index for torch; the CPU wheels avoid GBs of CUDA (default: PyTorch's cpu index)
#   MOUNT_BUCKET when set (to the bucket tpu_pod.sh mounts), install gcsfuse with apt (needs sudo)
#   DRY_RUN=1    print the commands instead of running them
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

exit_on_help "$@"
[[ $# -eq 0 ]] || die "unexpected arguments: $* (see --help)"

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_DIR"
[[ -f setup.py ]] || die "setup.py not found in $REPO_DIR"

if [[ -z ${PYTHON:-} ]]; then
  for candidate in python3.12 python3.11; do
    if command -v "$candidate" >/dev/null; then PYTHON=$candidate; break; fi
  done
fi
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$REPO_DIR/.venv}
EXTRAS=${EXTRAS:-dev}
JAX_VERSION=${JAX_VERSION:-$(sed -n 's/.*"jax==\([0-9.]*\)".*/\1/p' setup.py | head -n1)}
[[ -n $JAX_VERSION ]] || die "no jax==X pin found in setup.py; set JAX_VERSION"
LIBTPU_LINKS=${LIBTPU_LINKS:-https://storage.googleapis.com/jax-releases/libtpu_releases.html}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

if [[ ${DRY_RUN:-0} != 1 ]]; then
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python >= 3.11 (TPU VM images ship 3.10)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is $("$PYTHON" -V 2>&1); the project needs Python >= 3.11 (set PYTHON=...)"
fi

if [[ ! -x $VENV/bin/python ]]; then run "$PYTHON" -m venv "$VENV"; fi
run "$VENV/bin/python" -m pip install --upgrade pip
run "$VENV/bin/python" -m pip install --extra-index-url "$TORCH_INDEX" -e ".[$EXTRAS]"
run "$VENV/bin/python" -m pip install "jax[tpu]==$JAX_VERSION" -f "$LIBTPU_LINKS"
if [[ -n ${MOUNT_BUCKET:-} ]] && ! command -v gcsfuse >/dev/null; then
  codename=$( (. /etc/os-release && echo "${VERSION_CODENAME:-}") 2>/dev/null || true)
  [[ -n $codename || ${DRY_RUN:-0} == 1 ]] || die "no VERSION_CODENAME in /etc/os-release; install gcsfuse by hand"
  keyring=/usr/share/keyrings/cloud.google.asc
  run sudo curl -fsSL -o "$keyring" https://packages.cloud.google.com/apt/doc/apt-key.gpg
  run sudo sh -c "echo 'deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-${codename:-CODENAME} main' > /etc/apt/sources.list.d/gcsfuse.list"
  run sudo apt-get update -q
  run sudo apt-get install -y -q gcsfuse
fi
run "$VENV/bin/python" -c \
  "import jax; print(f'process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, {jax.device_count()} total devices ({jax.devices()[0].platform})')"
echo "tpu_setup.sh: done; activate with: source $VENV/bin/activate"
