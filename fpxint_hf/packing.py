"""Bit packing of low-bit integer codes into ``uint8`` buffers.

FP=xINT approximates each weight matrix by a short series of low-bit integer terms
(codes plus scales).  To make ``save_pretrained`` write the *honest* bits-per-weight,
the unsigned codes of every term are stored packed in ``uint8`` buffers instead of
one code per byte.  This module provides the pack/unpack pairs used for that.

All functions pack along the LAST dimension, accept any leading shape, are fully
vectorized torch ops and stay on the input's device (CPU or CUDA).  Codes are
zero-padded internally, so ``unpack(pack(c, bits), bits, c.shape[-1])`` reproduces
``c`` exactly for every length.

Supported widths (``SUPPORTED_BITS``): 2, 3, 4 and 8.  Packed sizes along the last dim:
``ceil(n * bits / 8)`` for 2/4/8 bits and ``3 * ceil(n / 8)`` for 3 bits.
"""

from __future__ import annotations

import torch

from .expansion import SUPPORTED_BITS

__all__ = [
    "SUPPORTED_BITS",
    "pack",
    "pack_2bit",
    "pack_3bit",
    "pack_4bit",
    "pack_8bit",
    "pack_series",
    "packed_size",
    "series_shape",
    "term_bytes",
    "unpack",
    "unpack_2bit",
    "unpack_3bit",
    "unpack_4bit",
    "unpack_8bit",
    "unpack_series",
]


# --------------------------------------------------------------------------- validation


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed values: {SUPPORTED_BITS}")


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative int (number of codes along the last dim)")


def _check_uint8(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor with dtype torch.uint8, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(f"{name} must have dtype torch.uint8, got dtype {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-d tensor")


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    _check_uint8(codes, "codes")
    if bits < 8 and codes.numel() > 0:
        found = int(codes.max())
        if found >= (1 << bits):
            raise ValueError(
                f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}, but the max found is {found}"
            )


def _check_packed(packed: torch.Tensor, bits: int, n: int) -> None:
    _check_uint8(packed, "packed")
    _check_n(n)
    expected = packed_size(n, bits)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"packed last dim is {packed.shape[-1]}, but packed_size(n={n}, bits={bits}) = {expected}"
        )


# --------------------------------------------------------------------------- helpers


def _pad_last(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim of ``codes`` up to a multiple of ``multiple``."""
    pad = (-codes.shape[-1]) % multiple
    if pad == 0:
        return codes
    zeros = codes.new_zeros((*codes.shape[:-1], pad))
    return torch.cat([codes, zeros], dim=-1)


def _pack_sub_byte(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``8 // bits`` codes per byte, slot ``j`` at bits ``bits*j .. bits*j+bits-1``."""
    per = 8 // bits
    lead = codes.shape[:-1]
    m = packed_size(codes.shape[-1], bits)
    units = _pad_last(codes, per).reshape(*lead, m, per)
    out = units[..., 0].clone()
    for j in range(1, per):
        out |= units[..., j] << (bits * j)
    return out


def _unpack_sub_byte(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    lead = packed.shape[:-1]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, packed.shape[-1] * per)[..., :n].contiguous()


# --------------------------------------------------------------------------- per-width pairs


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes (values 0..3), 4 codes per byte, along the last dim.

    Code ``j`` of each group of 4 sits at bits ``2j..2j+1`` (code 0 in the low bits)::

        byte:  | c3 c3 | c2 c2 | c1 c1 | c0 c0 |
        bit:     7  6    5  4    3  2    1  0

    Example: ``pack_2bit([1, 2, 3, 0]) == [0b00_11_10_01] == [0x39]``.
    ``uint8 [..., n] -> uint8 [..., ceil(n / 4)]``; the tail is zero-padded.
    """
    _check_codes(codes, 2)
    return _pack_sub_byte(codes, 2)


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: ``uint8 [..., ceil(n / 4)] -> uint8 [..., n]``."""
    _check_packed(packed, 2, n)
    return _unpack_sub_byte(packed, 2, n)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (values 0..15), 2 codes per byte, along the last dim.

    Even index in the low nibble, odd index in the high nibble::

        byte:  | c1 c1 c1 c1 | c0 c0 c0 c0 |
        bit:     7  6  5  4    3  2  1  0

    Example: ``pack_4bit([1, 2]) == [0x21]``.
    ``uint8 [..., n] -> uint8 [..., ceil(n / 2)]``; the tail is zero-padded.
    """
    _check_codes(codes, 4)
    return _pack_sub_byte(codes, 4)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: ``uint8 [..., ceil(n / 2)] -> uint8 [..., n]``."""
    _check_packed(packed, 4, n)
    return _unpack_sub_byte(packed, 4, n)


def pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 3-bit codes (values 0..7), 8 codes in 3 bytes, along the last dim.

    Each group of 8 codes forms a 24-bit little-endian word ``w`` in which code ``j``
    occupies bits ``3j..3j+2``; ``w`` is stored as bytes ``w & 0xFF``, ``(w >> 8) & 0xFF``,
    ``(w >> 16) & 0xFF``.  ``cJ.k`` below is bit ``k`` of code ``J``::

        bit:     7    6    5    4    3    2    1    0
        byte 0: c2.1 c2.0 c1.2 c1.1 c1.0 c0.2 c0.1 c0.0
        byte 1: c5.0 c4.2 c4.1 c4.0 c3.2 c3.1 c3.0 c2.2
        byte 2: c7.2 c7.1 c7.0 c6.2 c6.1 c6.0 c5.2 c5.1

    Example: ``pack_3bit([1, 2, 3, 4, 5, 6, 7, 0]) == [0xD1, 0x58, 0x1F]``.
    ``uint8 [..., n] -> uint8 [..., 3 * ceil(n / 8)]``; the tail is zero-padded.
    """
    _check_codes(codes, 3)
    lead = codes.shape[:-1]
    m = packed_size(codes.shape[-1], 3) // 3
    units = _pad_last(codes, 8).reshape(*lead, m, 8).to(torch.int32)
    word = units[..., 0].clone()
    for j in range(1, 8):
        word |= units[..., j] << (3 * j)
    out = torch.stack([(word >> (8 * k)) & 0xFF for k in range(3)], dim=-1)
    return out.to(torch.uint8).reshape(*lead, 3 * m)


def unpack_3bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_3bit`: ``uint8 [..., 3 * ceil(n / 8)] -> uint8 [..., n]``."""
    _check_packed(packed, 3, n)
    lead = packed.shape[:-1]
    m = packed.shape[-1] // 3
    b = packed.reshape(*lead, m, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
    codes = (word.unsqueeze(-1) >> shifts) & 0x7
    return codes.to(torch.uint8).reshape(*lead, 8 * m)[..., :n].contiguous()


def pack_8bit(codes: torch.Tensor) -> torch.Tensor:
    """ "Pack" 8-bit codes (values 0..255): identity layout, one code per byte::

        byte:  | c0 c0 c0 c0 c0 c0 c0 c0 |
        bit:     7  6  5  4  3  2  1  0

    Returns a contiguous copy, ``uint8 [..., n] -> uint8 [..., n]``.
    """
    _check_codes(codes, 8)
    return codes.clone(memory_format=torch.contiguous_format)


def unpack_8bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_8bit` (a contiguous copy): ``uint8 [..., n] -> uint8 [..., n]``."""
    _check_packed(packed, 8, n)
    return packed.clone(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- dispatchers

_PACKERS = {2: pack_2bit, 3: pack_3bit, 4: pack_4bit, 8: pack_8bit}
_UNPACKERS = {2: unpack_2bit, 3: unpack_3bit, 4: unpack_4bit, 8: unpack_8bit}


def packed_size(n: int, bits: int) -> int:
    """Packed length of ``n`` codes of width ``bits``: ``ceil(n * bits / 8)``, or ``3 * ceil(n / 8)`` for 3 bits."""
    _check_bits(bits)
    _check_n(n)
    if bits == 3:
        return 3 * ((n + 7) // 8)
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8 [..., n]`` codes in ``[0, 2**bits)`` along the last dim (see ``pack_<bits>bit``)."""
    _check_bits(bits)
    return _PACKERS[bits](codes)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack ``uint8 [..., packed_size(n, bits)]`` back to ``uint8 [..., n]`` codes."""
    _check_bits(bits)
    return _UNPACKERS[bits](packed, n)


# --------------------------------------------------------------------------- a whole series


def series_shape(term_bits: tuple[int, ...], out_features: int, in_features: int) -> tuple[int, ...]:
    """Shape of the packed codes buffer of a series with widths ``term_bits``::

    uniform widths  [T, out, packed_size(in, X)]          term-major, one packed row per output
    mixed widths    [out, Σ_i packed_size(in, X_i)]        each row: term 1's packed row, then term 2's, …
    """
    if len(set(term_bits)) == 1:
        return (len(term_bits), out_features, packed_size(in_features, term_bits[0]))
    return (out_features, sum(packed_size(in_features, b) for b in term_bits))


def pack_series(codes: torch.Tensor, term_bits: tuple[int, ...]) -> torch.Tensor:
    """Pack ``uint8 [T, out, in]`` codes, term i in ``[0, 2**X_i)``, into the layout of ``series_shape``."""
    if codes.dim() != 3 or codes.shape[0] != len(term_bits):
        raise ValueError(
            f"codes of shape {tuple(codes.shape)} do not hold {len(term_bits)} terms [T, out, in]"
        )
    if len(set(term_bits)) == 1:
        return pack(codes, term_bits[0])
    return torch.cat([pack(codes[i], b) for i, b in enumerate(term_bits)], dim=-1)


def unpack_series(packed: torch.Tensor, term_bits: tuple[int, ...], in_features: int) -> torch.Tensor:
    """Inverse of ``pack_series``: ``uint8 [T, out, in]``."""
    if len(set(term_bits)) == 1:
        return unpack(packed, term_bits[0], in_features)
    sizes = [packed_size(in_features, b) for b in term_bits]
    parts = torch.split(packed, sizes, dim=-1)
    return torch.stack([unpack(p, b, in_features) for p, b in zip(parts, term_bits, strict=True)])


def term_bytes(term_bits: tuple[int, ...], out_features: int, in_features: int) -> tuple[int, ...]:
    """Bytes each term occupies in the packed buffer."""
    return tuple(out_features * packed_size(in_features, b) for b in term_bits)
