#!/usr/bin/env bash
# The CUDA tests and a 1 GiB CUDA save/load figure on the device machine (the `device`
# tool's `run`; Python 3.12 with torch and most dependencies, no network). Prepare here,
# in the repository root, once per session:
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl crc32c==2.9.post0
# then: run(command="bash .ci/gpu_on_device.sh", carry=[".whl"]). Results land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . || exit 4
export PYTHONPATH=/tmp/site CKPTSVC_NODE_ID=gpu-$$ PYTHONUNBUFFERED=1
# run from a copy: the repository's own ckptsvc/ would shadow the installed package
rm -rf /tmp/t && cp -r tests /tmp/t && cp pyproject.toml .ci/gpu_bench.py /tmp/ && cd /tmp || exit 6
python3 -c "import torch, ckptsvc.storage; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 5
python3 -m pytest -q -p no:cacheprovider -m gpu -rs --timeout 300 t/test_shard_read.py t/test_staging.py \
  t/test_overlap.py t/test_async_checkpointer.py t/test_memory_budget.py t/test_manager.py \
  t/test_sharded_checkpoint.py t/test_quantized.py 2>&1 | tee "$OUT/gpu_tests.log"
echo "tests rc $?"
python3 /tmp/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench.log"
