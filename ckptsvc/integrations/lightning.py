"""A Lightning ``CheckpointIO`` plugin that saves through ckptsvc, asynchronously.

Usage (``pip install 'ckptsvc[lightning]'``)::

    from ckptsvc.integrations.lightning import CkptsvcCheckpointIO

    trainer = lightning.pytorch.Trainer(..., plugins=[CkptsvcCheckpointIO()])
    trainer.fit(model, ckpt_path="checkpoints/step=400.ckpt")    # resume as usual

Every path Lightning saves to (``.../step=400.ckpt``) becomes a ckptsvc checkpoint
*directory*: the LightningModule's ``state_dict`` as Hugging Face safetensors
(``model.safetensors``, or shards + ``model.safetensors.index.json``; component ``model``), everything else Lightning puts in a
checkpoint (optimizer and scheduler states, loops, callbacks, hyper-parameters) as
component ``lightning`` (safetensors + JSON, nothing pickled), and the manifest last.
Paths may be URLs (``s3://...``, ``gs://...``) with ``storage_options``.

Call order (the training thread unless noted):

1. :meth:`~CkptsvcCheckpointIO.save_checkpoint` (Lightning calls it on global rank 0):
   snapshot the checkpoint's tensors into shared memory and return; the node writer process
   writes the directory and commits its manifest last (in the background);
2. :meth:`~CkptsvcCheckpointIO.load_checkpoint` (Lightning calls it on every rank): wait
   for a save to that path still in flight (rank 0, the only one that saves), under DDP a
   barrier (so no rank reads before rank 0's save committed), then read both components
   back into one checkpoint dict (tensors on CPU, or on ``map_location`` when it names a
   device);
3. :meth:`~CkptsvcCheckpointIO.remove_checkpoint` (``save_top_k`` rotation): wait for a
   save to that path, then delete it, manifest first;
4. :meth:`~CkptsvcCheckpointIO.teardown` (end of ``fit``): wait for every save, stop the
   engine, and raise the first failed save.

Values must be tensors or JSON-like (dicts, lists, numbers, strings, ``None``):
``save_hyperparameters`` with other objects raises ``InvalidStateError`` naming the key.

Under DDP (``strategy="ddp"``) only global rank 0 writes: Lightning calls ``save_checkpoint``
and ``remove_checkpoint`` there alone, and the model and optimizer are replicated, so rank 0's
state is the whole checkpoint (an ``AsyncCheckpointer(single_process=True)``: no
cross-rank commit). Every rank loads it whole. Sharded strategies (FSDP, DeepSpeed) save
per-rank state through their own ``CheckpointIO`` paths and are not covered.

Lightning's ``ModelCheckpoint(dirpath=...)`` names checkpoints ``<dirpath>/<name>.ckpt``;
discovery lists such directories (:mod:`ckptsvc.read.discovery`), so ``ckptsvc ls``,
``verify``, ``gc`` and ``prune`` given ``dirpath`` see them.
The base class comes from ``lightning`` (``lightning.fabric``) if installed, else from the
standalone ``lightning_fabric`` that ``pytorch_lightning`` uses.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, SaveHandle, load_components
from ckptsvc.errors import SaveFailedError
from ckptsvc.ops.retention import delete_checkpoint
from ckptsvc.read.component_load import to_device
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.stage.state_components import HeldState
from ckptsvc.storage import Location

try:
    from lightning.fabric.plugins import CheckpointIO
except ImportError:  # the standalone pytorch_lightning package
    from lightning_fabric.plugins import CheckpointIO  # type: ignore[assignment]

__all__ = ["CkptsvcCheckpointIO"]

logger = logging.getLogger(__name__)

MODEL_KEY = "model"
REST_KEY = "lightning"
_STATE_DICT = "state_dict"


class CkptsvcCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` over ckptsvc (see the module docstring for the call order).

    ``storage_options`` go to fsspec for every path; ``max_shard_size`` caps weight shard
    files; ``metadata`` goes to every manifest.
    """

    def __init__(
        self,
        *,
        storage_options: dict[str, Any] | None = None,
        max_shard_size: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.storage_options = dict(storage_options or {})
        self._max_shard_size = max_shard_size
        self._metadata = dict(metadata or {})
        self._ckpt: AsyncCheckpointer | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, SaveHandle] = {}

    def _url(self, path: str | os.PathLike[str]) -> str:
        return Location.parse(os.fspath(path), self.storage_options).url

    def _engine(self, url: str) -> AsyncCheckpointer:
        if self._ckpt is None:
            parent = Location.parse(url, self.storage_options).parent.url
            self._ckpt = AsyncCheckpointer(
                parent,
                storage_options=self.storage_options,
                max_shard_size=self._max_shard_size,
                metadata=self._metadata,
                single_process=True,  # Lightning saves on global rank 0 alone, also under DDP
            )
        return self._ckpt

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        """Snapshot ``checkpoint`` and return; ``path`` becomes a checkpoint directory."""
        if storage_options is not None:
            raise TypeError(
                "CkptsvcCheckpointIO.save_checkpoint takes no per-call storage_options; pass "
                "fsspec options to CkptsvcCheckpointIO(storage_options=...)"
            )
        url = self._url(path)
        self._raise_failed()
        self._wait_for(url)  # a save to the same path again (e.g. last.ckpt) replaces it
        rest = {k: v for k, v in checkpoint.items() if k != _STATE_DICT}
        components = [
            StateComponent(
                MODEL_KEY, HeldState(dict(checkpoint.get(_STATE_DICT) or {})), SharingPattern.GLOBAL
            ),
            StateComponent(REST_KEY, HeldState(rest), SharingPattern.GLOBAL),
        ]
        step = int(checkpoint.get("global_step") or 0)
        handle = self._engine(url).save_components(step, components, checkpoint_path=url)
        with self._lock:
            self._pending[url] = handle
        logger.info("checkpoint %s: snapshot in %.3f s", url, handle.timings.blocking_s)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint written by :meth:`save_checkpoint` (nothing is unpickled, so
        ``weights_only`` changes nothing)."""
        url = self._url(path)
        self._wait_for(url)
        if _world_size() > 1:  # rank 0's save to ``url`` is durable before any rank reads
            torch.distributed.barrier()
        model, rest = HeldState(None), HeldState(None)
        load_components(
            url,
            [
                StateComponent(MODEL_KEY, model, SharingPattern.GLOBAL),
                StateComponent(REST_KEY, rest, SharingPattern.GLOBAL),
            ],
            storage_options=self.storage_options,
        )
        checkpoint = dict(rest.value or {})
        checkpoint[_STATE_DICT] = dict(model.value or {})
        if isinstance(map_location, (str, torch.device)):
            checkpoint = to_device(checkpoint, torch.device(map_location))
        return checkpoint

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete a checkpoint directory (manifest first), after a save to it finished."""
        url = self._url(path)
        self._wait_for(url)
        loc = Location.parse(url, self.storage_options)
        if loc.isdir():
            delete_checkpoint(loc)
        else:
            loc.remove(missing_ok=True)

    def teardown(self) -> None:
        """Wait for every save, stop the engine, raise the first failure."""
        ckpt, self._ckpt = self._ckpt, None
        if ckpt is None:
            return
        try:
            self._raise_failed(wait=True)
            ckpt.wait_all()
        finally:
            ckpt.close()

    # ---- helpers ----------------------------------------------------------------------------

    def _wait_for(self, url: str) -> None:
        with self._lock:
            handle = self._pending.pop(url, None)
        if handle is not None:
            handle.wait()

    def _raise_failed(self, *, wait: bool = False) -> None:
        with self._lock:
            handles = list(self._pending.values())
            self._pending = {u: h for u, h in self._pending.items() if not (wait or h.done())}
        for h in handles:
            if not wait and not h.done():
                continue
            error = h.exception()
            if error is not None:
                raise SaveFailedError(
                    f"checkpoint save to {h.path} (step {h.step}) failed: {error}"
                ) from error


def _world_size() -> int:
    """The ranks of the default process group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
