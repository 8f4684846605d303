"""The library's version (``ckptsvc.__version__``), importable from every layer."""

__version__ = "0.1.0"
