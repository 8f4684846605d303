"""Integrations with training frameworks; each is an optional extra and imported on demand.

- :mod:`ckptsvc.integrations.hf_trainer`: ``CkptsvcCallback`` for the Hugging Face
  ``Trainer`` (``pip install 'ckptsvc[hf]'``);
- :mod:`ckptsvc.integrations.lightning`: ``CkptsvcCheckpointIO``, a Lightning
  ``CheckpointIO`` plugin (``pip install 'ckptsvc[lightning]'``).

Importing this package imports neither framework.
"""

__all__: list[str] = []
