"""ckptsvc.workers: everything that moves checkpoint bytes off the training thread.

Shard streaming (``shard_writer``), the commit protocol (``commit``), and the node writer
process. Nothing here knows about training state: it sees byte ranges and file plans.
"""
