"""Tools built on the library, outside its import graph: the benchmark (``ckptsvc bench``,
:mod:`ckptsvc.tools.bench`) and the demo (``ckptsvc demo``, :mod:`ckptsvc.tools.demo`).

The library never imports this package; the CLI (the top layer) does.
"""
