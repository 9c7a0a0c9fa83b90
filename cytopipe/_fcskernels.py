"""Numba kernels for the FCS reader: byte swaps, and single-pass integer decoding.

numpy's ``ndarray.byteswap`` runs at ~0.4 ns per element; these loops vectorise
(byte shuffles) and run 3-6 x faster, which is most of the difference between
reading a big-endian file at the speed of the disk cache or not. Imported lazily by
:mod:`cytopipe.fcs` only when a file needs them; compiled once and cached on disk.
"""

from __future__ import annotations

import numba as nb
import numpy as np

# uint64 constants: numba would type a plain int literal mixed with uint64 as float64.
_S8 = np.uint64(8)
_S24 = np.uint64(24)
_FF = np.uint64(0xFF)
_FF00 = np.uint64(0xFF00)
_U8 = np.uint32(8)
_U24 = np.uint32(24)
_U0xFF00 = np.uint32(0xFF00)
_H8 = np.uint16(8)


@nb.njit(cache=True, nogil=True)
def bswap16(a):  # pragma: no cover - compiled
    for i in range(a.size):
        x = np.uint64(a[i])
        a[i] = ((x >> _S8) & _FF) | ((x & _FF) << _S8)


@nb.njit(cache=True, nogil=True)
def bswap32(a):  # pragma: no cover - compiled
    # native 32-bit shifts (no widening to uint64): LLVM turns the loop into byte shuffles
    for i in range(a.size):
        x = a[i]
        a[i] = (x >> _U24) | ((x >> _U8) & _U0xFF00) | ((x & _U0xFF00) << _U8) | (x << _U24)


@nb.njit(cache=True, nogil=True)
def _decode_native(raw, out, masks, acc):  # pragma: no cover - compiled
    """The no-swap loop of :func:`decode_u16` / :func:`decode_u32` (compiled per integer type)."""
    for i in range(raw.size):
        x = raw[i]
        m = masks[i]
        acc |= x & ~m
        out[i] = np.float32(x & m)
    return acc


@nb.njit(cache=True, nogil=True)
def decode_u16(raw, out, masks, swap):  # pragma: no cover - compiled
    """One pass over a chunk of 16-bit integers: byte swap (``swap``), range mask and widen into
    the float32 output ``out`` (flat, same length). ``masks`` holds one mask per value (the row's
    masks tiled), so the loop has no per-channel indexing and vectorises. Returns the OR of the
    bits the masks removed (non-zero: some value had bits above its $PnR)."""
    acc = np.uint16(0)
    if swap:
        for i in range(raw.size):
            x = raw[i]
            x = (x >> _H8) | (x << _H8)
            m = masks[i]
            acc |= x & ~m
            out[i] = np.float32(x & m)
        return acc
    return _decode_native(raw, out, masks, acc)


@nb.njit(cache=True, nogil=True)
def decode_u32(raw, out, masks, swap):  # pragma: no cover - compiled
    """:func:`decode_u16` for 32-bit integers (float32 rounds to nearest, as numpy's cast)."""
    acc = np.uint32(0)
    if swap:
        for i in range(raw.size):
            x = raw[i]
            x = (x >> _U24) | ((x >> _U8) & _U0xFF00) | ((x & _U0xFF00) << _U8) | (x << _U24)
            m = masks[i]
            acc |= x & ~m
            out[i] = np.float32(x & m)
        return acc
    return _decode_native(raw, out, masks, acc)


@nb.njit(cache=True, nogil=True)
def bswap64(a):  # pragma: no cover - compiled
    for i in range(a.size):
        x = a[i]
        y = np.uint64(0)
        for _ in range(8):
            y = (y << _S8) | (x & _FF)
            x = x >> _S8
        a[i] = y


@nb.njit(cache=True, nogil=True)
def bits_outside(a, masks):  # pragma: no cover - compiled
    """OR of ``a & ~masks`` over all elements (same shape, flat): non-zero when any value
    has bits set outside its mask."""
    found = np.uint64(0)
    for i in range(a.size):
        found |= np.uint64(a[i] & ~masks[i])
    return found
