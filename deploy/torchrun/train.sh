#!/usr/bin/env bash
# Single node: N training processes under torchrun, checkpointing with ckptsvc.
#
#   deploy/torchrun/train.sh                           # 2 processes, ./train-run, CPU or GPU
#   NPROC=8 OUTPUT=s3://my-bucket/runs/exp1 deploy/torchrun/train.sh --steps 1000
#
# Run it again after stopping it (Ctrl-C, kill -TERM): it resumes from the newest complete
# checkpoint. Extra arguments go to deploy/examples/train.py (--help lists them).
# Environment:
#   NPROC            processes (default: the GPU count, or 2 on a CPU-only machine)
#   OUTPUT           model directory, a path or URL (default: ./train-run)
#   STORAGE_OPTIONS  fsspec options as JSON (default: {}), e.g. '{"endpoint_url": "http://127.0.0.1:9000"}'
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
train_py="$here/../examples/train.py"

if [[ -z "${NPROC:-}" ]]; then
    gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
    NPROC=$(( gpus > 0 ? gpus : 2 ))
fi
OUTPUT="${OUTPUT:-./train-run}"
no_options='{}'
STORAGE_OPTIONS="${STORAGE_OPTIONS:-$no_options}"

# One node writer per run, even when other runs of the same user share this machine.
export CKPTSVC_NODE_ID="${CKPTSVC_NODE_ID:-torchrun-$$}"
# CPU threads per process: leave cores for the node writer and the other processes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 1 ? $(nproc) / NPROC : 1 ))}"

exec torchrun --standalone --nnodes=1 --nproc-per-node="$NPROC" \
    "$train_py" --output "$OUTPUT" --storage-options "$STORAGE_OPTIONS" "$@"
