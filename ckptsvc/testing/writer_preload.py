"""The node writer's preload for the crash campaign and the OS-fault tests (no torch).

The node writer imports the modules of ``CKPTSVC_WRITER_PRELOAD`` before it serves; the
campaign (:mod:`ckptsvc.testing.crashtest`) and :func:`ckptsvc.testing.faultinject.faults_env`
name this one (:data:`ckptsvc.testing.faultinject.PRELOAD_MODULE`). Importing it installs the
hooks and OS faults that the writer's environment asks for, in the writer role.
"""

from __future__ import annotations

from ckptsvc.testing.faultinject import install_from_env

__all__: list[str] = []

install_from_env()
