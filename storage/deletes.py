"""Deletes: a file or a directory tree (:func:`remove`), a directory's contents but some
children (:func:`remove_children`), for ``Location.remove`` / ``remove_children``, which run
the hook points around them. On S3 a whole prefix goes in batches
(:func:`delete_s3_tree`: DeleteObjects, up to 1000 keys a request); local files take raw
``os`` calls; other filesystems fsspec's ``rm``. Every request is retried per the
location's ``RetryPolicy``."""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from ckptsvc import hooks
from ckptsvc.errors import StorageError, StorageNotFoundError

from .errors import classify
from .fs import S3_PROTOCOLS
from .retry import call_with_retries

if TYPE_CHECKING:
    from .location import Location

__all__ = ["S3_MAX_DELETE_KEYS", "delete_s3_tree", "remove", "remove_children"]

S3_MAX_DELETE_KEYS = 1000


def delete_s3_tree(loc: Location, *, keep: Collection[str] | None = None) -> None:
    """Batched DeleteObjects of every key under the prefix; raise if any key is refused.

    s3fs's own ``rm`` drops per-key errors, and leaves the folder entries that
    filer-backed stores (SeaweedFS) keep after their last object goes; this also deletes
    those ``dir/`` keys, deepest first, so the prefix really disappears from listings.
    With ``keep``, the direct children of those names, and the prefix itself, stay.
    """
    fs: Any = loc.fs
    fs.invalidate_cache(loc.path)
    bucket, key, _ = fs.split_path(loc.path)
    if not key:
        raise StorageError(f"delete {loc.url}: refusing to empty a whole bucket", url=loc.url)
    found: dict[str, dict[str, Any]] = fs.find(loc.path, withdirs=True, detail=True)
    base = key.rstrip("/") + "/"

    def kept(k: str) -> bool:
        return keep is not None and k.startswith(base) and k[len(base) :].split("/")[0] in keep

    files = sorted(
        k
        for k in (fs.split_path(p)[1] for p, e in found.items() if e.get("type") != "directory")
        if not kept(k)
    )
    dirs = sorted(
        (
            d
            for d in (
                fs.split_path(p)[1].rstrip("/") + "/"
                for p, e in found.items()
                if e.get("type") == "directory"
            )
            if not kept(d.rstrip("/"))
        ),
        key=lambda k: k.count("/"),
        reverse=True,
    )
    keys = [*files, *dirs] + ([base] if keep is None else [])
    for i in range(0, len(keys), S3_MAX_DELETE_KEYS):
        batch = [{"Key": k} for k in keys[i : i + S3_MAX_DELETE_KEYS]]
        out = fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        errors = [e for e in out.get("Errors") or [] if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            text = (
                f"{len(errors)} of {len(batch)} keys not deleted, e.g. {first.get('Key')}: "
                f"{first.get('Code')}: {first.get('Message')}"
            )
            if first.get("Code") == "AccessDenied":
                raise PermissionError(text)
            raise OSError(text)
    fs.invalidate_cache(loc.path)


def remove(loc: Location, *, recursive: bool, missing_ok: bool) -> None:
    """``Location.remove`` without its hook points (see there)."""
    if loc.is_local:
        try:
            if recursive and os.path.isdir(loc.path) and not os.path.islink(loc.path):
                shutil.rmtree(loc.path)
            else:
                os.unlink(loc.path)
                hooks.point("unlink.after", path=loc.path)
        except FileNotFoundError as e:
            if not missing_ok:
                raise classify(e, loc.url, "delete") from e
        except OSError as e:
            raise classify(e, loc.url, "delete") from e
        return

    # object stores delete missing keys silently: look first when the caller cares
    if not missing_ok and not loc.exists():
        raise StorageNotFoundError(f"delete {loc.url}: not found", url=loc.url)
    if recursive and loc.protocol in S3_PROTOCOLS:
        call_with_retries(
            lambda: delete_s3_tree(loc),
            url=loc.url,
            policy=loc.retry_policy(),
            action="delete",
        )
        return

    def _rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            loc.fs.rm(loc.path, recursive=recursive)

    call_with_retries(_rm, url=loc.url, policy=loc.retry_policy(), action="delete")
    loc.fs.invalidate_cache(loc.path)


def remove_children(loc: Location, *, keep: Collection[str] = ()) -> None:
    """``Location.remove_children`` (see there)."""
    if loc.is_local:
        try:
            with os.scandir(loc.path) as it:
                entries = [e for e in it if e.name not in keep]
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                    hooks.point("unlink.after", path=entry.path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise classify(e, loc.url, "delete") from e
        return
    if loc.protocol in S3_PROTOCOLS:
        call_with_retries(
            lambda: delete_s3_tree(loc, keep=keep),
            url=loc.url,
            policy=loc.retry_policy(),
            action="delete",
        )
        return
    try:
        children = [c.name for c in loc.list_children() if c.name not in keep]
    except StorageNotFoundError:
        return
    doomed = [posixpath.join(loc.path, name) for name in children]

    def _rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            loc.fs.rm(doomed, recursive=True)

    if doomed:
        call_with_retries(_rm, url=loc.url, policy=loc.retry_policy(), action="delete")
    loc.fs.invalidate_cache(loc.path)
