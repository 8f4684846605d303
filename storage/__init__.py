"""ckptsvc.storage: paths and URLs to fsspec filesystems, atomic publish, retries, listing.

This layer knows nothing of torch or checkpoints; it moves bytes and names them.
"""

from .errors import classify, is_transient, storage_errors
from .location import ChildInfo, Location, ShardSink, fsync_dir, url_to_fs
from .retry import call_with_retries

__all__ = [
    "ChildInfo",
    "Location",
    "ShardSink",
    "call_with_retries",
    "classify",
    "fsync_dir",
    "is_transient",
    "storage_errors",
    "url_to_fs",
]
