#!/usr/bin/env bash
# One training run over every host of a Cloud TPU VM slice: the same command on all workers over gcloud ssh.
usage() {
  cat <<'USAGE'
usage: launch/tpu_vm.sh [--install] TPU_NAME ZONE [CONFIG WORKDIR [train flags...]]
  Runs `python -m minillm_jax.train --config=CONFIG --workdir=WORKDIR [train flags...]` on every worker of the
  TPU VM TPU_NAME with `gcloud compute tpus tpu-vm ssh --worker=all`, in REPO_DIR (default: minillm-jax in the
  home directory; clone it there first). MINILLM_DISTRIBUTED=1 makes each process call
  jax.distributed.initialize(), which finds the slice's hosts itself. WORKDIR must be a directory every worker
  sees (an NFS or Filestore mount, or a gcsfuse-mounted bucket).
  --install: creates REPO_DIR/.venv on every worker and installs the package with jax[tpu] (no training).
  Environment: PROJECT (gcloud --project), REPO_DIR.
  Example: launch/tpu_vm.sh my-v4-32 us-central2-b configs/gpt2_124m.py /mnt/shared/runs/gpt2
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0;; esac
install=0
if [ "${1:-}" = --install ]; then install=1; shift; fi
[ $# -ge 2 ] || { usage >&2; exit 2; }
name=$1; zone=$2; shift 2
repo=${REPO_DIR:-minillm-jax}
if [ "$install" = 1 ]; then
  cmd="cd $(printf '%q' "$repo") && python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
else
  [ $# -ge 2 ] || { usage >&2; exit 2; }
  config=$1; workdir=$2; shift 2
  args=$(printf ' %q' "--config=$config" "--workdir=$workdir" "$@")
  cmd="cd $(printf '%q' "$repo") && MINILLM_DISTRIBUTED=1 PYTHONUNBUFFERED=1 .venv/bin/python -m minillm_jax.train$args"
fi
project=()
[ -n "${PROJECT:-}" ] && project=(--project="$PROJECT")
exec gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" ${project[@]+"${project[@]}"} --worker=all --command="$cmd"
