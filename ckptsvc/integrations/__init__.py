"""Integrations with training frameworks; each is an optional extra and imported on demand.

- :mod:`ckptsvc.integrations.hf_trainer`: ``CkptsvcCallback`` for the Hugging Face
  ``Trainer`` (``pip install 'ckptsvc[hf]'``), writing the ``Trainer``'s own checkpoint
  layout; :mod:`ckptsvc.integrations.hf_resume`: the files the ``Trainer`` reads on resume;
- :mod:`ckptsvc.integrations.lightning`: ``CkptsvcCheckpointIO``, a Lightning
  ``CheckpointIO`` plugin (``pip install 'ckptsvc[lightning]'``).

Importing this package imports neither framework.
"""

__all__: list[str] = []
