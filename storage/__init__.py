"""ckptsvc.storage: paths and URLs to fsspec filesystems, atomic publish, retries, listing.

This layer knows nothing of torch or checkpoints; it moves bytes and names them.
"""

from .copies import CopyMethod, copy_file
from .errors import classify, is_transient, storage_errors
from .fs import ChildInfo, ShardSink, fsync_dir, url_to_fs
from .io_settings import IOSettings
from .location import Location
from .reads import RangeRead, plan_reads
from .retry import RetryPolicy, acall_with_retries, call_with_retries

__all__ = [
    "ChildInfo",
    "CopyMethod",
    "IOSettings",
    "Location",
    "RangeRead",
    "RetryPolicy",
    "ShardSink",
    "acall_with_retries",
    "call_with_retries",
    "classify",
    "copy_file",
    "fsync_dir",
    "is_transient",
    "plan_reads",
    "storage_errors",
    "url_to_fs",
]
