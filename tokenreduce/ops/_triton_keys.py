"""Order keys: a float32 value and an index packed into one int64 (Triton helpers).

``pack_key(value, index)`` is larger exactly when the value is larger or, between equal values,
the index is lower; so one ``max`` (or ``atomic_max``, in any program order) finds the largest
value at the lowest index, and the keys of one row are distinct. The order of the values is
total: ``-0`` equals ``+0`` and NaN ranks below every number, ``-inf`` included::

    bits(v)  = int32 of v's float bits, negatives with their 31 low bits flipped (same order as v)
    key      = bits(v) << 32 | (KEY_INDEX_MAX - index)          0 <= index <= KEY_INDEX_MAX

Imported only where triton is installed (by the kernel modules).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton import KEY_INDEX_MAX, KEY_LOWEST

__all__ = ["LOWEST", "key_index", "key_value", "pack_key"]

INDEX_MAX = tl.constexpr(KEY_INDEX_MAX)
LOWEST = tl.constexpr(KEY_LOWEST)
_LOW_31 = tl.constexpr(0x7FFFFFFF)  # flipping these orders negative floats as ints
_NAN_BITS = tl.constexpr(-(2**31))  # below bits(-inf) = -2^31 + 2^23 - 1


@triton.jit
def _order_bits(v):
    """float32 -> int32 of the same order (-0 as +0, NaN lowest)."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ _LOW_31, bits)
    return tl.where(v != v, _NAN_BITS, bits)


@triton.jit
def pack_key(v, index):
    """(float32 value, int index) -> int64 order key."""
    return (_order_bits(v).to(tl.int64) << 32) | (INDEX_MAX - index.to(tl.int64))


@triton.jit
def key_index(key):
    """The index (int32) held in a key: the low 31 bits flipped (INDEX_MAX - low)."""
    return ((key & INDEX_MAX) ^ INDEX_MAX).to(tl.int32)


@triton.jit
def key_value(key):
    """The float32 value held in a key (NaN for a NaN key)."""
    bits = (key >> 32).to(tl.int32)
    bits = tl.where(bits < 0, bits ^ _LOW_31, bits)
    return bits.to(tl.float32, bitcast=True)
