"""CheckpointManager over two tiers: save to fast local disk, replicate to S3/GCS.

With ``CheckpointConfig(output_dir=<local root>, tiering=TieringConfig(remote_root=...))``:

1. every save is written and committed under the local root by the async engine;
2. once committed, :class:`ckptsvc.ops.tiering.TieredStore` copies it to the same relative
   path under ``remote_root`` (verified while streaming, manifest last) on its background
   thread, and prunes local copies beyond ``keep_local`` whose remote copy is committed;
3. ``save_total_limit`` and the best checkpoints apply to the remote tier, the copy of
   record: retention there runs after each replication commits, and deletes the local
   copy of what it deletes remotely;
4. resume takes the newest checkpoint on either tier, its local copy if intact, else the
   remote one (``TieredStore.find_latest``).

:class:`Replication` looks like a save handle to retention (``path`` on the remote tier,
``exception()``: the local save's error, else the replication's), so the remote tier gets
the same in-flight protection as a single tier.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ckptsvc.ops.retention import delete_checkpoint
from ckptsvc.ops.tiering import ReplicationResult, TieredStore
from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info, validate_checkpoint
from ckptsvc.storage import Location

__all__ = ["Replication", "Tiering", "TieringConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TieringConfig:
    """The remote tier: ``remote_root`` (URL), its ``storage_options``, how many local
    copies to keep (``keep_local``), and whether resume checks the remote copy's CRC-32C
    (``verify_remote_crc``; sizes are always checked)."""

    remote_root: str
    storage_options: dict[str, Any] | None = None
    keep_local: int = 2
    verify_remote_crc: bool = False


class Replication:
    """The remote copy of one save: waits for the local save, then queues and waits for
    its replication. ``exception`` may be called from several threads."""

    def __init__(self, tiering: Tiering, local_handle: Any) -> None:
        self.local_handle = local_handle
        self.path = tiering.remote_path(local_handle.path)
        self._tiering = tiering
        self._lock = threading.Lock()
        self._future: Future[ReplicationResult] | None = None

    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def exception(self, timeout_s: float | None = None) -> BaseException | None:
        error = self.local_handle.exception(timeout_s)
        if error is not None:
            return error  # nothing to replicate; the save's own error is reported already
        with self._lock:
            if self._future is None:
                self._future = self._tiering.store.on_local_commit(self.local_handle.path)
            future = self._future
        return future.exception(timeout_s)


class Tiering:
    """The manager's view of a :class:`TieredStore` (see the module docstring)."""

    def __init__(
        self, config: TieringConfig, *, local_root: str, local_options: dict[str, Any]
    ) -> None:
        self.config = config
        self.remote_options = dict(config.storage_options or {})
        self.local_options = dict(local_options)
        self.store = TieredStore(
            local_root,
            config.remote_root,
            keep_local=config.keep_local,
            storage_options=self.remote_options,
            local_storage_options=self.local_options,
            verify_remote_crc=config.verify_remote_crc,
        )
        self._remote_url = Location.parse(config.remote_root, self.remote_options).url.rstrip("/")
        self._started = False

    def remote_path(self, local_path: str) -> str:
        """The remote URL of a local checkpoint path (``checkpoints/checkpoint-<id>``)."""
        name = Location.parse(local_path, self.local_options).name
        return self.store.remote_path(name.removeprefix("checkpoint-"))

    def local_path(self, remote_path: str) -> str:
        """The local path of a remote checkpoint URL."""
        name = Location.parse(remote_path, self.remote_options).name
        return self.store.local_path(name.removeprefix("checkpoint-"))

    def delete_local_copy(self, remote_url: str) -> None:
        """Retention deleted ``remote_url``: its local copy (if still there) goes too."""
        local = Location.parse(self.local_path(remote_url), self.local_options)
        if checkpoint_info(local).status is not CheckpointStatus.ABSENT:
            delete_checkpoint(local)

    def is_remote(self, path: str) -> bool:
        return str(path).rstrip("/").startswith(self._remote_url + "/")

    def options_for(self, path: str) -> dict[str, Any]:
        return self.remote_options if self.is_remote(path) else self.local_options

    def start(self) -> list[Future[ReplicationResult]]:
        """Once per manager: queue local checkpoints the remote tier lacks (a crash
        between a local commit and its replication)."""
        if self._started:
            return []
        self._started = True
        return self.store.replicate_pending()

    def resolve(self, checkpoint_path: str | None) -> str | None:
        """The latest checkpoint on either tier (``None``), or ``checkpoint_path`` if
        complete, else its remote copy if that is; ``None`` (warned) otherwise."""
        if checkpoint_path is None:
            latest = self.store.find_latest()
            if not latest:
                logger.warning("no complete checkpoint on either tier")
            return latest
        opts = self.options_for(checkpoint_path)
        if validate_checkpoint(checkpoint_path, storage_options=opts):
            return checkpoint_path
        if not self.is_remote(checkpoint_path):
            remote = self.remote_path(checkpoint_path)
            if validate_checkpoint(remote, storage_options=self.remote_options):
                logger.info("%s is not on the local tier; using %s", checkpoint_path, remote)
                return remote
        logger.warning("no complete checkpoint at %s on either tier", checkpoint_path)
        return None

    def exists(self, path: str) -> bool:
        """A complete copy of the checkpoint ``path`` names, on either tier."""
        if validate_checkpoint(path, storage_options=self.options_for(path)):
            return True
        return not self.is_remote(path) and validate_checkpoint(
            self.remote_path(path), storage_options=self.remote_options
        )

    def close(self) -> None:
        self.store.close()
