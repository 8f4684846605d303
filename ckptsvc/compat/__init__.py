"""Forgather's trainer-side vocabulary: statefuls and providers, model parts, and restoring a
trainer (used by ``ckptsvc.manager``)."""
