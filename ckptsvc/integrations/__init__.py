"""Integrations with training frameworks; each is an optional extra and imported on demand.

- :mod:`ckptsvc.integrations.hf_trainer`: ``CkptsvcCallback`` for the Hugging Face
  ``Trainer`` (``pip install 'ckptsvc[hf]'``), writing the ``Trainer``'s own checkpoint
  layout; :mod:`ckptsvc.integrations.hf_resume`: the files the ``Trainer`` reads on resume;
- :mod:`ckptsvc.integrations.lightning`: ``CkptsvcCheckpointIO``, a Lightning
  ``CheckpointIO`` plugin (``pip install 'ckptsvc[lightning]'``);
- :mod:`ckptsvc.integrations.accelerate`: asynchronous ``save_state`` / ``load_state`` for
  an Accelerate ``Accelerator`` (``pip install 'ckptsvc[hf]'``); it also reads directories
  written by ``accelerator.save_state`` (:mod:`ckptsvc.integrations.accelerate_files`).

Importing this package imports neither framework.
"""

__all__: list[str] = []
