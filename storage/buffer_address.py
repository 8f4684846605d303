"""The address of a buffer's first byte, through CPython's buffer protocol (``ctypes``).

``O_DIRECT`` writes and reads need to know whether memory is page aligned, and
``memmove`` needs an address; read-only buffers (the node writer maps its arenas
read-only) included. Importing numpy for this would cost the writer ~6 MB.
"""

from __future__ import annotations

import ctypes

__all__ = ["address_of"]


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (the buffer protocol's view of an object's memory)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def address_of(view: memoryview) -> int:
    """The address of ``view``'s first byte (read-only buffers too: the writer maps arenas
    read-only, and importing numpy for this would cost the writer ~6 MB); valid while
    ``view`` lives (it holds its exporter's buffer)."""
    buf = _PyBuffer()
    if _get_buffer(view, ctypes.byref(buf), 0) != 0:  # PyBUF_SIMPLE; raises on failure
        raise BufferError("cannot get the address of a buffer")
    try:
        return int(buf.buf or 0)
    finally:
        _release_buffer(ctypes.byref(buf))
