#!/usr/bin/env bash
# Starts a training run detached from the terminal (survives logout), logging to <workdir>/train.log.
#   launch/train_bg.sh configs/tiny.py runs/tiny [--config.optim.lr=3e-4 ...]
# Follow it with: python -m minillm_jax.status --workdir=runs/tiny  (or tail -f runs/tiny/train.log)
# Stop it with:   kill <pid>   (SIGTERM: finishes the step, saves, exits; re-run this script to resume)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 CONFIG WORKDIR [overrides...]" >&2; exit 2; }
config=$1; workdir=$2; shift 2
make -s setup
mkdir -p "$workdir"
nohup .venv/bin/python -m minillm_jax.train --config="$config" --workdir="$workdir" "$@" \
  >> "$workdir/train.log" 2>&1 < /dev/null &
echo "started pid $! -> $workdir/train.log"
