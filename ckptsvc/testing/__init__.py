"""Test tools, outside the library's import graph: fault injection through the named hooks
of :mod:`ckptsvc.hooks` and at the ``os`` level (:mod:`ckptsvc.testing.faultinject`, in the node writer through its torch-free preload
:mod:`ckptsvc.testing.writer_preload`), the crash
campaign (:mod:`ckptsvc.testing.crashtest`, its child :mod:`ckptsvc.testing.crash_child`) and a
fault-injecting HTTP proxy for object stores (:mod:`ckptsvc.testing.fault_proxy`).

The library never imports this package; the CLI (``ckptsvc crashtest``) and the tests do.
"""
