#!/usr/bin/env bash
# N training processes on this machine, joined over loopback by jax.distributed (one run, one workdir).
usage() {
  cat <<'EOF'
usage: launch/local.sh [-d DEVICES] N [train flags...]
  Starts N processes of `python -m minillm_jax.train [train flags...]` on this machine as one multi-process run
  (process 0 coordinates on a free 127.0.0.1 port). With NVIDIA GPUs (nvidia-smi) each process gets its share
  of them through CUDA_VISIBLE_DEVICES; otherwise each gets DEVICES CPU devices (default: the cores / N, at
  least 1) through XLA_FLAGS=--xla_force_host_platform_device_count. Output lines are prefixed with [i].
  Waits for all; when one fails the others get LAUNCH_GRACE seconds (default 60) to end by themselves (JAX's
  heartbeat ends them), then are killed. Exit status: 0 when all succeeded, else the first failure's.
  Re-running the same command resumes the run. Example:
    launch/local.sh 2 --config=configs/shakespeare_char.py --workdir=runs/sc2
  Environment: PYTHON (default .venv/bin/python, else python3), LAUNCH_GRACE, MINILLM_HEARTBEAT_TIMEOUT.
EOF
}
set -u
devices=
case "${1:-}" in -h|--help) usage; exit 0;; esac
if [ "${1:-}" = -d ]; then devices=${2:-}; shift 2 || { usage >&2; exit 2; }; fi
case "${1:-}" in ''|*[!0-9]*) usage >&2; exit 2;; esac
n=$1; shift
[ "$n" -ge 1 ] || { echo "N must be at least 1" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python; else py=python3; fi
fi
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') || exit 1
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ "$gpus" -gt 0 ]; then
  [ $((gpus % n)) -eq 0 ] || { echo "launch/local.sh: $gpus GPUs do not split evenly over $n processes" >&2; exit 2; }
  per=$((gpus / n))
else
  cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  per=${devices:-$((cores / n))}
  [ "$per" -ge 1 ] 2>/dev/null || per=1
fi

pids=()
stop_all() {  # $1: signal
  for p in "${pids[@]}"; do kill "-$1" "$p" 2>/dev/null; done
}
trap 'stop_all TERM' TERM
trap 'stop_all INT' INT
i=0
while [ "$i" -lt "$n" ]; do
  if [ "$gpus" -gt 0 ]; then
    first=$((i * per)); list=$first; j=1
    while [ "$j" -lt "$per" ]; do list="$list,$((first + j))"; j=$((j + 1)); done
    dev_env=(CUDA_VISIBLE_DEVICES="$list")
  else
    dev_env=(XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per" JAX_PLATFORMS=cpu)
  fi
  env "${dev_env[@]}" MINILLM_COORDINATOR="127.0.0.1:$port" MINILLM_NUM_PROCESSES="$n" MINILLM_PROCESS_ID="$i" \
    PYTHONUNBUFFERED=1 "$py" -m minillm_jax.train "$@" \
    > >(awk -v p="[$i] " '{ print p $0; fflush() }') 2>&1 &
  pids+=("$!")
  echo "[launch] process $i: pid $!" >&2
  i=$((i + 1))
done

describe() {  # exit status -> words
  if [ "$1" -gt 128 ]; then
    name=$(kill -l "$(($1 - 128))" 2>/dev/null || echo "?")
    echo "exit status $1 (signal $name)"
  else
    echo "exit status $1"
  fi
}

status=0; left=$n; deadline=
done_=()
for _ in "${pids[@]}"; do done_+=(0); done
while [ "$left" -gt 0 ]; do
  for k in "${!pids[@]}"; do
    [ "${done_[$k]}" = 0 ] || continue
    kill -0 "${pids[$k]}" 2>/dev/null && continue
    { wait "${pids[$k]}"; } 2>/dev/null; rc=$?  # (bash's own "Killed ..." job line is replaced by ours)
    done_[$k]=1; left=$((left - 1))
    if [ "$rc" -ne 0 ]; then
      what=$(describe "$rc")
      if [ "$rc" -eq 134 ] && [ "$status" -ne 0 ]; then
        what="$what: JAX's coordination service ended it because another process died"
      fi
      echo "[launch] process $k (pid ${pids[$k]}) failed: $what" >&2
      if [ "$status" -eq 0 ]; then
        status=$rc
        deadline=$(($(date +%s) + ${LAUNCH_GRACE:-60}))
        [ "$left" -gt 0 ] && echo "[launch] waiting up to ${LAUNCH_GRACE:-60} s for the other processes to stop" >&2
      fi
    fi
  done
  if [ -n "$deadline" ] && [ "$left" -gt 0 ] && [ "$(date +%s)" -ge "$deadline" ]; then
    echo "[launch] killing the processes still running" >&2
    stop_all KILL
    deadline=
  fi
  [ "$left" -gt 0 ] && sleep 0.2
done
wait  # the output prefixers
[ "$status" -eq 0 ] && echo "[launch] all $n processes finished" >&2
exit "$status"
