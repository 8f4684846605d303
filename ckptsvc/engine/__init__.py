"""The saving engines built on the layers below: ``AsyncCheckpointer`` (``async_checkpointer``,
with ``copier``, ``jobs``, ``outcomes`` and ``writer_link``) and the synchronous save
(``sync_save``, ``pretrained``)."""
