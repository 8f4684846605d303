"""Where one save goes, claimed before a byte moves: the checkpoint, or its successor.

Every save path (``AsyncCheckpointer.save`` / ``save_components``, the sync
``save_checkpoint``) resolves its directory here, in the saving process, before the save
is registered (:mod:`ckptsvc.workers.claim` has the protocol):

1. :func:`check_step` - a step is a non-negative ``int`` (a checkpoint id of the Forgather
   API may also be a name of ``[A-Za-z0-9._-]``: ``discovery.next_checkpoint_path``);
2. :func:`claim_target` - a committed checkpoint is refused, unless ``overwrite``: then the
   save goes to its hidden successor (:func:`~ckptsvc.workers.commit.replacement_location`),
   which is swapped in only after it committed; the directory written is claimed
   (exclusive in-progress marker) by the process that commits it;
3. :meth:`SaveTarget.abandon` if the save fails before its job was sent, or
   :meth:`SaveTarget.release` once it finished.

:func:`write_claimed` runs the whole protocol in the calling thread for the synchronous
writers (``save_checkpoint``, ``ckptsvc cp``, tiering's replication).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptsvc.errors import ConfigError
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.storage import Location
from ckptsvc.workers.claim import Claim, claim_checkpoint
from ckptsvc.workers.commit import begin_checkpoint, replacement_location, swap_in

__all__ = ["SaveTarget", "check_step", "claim_target", "write_claimed"]

logger = logging.getLogger(__name__)


def check_step(step: object) -> int:
    """``step`` if it is a non-negative ``int`` (not a ``bool``); else :class:`ConfigError`."""
    if type(step) is not int or step < 0:
        raise ConfigError(
            f"step must be a non-negative int, not {step!r} ({type(step).__name__}); it names "
            "the checkpoint directory checkpoint-<step>"
        )
    return step


@dataclass(frozen=True)
class SaveTarget:
    """One save's directories: ``path`` (what the handle reports and discovery returns)
    and ``write_path`` (where the files are written: ``path`` itself, or with
    ``replace_url`` set the successor of the committed checkpoint at ``path``)."""

    path: str
    write_path: str
    claim: Claim | None

    @property
    def replace_url(self) -> str:
        return self.path if self.write_path != self.path else ""

    @property
    def claim_id(self) -> str:
        return self.claim.claim_id if self.claim is not None else ""

    def release(self) -> None:
        """The save finished (either way): stop keeping the claim alive."""
        if self.claim is not None:
            self.claim.release()

    def abandon(self) -> None:
        """The save failed before its job was sent: give the directory back."""
        if self.claim is not None:
            self.claim.abandon()


def claim_target(
    path: str,
    *,
    storage_options: dict[str, Any] | None,
    overwrite: bool,
    claim: bool = True,
) -> SaveTarget:
    """Resolve and (with ``claim``: the process that commits) claim the save to ``path``.

    With ``overwrite`` a committed ``path`` gets a successor written beside it (every rank
    of a distributed save looks for itself: they agree, since a save of the same path
    cannot be in flight in the job). Raises
    :class:`~ckptsvc.errors.CommitConflictError` when ``path`` is committed and
    ``overwrite`` is false, or when a live save holds the directory to be written.
    """
    final = Location.parse(path, storage_options)
    stage = replacement_location(final)
    if overwrite and claim and stage.join(MANIFEST_NAME).exists():
        swap_in(stage, final)  # an earlier replacement committed but was never swapped in
    use_stage = overwrite and final.join(MANIFEST_NAME).exists()
    write = stage if use_stage else final
    held = claim_checkpoint(write, what="save") if claim else None
    return SaveTarget(path=path, write_path=write.url if use_stage else path, claim=held)


def write_claimed(
    dst: Location, *, overwrite: bool, write: Callable[[Location, SaveTarget], None]
) -> None:
    """Claim ``dst``, let ``write(directory, target)`` write the files and commit them
    (``commit_checkpoint(directory, manifest, claim_id=target.claim_id)``, the manifest's
    ``checkpoint_path`` naming ``target.path``), then swap a replacement in.

    A failure leaves a committed checkpoint at ``dst`` untouched; a failed replacement is
    removed (it may have filled the disk), a failed first save stays incomplete for ``gc``.
    """
    target = claim_target(dst.url, storage_options=dst.storage_options, overwrite=overwrite)
    directory = Location.parse(target.write_path, dst.storage_options, settings=dst.settings)
    committed = False
    try:
        begin_checkpoint(directory)
        write(directory, target)
        committed = True
        if target.replace_url:
            swap_in(directory, dst)
    finally:
        target.release()
        if not committed and target.replace_url:
            try:
                directory.remove(recursive=True, missing_ok=True)
            except Exception as e:  # the save's own error is what the caller must see
                logger.warning("could not remove the failed replacement %s: %s", directory.url, e)
