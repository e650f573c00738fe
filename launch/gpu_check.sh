#!/usr/bin/env bash
# The one script to run when an NVIDIA GPU machine is at hand: install, see the GPUs, GPU tests, a short bench.
usage() {
  cat <<'USAGE'
usage: launch/gpu_check.sh [--no-install]
  On a fresh Linux machine with an NVIDIA GPU and its driver, from the repository:
    1. creates .venv (PYTHON, default python3.11 or python3) and installs the package with the gpu, torch and dev
       extras (pip -c constraints/py3XX-test.txt: the lock file of that Python; jax[cuda12] brings its own CUDA);
    2. prints jax.devices() and fails unless they are GPUs;
    3. runs the GPU test subset (pytest -m gpu: tests marked gpu, skipped on machines without one);
    4. runs a short `python -m minillm_jax.bench` of tiny's train step (JAX float32 and bfloat16, the torch
       mirror compiled under bf16 autocast; MFU against the GPU's datasheet peak) into bench_out/gpu_check/;
  then prints one summary: each step's result and seconds. Meant to take under 8 minutes (the install most of
  it). --no-install reuses an existing .venv. Exit status: 0 when every step passed.
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0;; esac
install=1
if [ "${1:-}" = --no-install ]; then install=0; shift; fi
[ $# -eq 0 ] || { usage >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 1
results=(); failed=0
step() {  # step NAME COMMAND...: runs it, records its result and seconds
  name=$1; shift
  echo "=== $name: $*"
  t0=$(date +%s)
  "$@"; rc=$?
  dt=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then results+=("ok    ${dt}s  $name"); else results+=("FAIL  ${dt}s  $name (exit $rc)"); failed=1; fi
  return "$rc"
}
summary() {
  echo; echo "=== gpu_check summary"
  for r in "${results[@]}"; do echo "  $r"; done
  [ -f bench_out/gpu_check/bench.md ] && { echo "  bench (bench_out/gpu_check/bench.md):"; sed 's/^/    /' bench_out/gpu_check/bench.md; }
  if [ "$failed" = 0 ]; then echo "=== all steps passed"; else echo "=== some steps FAILED"; fi
  exit "$failed"
}

py=${PYTHON:-}
if [ -z "$py" ]; then
  for c in python3.11 python3.12 python3; do command -v "$c" >/dev/null 2>&1 && { py=$c; break; }; done
fi
if [ "$install" = 1 ]; then
  lock=$("$py" -c 'import sys; print(f"constraints/py{sys.version_info[0]}{sys.version_info[1]}-test.txt")')
  cons=(); [ -f "$lock" ] && cons=(-c "$lock")
  step install sh -c "'$py' -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
    .venv/bin/pip install -q ${cons[*]+${cons[*]}} -e '.[gpu,torch,dev]'" || summary
fi
[ -x .venv/bin/python ] || { results+=("FAIL  0s  no .venv (run without --no-install)"); failed=1; summary; }
step devices .venv/bin/python -c '
import jax
print("jax", jax.__version__, jax.devices())
assert jax.devices()[0].platform == "gpu", "no GPU: jax runs on " + jax.devices()[0].platform
' || summary
step "gpu tests" .venv/bin/python -m pytest -q -m gpu -p no:cacheprovider tests/
step bench .venv/bin/python -m minillm_jax.bench --config=configs/tiny.py --what=train \
  --variants=jax_float32,jax_bfloat16,torch_compile_bf16 --repeats=3 --out=bench_out/gpu_check
summary
