# Helpers shared by the launch scripts: usage (the calling script's header comment), show (a command, quoted
# to paste back into a shell), run (show it, then run it unless DRY_RUN=1), die (a one-line error naming the
# calling script, exit 2) and exit_on_help (the --help / -h check).
# Each script sources it right after `set -euo pipefail`:
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# slurm_multinode.sbatch keeps its own copies: sbatch runs it from a spool folder, away from this file.

# $0 is the calling script, also inside these functions.
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
die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
# Call with the script's arguments: prints the usage and exits when the first one asks for help.
exit_on_help() { if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi; }
