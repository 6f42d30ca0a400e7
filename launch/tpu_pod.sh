#!/usr/bin/env bash
# Cloud TPU VM pod slice: create, install on every worker, run on all workers, tail, stop, delete.
# Data and workdir live on gs:// paths every worker can reach. Every setting is an environment
# variable; nothing here is specific to one user.
#
#   TPU_NAME=sami-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#   WORKDIR=gs://my-bucket/runs/celeba DATA_DIR=gs://my-bucket/tensorflow_datasets \
#   bash launch/tpu_pod.sh create|install|run|tail|stop|delete [--config.field=value ...]
set -euo pipefail
TPU_NAME="${TPU_NAME:-sami-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
PROJECT_FLAG="${PROJECT:+--project=$PROJECT}"
CONFIG="${CONFIG:-configs/celeba.py}"
WORKDIR="${WORKDIR:-}"
DATA_DIR="${DATA_DIR:-}"
REPO_URL="${REPO_URL:-}"          # where workers get the code (git URL); or leave empty to scp
BRANCH="${BRANCH:-main}"
REMOTE_DIR="${REMOTE_DIR:-sami_jax}"
LOG="${LOG:-/tmp/sami_jax.log}"

cmd="${1:-}"; shift || true
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  install)
    if [ -n "$REPO_URL" ]; then
      ssh_all "rm -rf $REMOTE_DIR && git clone --branch $BRANCH $REPO_URL $REMOTE_DIR"
    else
      tmp=$(mktemp -d); git archive --format=tar.gz -o "$tmp/src.tgz" HEAD
      gcloud compute tpus tpu-vm scp "$tmp/src.tgz" "$TPU_NAME:~/src.tgz" --zone="$ZONE" \
        $PROJECT_FLAG --worker=all
      ssh_all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/src.tgz -C $REMOTE_DIR"
    fi
    ssh_all "cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && \
      pip install -q -U pip && pip install -q -e . 'jax[tpu]' && python -c 'import jax; print(jax.device_count())'"
    ;;
  run)
    : "${WORKDIR:?set WORKDIR=gs://bucket/path}"
    data_flag=""; [ -n "$DATA_DIR" ] && data_flag="--config.data.data_dir=$DATA_DIR"
    # TPU_WORKER_HOSTNAMES lists several workers on a pod slice, so sami_jax.main calls
    # jax.distributed.initialize() (which needs no further arguments on TPU).
    ssh_all "cd $REMOTE_DIR && . .venv/bin/activate && nohup python -m sami_jax.main \
      --config=$CONFIG --workdir=$WORKDIR $data_flag $* > $LOG 2>&1 &"
    ;;
  tail)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -f $LOG"
    ;;
  stop)
    # SIGTERM: every worker writes its part of a checkpoint, then exits; `run` again resumes.
    ssh_all "pkill -TERM -f sami_jax.main || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
    ;;
  *)
    echo "usage: $0 create|install|run|tail|stop|delete [--config.field=value ...]" >&2
    exit 2
    ;;
esac
