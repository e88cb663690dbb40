"""Peers of eval/bench_pareto.py that have no CPU package: SINQ (the authors' code), Hadamard + RTN (QuaRot's
RTN rows) and Hadamard + MSE-optimal Gaussian grid (HIGGS), all at group 64, fake-quantized in float32.

- **SINQ** (Müller et al. 2025, "SINQ: Sinkhorn-Normalized Quantization for Calibration-Free Low-Precision LLM
  Weights"): the authors' package ``sinq==0.2.0`` (``pip install --no-deps --target DIR``, its
  ``sitecustomize.py`` deleted, ``SINQ_AUTO_PATCH=0``), ``sinq.quantizer.Quantizer.quantize`` with the
  defaults of its README/``sinq_base_quant_config``: ``method="sinq"`` (remapped there to ``"sinq_quantAux"``:
  Sinkhorn-normalized dual scaling per 64-column tile, the kurtosis gate, the per-group scales and zeros
  themselves 8-bit quantized), ``tiling_mode="1D"``, ``axis=1``, group 64.  Bits counted from what it returns:
  the codes, the 8-bit scales and zeros with their float16 min/step (per 32 groups for the scales, per layer
  for the zeros), the float16 column scale (one per input column).
- **Hadamard + RTN** (QuaRot, Ashkboos et al. 2024, its RTN weight rows): x -> x R with R = D H / sqrt(n) an
  orthogonal randomized Hadamard of the full input dimension (H a Kronecker product of a Sylvester and a Paley
  matrix, as QuaRot's ``hadamard_utils`` for non-power-of-two sizes; D random signs), W -> W R quantized by
  asymmetric min-max RTN at group 64.  The rotation is exact in QuaRot (fused into the previous layer or done
  online), so the model here runs W_hat = Q(W R) R^T in float32, which equals rotating x at run time.
- **HIGGS** (Malinovskii et al. 2024, "Pushing the Limits of LLM Quantization via the Linearity Theorem"): a
  randomized Hadamard of each input group of 64 makes the weights ~Gaussian; each group is divided by its RMS
  (stored float16) and rounded to the MSE-optimal (Lloyd-Max) grid of N(0, 1) with 2^bits levels (scalar
  grid, p = 1).  transformers' HIGGS integration needs CUDA and FLUTE, so this is written here from the paper;
  the rotation is folded back as above.

Every function returns the dequantized weight and the stored bits; ``eval/`` only (never imported by the
package).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from fpxint_hf.expansion import rtn

GROUP = 64


# ---------------------------------------------------------------------------------------------- SINQ


def sinq(w: torch.Tensor, bits: int, group: int = GROUP) -> tuple[torch.Tensor, float]:
    """The authors' SINQ on one weight (defaults of ``sinq_base_quant_config``): (dequantized, stored bits)."""
    from sinq.quantizer import Quantizer

    w_q, meta = Quantizer.quantize(
        w.float(),
        None,  # no activations: calibration-free SINQ (A-SINQ would take them)
        nbits=bits,
        group_size=group,
        round_zero=bits == 4,  # as sinq_base_quant_config
        axis=1,
        bitpack=False,
        compute_dtype=torch.float32,
        device="cpu",
        tiling_mode="1D",
        method="sinq_quantAux",  # what sinq_base_quant_config(method="sinq") passes on
    )
    deq = Quantizer.dequantize(w_q, meta).reshape(w.shape).float()
    return deq, w.numel() * bits + _aux_bits(meta["scale"]) + _aux_bits(meta["zero"]) + 16 * w.shape[1]


def _aux_bits(aux: object) -> float:
    """Stored bits of an 8-bit-quantized scale/zero vector (sinq's ``rtn8``: codes, float16 step and min)."""
    codes, step, low, _shape = aux  # type: ignore[misc]
    return 8 * codes.numel() + 16 * (step.numel() + low.numel())


# ------------------------------------------------------------------------------------------ Hadamard


def _legendre(a: int, p: int) -> int:
    a %= p
    return 0 if a == 0 else (1 if pow(a, (p - 1) // 2, p) == 1 else -1)


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _paley(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of ``order`` by Paley's construction I (q = order-1 ≡ 3 mod 4) or II
    (q = order/2-1 ≡ 1 mod 4), q prime; None when neither applies."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        jac = torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
        return s + torch.eye(order, dtype=torch.float64)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:
        jac = torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, jac
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@cache
def hadamard(n: int) -> torch.Tensor:
    """An n x n Hadamard matrix (entries ±1, H H^T = n I): Sylvester 2^k ⊗ Paley K; ValueError if none found."""
    for k in range(int(math.log2(n)), -1, -1):
        if n % (1 << k):
            continue
        base = n >> k
        h = torch.ones(1, 1, dtype=torch.float64) if base == 1 else _paley(base)
        if h is None:
            continue
        syl = torch.ones(1, 1, dtype=torch.float64)
        for _ in range(k):
            syl = torch.kron(syl, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
        out = torch.kron(syl, h)
        if torch.equal(out @ out.T, n * torch.eye(n, dtype=torch.float64)):
            return out
    raise ValueError(f"no Hadamard matrix of order {n} from Sylvester x Paley")


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """The orthogonal D H / sqrt(n) (D random signs, seeded): QuaRot's randomized Hadamard, float32."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return (signs[:, None] * hadamard(n) / math.sqrt(n)).float()


def rotated_rtn(w: torch.Tensor, bits: int, seed: int, group: int = GROUP) -> tuple[torch.Tensor, float]:
    """QuaRot's RTN on the rotated weight, rotation folded back: Q(W R) R^T; (weight, stored bits)."""
    r = random_hadamard(w.shape[1], seed)
    return rtn(w @ r, bits, group) @ r.T, w.numel() * (bits + 32 / group)


# --------------------------------------------------------------------------------------------- HIGGS


@cache
def gaussian_grid(bits: int, iters: int = 300) -> torch.Tensor:
    """The MSE-optimal (Lloyd-Max) scalar quantizer of N(0, 1) with 2^bits levels, sorted."""
    levels = 2**bits
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    c = [-2.5 + 5 * (i + 0.5) / levels for i in range(levels)]
    for _ in range(iters):
        edges = [-math.inf] + [(a + b) / 2 for a, b in zip(c, c[1:], strict=False)] + [math.inf]
        c = [
            (phi(lo) - phi(hi)) / max(cdf(hi) - cdf(lo), 1e-300)
            for lo, hi in zip(edges, edges[1:], strict=False)
        ]
    return torch.tensor(c, dtype=torch.float32)


def higgs(w: torch.Tensor, bits: int, seed: int, group: int = GROUP) -> tuple[torch.Tensor, float]:
    """HIGGS p=1: randomized Hadamard per group of ``group`` inputs, RMS scale per group, Gaussian MSE grid."""
    r = random_hadamard(group, seed)
    out_f, in_f = w.shape
    g = (w.float().reshape(out_f, in_f // group, group)) @ r
    scale = g.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12).half().float()
    grid = gaussian_grid(bits)
    mids = (grid[1:] + grid[:-1]) / 2
    q = grid[torch.bucketize(g / scale, mids)]
    return ((q * scale) @ r.T).reshape(out_f, in_f), w.numel() * (bits + 16 / group)
