"""Create the bucket of an ``s3://`` or ``gs://`` URL if it does not exist, waiting for the
store to come up. ckptsvc never creates buckets; the compose file and the Kubernetes Job
run this before ``ckptsvc demo``.

Usage::

    python ensure_bucket.py s3://checkpoints/demo \
        --storage-options '{"endpoint_url": "http://minio:9000"}' --timeout-s 120

Credentials come from the environment (``AWS_ACCESS_KEY_ID``, ...) or the options.
Exit status 0 when the bucket exists (created or not), 1 when the store did not answer in
time or refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import fsspec


def ensure_bucket(url: str, storage_options: dict[str, object], *, timeout_s: float) -> bool:
    """True once the bucket of ``url`` exists; False when refused or ``timeout_s`` ran out.

    One attempt may itself take a while: the filesystem retries a connection a few times
    before it gives up, so the whole wait can exceed ``timeout_s`` by one attempt.
    """
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    bucket = path.strip("/").split("/", 1)[0]
    deadline = time.monotonic() + timeout_s
    delay_s = 1.0
    while True:
        try:
            if fs.exists(bucket):
                print(f"bucket {bucket} exists")
                return True
            fs.mkdir(bucket)
            print(f"created bucket {bucket}")
            return True
        except FileExistsError:  # created by someone else since exists()
            print(f"bucket {bucket} exists")
            return True
        except PermissionError as e:  # wrong credentials: waiting will not help
            print(f"bucket {bucket}: permission denied: {e}", file=sys.stderr)
            return False
        except Exception as e:  # the store is not up yet; its clients raise many types
            if time.monotonic() + delay_s > deadline:
                print(f"bucket {bucket}: giving up after {timeout_s:.0f} s: {e}", file=sys.stderr)
                return False
            print(f"bucket {bucket}: store not ready ({type(e).__name__}: {e}); "
                  f"retrying in {delay_s:.0f} s", flush=True)  # fmt: skip
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 10.0)
            fs.invalidate_cache()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("url", help="s3://bucket[/prefix] or gs://bucket[/prefix]")
    parser.add_argument("--storage-options", default="{}", metavar="JSON", help="fsspec options")
    parser.add_argument(
        "--timeout-s", type=float, default=120.0, help="wait this long for the store"
    )
    args = parser.parse_args(argv)
    options = json.loads(args.storage_options)
    return 0 if ensure_bucket(args.url, options, timeout_s=args.timeout_s) else 1


if __name__ == "__main__":
    sys.exit(main())
