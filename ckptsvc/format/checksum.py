"""CRC-32C (Castagnoli), computed while bytes stream, hardware-accelerated (~14 GB/s here).

CRC-32C is what GCS reports for objects, so a checksum in our manifest can be compared
with the store's own without reading the object back.
"""

from __future__ import annotations

import crc32c as _crc32c

__all__ = ["Crc32c", "crc32c_combine", "crc32c_hex", "crc32c_value"]


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


# ---- combining: CRC(A + B) from CRC(A), CRC(B) and len(B) (zlib's crc32_combine, Castagnoli)
_POLY = 0x82F63B78  # CRC-32C, reflected


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial (reflected bit order)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> tuple[int, ...]:
    p = 1 << 30  # x^1
    out = [p]
    for _ in range(1, 32):
        p = _multmodp(p, p)
        out.append(p)
    return tuple(out)


_X2N = _x2n_table()


def crc32c_combine(crc_a: int, crc_b: int, nbytes_b: int) -> int:
    """CRC-32C of the concatenation A + B, given both CRCs and B's length.

    Lets parallel readers checksum each range right after reading it (while its bytes are
    in the CPU cache) and the caller join the ranges in file order afterwards.
    """
    p = 1 << 31  # x^0
    n, k = nbytes_b, 3  # x^(8 * nbytes_b)
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc_a) ^ crc_b


def crc32c_value(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32C of ``data`` continuing from ``value`` (the CRC of the bytes before), as an int."""
    return int(_crc32c.crc32c(data, value=value))
