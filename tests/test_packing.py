"""Tests for fpxint_hf.packing: exact round trips, sizes, documented layouts, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fpxint_hf import packing
from fpxint_hf.packing import (
    SUPPORTED_BITS,
    pack,
    pack_2bit,
    pack_3bit,
    pack_4bit,
    pack_8bit,
    packed_size,
    unpack,
    unpack_2bit,
    unpack_3bit,
    unpack_4bit,
    unpack_8bit,
)

NS = (1, 2, 3, 5, 7, 8, 9, 31, 33, 63, 64, 65, 127, 576, 1536)
LEADS = ((), (1,), (3,), (2, 5), (0,))
PAIRS = {
    2: (pack_2bit, unpack_2bit),
    3: (pack_3bit, unpack_3bit),
    4: (pack_4bit, unpack_4bit),
    8: (pack_8bit, unpack_8bit),
}


def _expected_size(n: int, bits: int) -> int:
    return 3 * math.ceil(n / 8) if bits == 3 else math.ceil(n * bits / 8)


def _random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    if codes.numel() >= 2:
        flat = codes.view(-1)
        flat[0] = 0
        flat[-1] = 2**bits - 1
    return codes


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_roundtrip_all_shapes(bits: int, lead: tuple[int, ...]) -> None:
    pack_fn, unpack_fn = PAIRS[bits]
    for n in NS:
        codes = _random_codes((*lead, n), bits, seed=1000 * bits + n)
        packed = pack_fn(codes)
        assert packed.dtype == torch.uint8
        assert packed.shape == (*lead, _expected_size(n, bits))
        assert packed.is_contiguous()
        out = unpack_fn(packed, n)
        assert out.dtype == torch.uint8
        assert torch.equal(out, codes), (bits, lead, n)
        # dispatchers agree with the per-width pair
        assert torch.equal(pack(codes, bits), packed)
        assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_roundtrip_full_range_every_value(bits: int) -> None:
    codes = torch.arange(2**bits, dtype=torch.uint8).repeat(3)[: 3 * 2**bits - 1].reshape(1, -1)
    assert torch.equal(unpack(pack(codes, bits), bits, codes.shape[-1]), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_non_contiguous_input_and_no_aliasing(bits: int) -> None:
    base = _random_codes((9, 6), bits, seed=bits)
    codes = base.t()  # non-contiguous [6, 9]
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed, bits, 9), codes)
    before = base.clone()
    packed.fill_(0)
    assert torch.equal(base, before)  # packing never writes into / aliases the input


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_padding_is_zero(bits: int) -> None:
    n = 5
    codes = torch.full((n,), 2**bits - 1, dtype=torch.uint8)
    padded = torch.cat([codes, torch.zeros(8 - n, dtype=torch.uint8)])
    # packing 5 codes equals packing them followed by explicit zeros (up to a full 8-code unit)
    assert torch.equal(pack(codes, bits), pack(padded, bits)[: packed_size(n, bits)])


def test_roundtrip_seeded_fuzz() -> None:
    g = torch.Generator().manual_seed(1234)
    for seed in range(150):
        bits = SUPPORTED_BITS[seed % len(SUPPORTED_BITS)]
        lead = tuple(
            torch.randint(0, 4, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g).tolist()
        )
        n = int(torch.randint(1, 81, (1,), generator=g))
        codes = _random_codes((*lead, n), bits, seed)
        packed = pack(codes, bits)
        assert packed.shape == (*lead, packed_size(n, bits))
        assert torch.equal(unpack(packed, bits, n), codes), (bits, lead, n)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    lead=st.lists(st.integers(0, 3), max_size=2),
    n=st.integers(1, 80),
    seed=st.integers(0, 2**31 - 1),
)
def test_roundtrip_property(bits: int, lead: list[int], n: int, seed: int) -> None:
    codes = _random_codes((*lead, n), bits, seed)
    packed = pack(codes, bits)
    assert packed.shape == (*lead, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_size(bits: int) -> None:
    for n in (0, *NS, 4096, 4097):
        assert packed_size(n, bits) == _expected_size(n, bits)
    assert packed_size(1536, 2) == 384
    assert packed_size(1536, 3) == 576
    assert packed_size(1536, 4) == 768
    assert packed_size(1536, 8) == 1536


# --------------------------------------------------------------------------- documented layouts


def _u8(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def test_layout_2bit() -> None:
    # code j at bits 2j..2j+1, code 0 in the low bits
    assert torch.equal(pack_2bit(_u8([1, 2, 3, 0])), _u8([0b00_11_10_01]))
    assert torch.equal(pack_2bit(_u8([3])), _u8([0b11]))
    assert torch.equal(pack_2bit(_u8([0, 0, 0, 3, 1])), _u8([0xC0, 0x01]))


def test_layout_4bit() -> None:
    # even index in the low nibble, odd index in the high nibble
    assert torch.equal(pack_4bit(_u8([1, 2])), _u8([0x21]))
    assert torch.equal(pack_4bit(_u8([0xF, 0x0, 0xA])), _u8([0x0F, 0x0A]))
    assert torch.equal(pack_4bit(_u8([[1, 2], [3, 4]])), _u8([[0x21], [0x43]]))


def test_layout_3bit() -> None:
    # 24-bit little-endian word, code j at bits 3j..3j+2
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(c << (3 * j) for j, c in enumerate(codes))
    expected = [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]
    assert expected == [0xD1, 0x58, 0x1F]
    assert torch.equal(pack_3bit(_u8(codes)), _u8(expected))
    # a single code lands in the low bits of byte 0; the rest of the unit is zero padding
    assert torch.equal(pack_3bit(_u8([5])), _u8([5, 0, 0]))
    # code 5 occupies word bits 15..17: straddles byte 1 (bit 7) and byte 2 (bits 0..1)
    assert torch.equal(pack_3bit(_u8([0, 0, 0, 0, 0, 7])), _u8([0x00, 0x80, 0x03]))


def test_layout_8bit_identity() -> None:
    codes = _u8([[0, 255, 17], [128, 1, 2]])
    assert torch.equal(pack_8bit(codes), codes)
    assert torch.equal(unpack_8bit(codes, 3), codes)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad_bits", [0, 1, 5, 6, 7, 16, True])
def test_bad_bits(bad_bits: int) -> None:
    codes = _u8([0, 1])
    for call in (
        lambda: pack(codes, bad_bits),
        lambda: unpack(codes, bad_bits, 2),
        lambda: packed_size(2, bad_bits),
    ):
        with pytest.raises(ValueError, match=r"bits=.*allowed values.*\(2, 3, 4, 8\)"):
            call()


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.float32, torch.bool])
def test_bad_dtype(bits: int, dtype: torch.dtype) -> None:
    codes = torch.zeros(8, dtype=dtype)
    with pytest.raises(ValueError, match=rf"codes must have dtype torch.uint8, got dtype {dtype}"):
        pack(codes, bits)
    with pytest.raises(ValueError, match=rf"packed must have dtype torch.uint8, got dtype {dtype}"):
        unpack(torch.zeros(packed_size(8, bits), dtype=dtype), bits, 8)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_codes_out_of_range(bits: int) -> None:
    codes = _u8([0, 1, 2**bits, 2**bits + 3, 1])
    with pytest.raises(ValueError, match=rf"\[0, {2**bits - 1}\].*max found is {2**bits + 3}"):
        PAIRS[bits][0](codes)
    with pytest.raises(ValueError, match="max found"):
        pack(codes, bits)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_unpack_wrong_packed_size(bits: int) -> None:
    n = 9
    packed = pack(_random_codes((2, n), bits, seed=0), bits)
    for wrong_n in (n + 8, 64):
        with pytest.raises(
            ValueError, match=rf"packed last dim is {packed.shape[-1]}.*packed_size\(n={wrong_n}"
        ):
            unpack(packed, bits, wrong_n)
    with pytest.raises(ValueError, match="packed last dim"):
        PAIRS[bits][1](packed[..., :-1], n)


def test_bad_n_and_scalar_inputs() -> None:
    with pytest.raises(ValueError, match="n=-1"):
        packed_size(-1, 4)
    with pytest.raises(ValueError, match="n=2.5"):
        unpack(_u8([0]), 4, 2.5)
    with pytest.raises(ValueError, match="0-d"):
        pack(torch.tensor(3, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="torch.Tensor"):
        pack([1, 2], 4)


def test_module_surface() -> None:
    for bits in range(1, 10):  # exactly the advertised widths pack; the others are refused
        codes = torch.zeros(3, dtype=torch.uint8)
        if bits in SUPPORTED_BITS:
            assert torch.equal(unpack(pack(codes, bits), bits, 3), codes)
        else:
            with pytest.raises(ValueError, match=f"bits={bits}"):
                pack(codes, bits)
    assert packing.__doc__ and "save_pretrained" in packing.__doc__
    for name in packing.__all__:
        assert getattr(packing, name).__doc__ or name == "SUPPORTED_BITS"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_cuda_roundtrip_matches_cpu(bits: int) -> None:
    codes = _random_codes((4, 577), bits, seed=7)
    packed_cpu = pack(codes, bits)
    packed_gpu = pack(codes.cuda(), bits)
    assert packed_gpu.device.type == "cuda"
    assert torch.equal(packed_gpu.cpu(), packed_cpu)
    out = unpack(packed_gpu, bits, 577)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), codes)
