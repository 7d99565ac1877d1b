"""PTX of dropout's byte test, shared by the GPU backends' masks (Triton's and Mosaic GPU's).

A hash word's four bytes are compared with the 8-bit threshold T at once (``semantics.py``: a
byte >= T is kept), in 3 instructions with no borrow between the bytes. For T <= 0x80, bit 7 of
(byte | 0x80) - T says (byte & 0x7F) >= T, so the byte is kept where that or its own bit 7 is
set; for T > 0x80 where (byte & 0x7F) >= T - 0x80 and its bit 7 is set. Bit 7 of each result
byte says kept (the other bits are arbitrary); ``prmt``'s sign-replicating selectors then spread
it over whatever the byte masks.
"""

from __future__ import annotations


def keep_bytes_ptx(threshold: int, word: str, scratch: str, out: str) -> str:
    """Three PTX instructions setting bit 7 of each byte of ``out`` where ``word``'s byte is
    kept; ``scratch`` a .b32 register other than ``word`` (it may be ``out``)."""
    low = threshold <= 0x80
    subtract = (threshold if low else threshold - 0x80) * 0x01010101
    return (f"or.b32 {scratch}, {word}, 0x80808080; sub.u32 {scratch}, {scratch}, {subtract}; "
            f"{'or' if low else 'and'}.b32 {out}, {scratch}, {word};")
