#!/usr/bin/env bash
# The quickest check of an installation: `ckptsvc demo` trains a small model with
# asynchronous checkpoints, loads the latest one into a fresh model and verifies every byte
# against the manifest; then `ckptsvc ls` lists what it wrote.
#
#   deploy/torchrun/demo.sh                       # to ./demo-run
#   deploy/torchrun/demo.sh s3://my-bucket/demo '{"endpoint_url": "http://127.0.0.1:9000"}'
set -euo pipefail

output="${1:-./demo-run}"
no_options='{}'
storage_options="${2:-$no_options}"
ckptsvc demo --output "$output" --storage-options "$storage_options"
ckptsvc ls "$output" --storage-options "$storage_options"
