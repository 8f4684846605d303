"""Deleting a whole prefix on S3 in batches (DeleteObjects, up to 1000 keys a request)."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from ckptsvc.errors import StorageError

if TYPE_CHECKING:
    from .location import Location

__all__ = ["S3_MAX_DELETE_KEYS", "delete_s3_tree"]

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
