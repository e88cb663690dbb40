"""Block Hadamard rotation of a linear layer's input channels (``rotation="hadamard"``), pure torch.

A random orthogonal rotation ``R`` of the inputs leaves the layer unchanged, ``W x = (W R)(Rᵀ x)``, and spreads
each row's outliers over a block of columns, so ``W R`` has a flatter, more Gaussian distribution per group and
quantizes with less error (QuaRot, QuIP#: "incoherence processing").  Here ``R = D·H / √n`` per block of ``n``
consecutive input channels (``n`` = ``hadamard_block(in_features)``, a power of two): ``D`` a fixed diagonal of
random ±1 signs (stored with the layer), ``H`` the unnormalized ±1 Sylvester–Hadamard matrix (``H·H = n·I``).

Everything uses the *unnormalized* fast Walsh–Hadamard transform (``fwht``: additions and subtractions only)
and powers of two for the ``1/√n``, split as ``2^-a`` on the weight and ``2^(a-k)`` on the input
(``n = 2^k``, ``a = ⌊k/2⌋``), so the inverse is exact in float32 up to the rounding of the additions
(bit-exact on dyadic inputs of moderate range):

- ``rotate_weight(W)  = fwht_rows(W ⊙ d) · 2^-a``              (``W·D·H / 2^a``)
- ``rotate_input(x)   = fwht(x ⊙ d) · 2^(a-k)``                (``H·D·x · 2^(a-k)``)
- ``unrotate_weight(V) = d ⊙ fwht_rows(V) · 2^(a-k)``           (inverse of ``rotate_weight``)

so ``rotate_weight(W) @ rotate_input(x) == W @ x`` and ``unrotate_weight(rotate_weight(W)) == W``.
"""

from __future__ import annotations

import torch

MAX_BLOCK = 256  # the largest block; part of the checkpoint format (the block is derived, not stored)
SIGN_SEED = 0x5EED  # seed of the ±1 signs drawn when quantizing (the signs themselves are stored)


def hadamard_block(in_features: int) -> int:
    """The block size ``n``: the largest power of two <= ``MAX_BLOCK`` dividing ``in_features`` (at least 1)."""
    if in_features < 1:
        raise ValueError(f"in_features={in_features} must be >= 1")
    n = in_features & -in_features  # the largest power of two dividing it
    return min(n, MAX_BLOCK)


def random_signs(
    in_features: int, seed: int = SIGN_SEED, device: torch.device | str | None = None
) -> torch.Tensor:
    """int8 ``[in_features]`` of ±1, fixed by ``seed`` (a private generator: the global RNG is not touched)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (in_features,), generator=g, dtype=torch.int8)
    return (1 - 2 * bits).to(torch.int8).to(device)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform of every block of ``block`` consecutive entries of the last dim
    (``H·v`` with ``H`` the ±1 Sylvester matrix; ``fwht(fwht(v)) = block·v``).  ``block``: a power of two."""
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"block={block} must be a power of two dividing the last dim {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], -1, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).view(y.shape[0], -1, block)
        h *= 2
    return y.reshape(*lead, n)


def _exponents(block: int) -> tuple[int, int]:
    """``(a, k)`` with ``block = 2^k`` and ``a = ⌊k/2⌋``."""
    k = block.bit_length() - 1
    return k // 2, k


def _check_signs(signs: torch.Tensor, n: int) -> int:
    if signs.shape[-1] != n:
        raise ValueError(f"{signs.shape[-1]} rotation signs for {n} input channels")
    return hadamard_block(n)


def rotate_weight(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """float32 ``W·D·H / 2^a`` (per block) of a ``[out, in]`` weight: the matrix the series approximates."""
    block = _check_signs(signs, w.shape[-1])
    a, _ = _exponents(block)
    return fwht(w.float() * signs.float(), block) * 2.0**-a


def unrotate_weight(v: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """float32 inverse of ``rotate_weight``: ``V·H·D · 2^(a-k)`` (the weight in the original input basis)."""
    block = _check_signs(signs, v.shape[-1])
    a, k = _exponents(block)
    return fwht(v.float(), block) * (signs.float() * 2.0 ** (a - k))


def rotate_input(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """float32 ``H·D·x · 2^(a-k)`` (per block, along the last dim): ``rotate_weight(W) @ this == W @ x``."""
    block = _check_signs(signs, x.shape[-1])
    a, k = _exponents(block)
    return fwht(x.float() * signs.float(), block) * 2.0 ** (a - k)


def block_mean(importance: torch.Tensor, block: int) -> torch.Tensor:
    """``E[(Rᵀx)_j²]`` from ``E[x_j²]`` for uncorrelated inputs: every ``R_ij² = 1/n``, so each rotated channel
    carries the mean of its block (the common factor ``2^(2a-k)`` is dropped: the fit normalizes per group)."""
    a = importance.float().reshape(-1, block)
    return a.mean(-1, keepdim=True).expand_as(a).reshape(-1)
