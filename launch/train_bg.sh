#!/usr/bin/env bash
# Starts a training run detached from the terminal (survives logout), logging to <workdir>/train.log.
#   launch/train_bg.sh configs/tiny.py runs/tiny [--config.optim.lr=3e-4 ...]
# CONFIG and WORKDIR are relative to the current directory (a CONFIG not found there: to the repository).
# Follow it with: python -m minillm_jax.status --workdir=runs/tiny  (or tail -f runs/tiny/train.log)
# Stop it with:   kill <pid>   (SIGTERM: finishes the step, saves, exits; re-run this script to resume)
set -euo pipefail
usage="usage: $0 CONFIG WORKDIR [overrides...]"
case "${1:-}" in -h|--help) echo "$usage"; exit 0;; esac
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
abs() { case $1 in /*) printf '%s\n' "$1";; *) printf '%s\n' "$PWD/$1";; esac; }  # (realpath -m is GNU-only)
config=$1; workdir=$(abs "$2"); shift 2
[ -e "${config%%:*}" ] && config=$(abs "$config")  # else it names a file in the repository
cd "$(dirname "$0")/.."
make -s setup
mkdir -p "$workdir"
# the venv make set up: .venv, or the VENV an outer `make VENV=...` passes down (the 3.12 lane's .venv312)
nohup "${VENV:-.venv}/bin/python" -m minillm_jax.train --config="$config" --workdir="$workdir" "$@" \
  >> "$workdir/train.log" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 20); do  # refusals (a locked workdir, a bad config, missing data) come within seconds
  sleep 0.5
  kill -0 "$pid" 2>/dev/null && continue
  if wait "$pid"; then echo "pid $pid finished already: $workdir/train.log"; exit 0; fi
  echo "training stopped at once; the end of $workdir/train.log:" >&2
  tail -n 3 "$workdir/train.log" >&2
  exit 1
done
echo "started pid $pid -> $workdir/train.log"
