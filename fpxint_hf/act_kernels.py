"""``W·A`` with both halves of Eq. 1 expanded: the weight series of ``expansion.py`` times the activation series
of ``activations.py``, as integer × integer matmuls plus a few small float terms (W4A8, W4A4, ...).

Write the weight of one layer as ``W = Σ_t s_w[t]·Wq_t + C + M_sa`` (``Wq_t`` integer codes; ``C`` a constant
per (row, group): the bias plus the mid-rise offsets of a nested series; ``M_sa`` sparse) and a token's
activation as ``Â = Σ_j s_A[j]·Ã_j + bias_A·1 + A_sa``.  Then, per group ``g`` of ``group_size`` inputs,

    y = Σ_g Σ_t Σ_j s_w[t,g] · s_A[j] · (Wq_{t,g} · Ã_{j,g})        the T_w × T_a integer products
      + Σ_g C_g · (Σ_{c∈g} A_int) + M_sa·A_int                       (A_int = Σ_j s_A[j]·Ã_j, float)
      + bias_A · (W·1) + W·A_sa                                     (W·1 precomputed; A_sa sparse)

The weight terms are collapsed into one int8 matrix where they fit (``kernels.collapse_shift``: e.g. 4+4
nested), else kept one per term; the activation terms are stacked along the token dimension, so each group
takes one matmul ``[J·N, gs] × [gs, T'·out]`` for every (t, j) pair.  Three methods compute these integer
products ``P``, all exactly, so they give bit-identical outputs (the same float finishing follows):

- ``"reference"``: float64 matmul on the integer codes (exact: ``|P| <= gs·2^7·2^7`` is far below 2^53), any
  device;
- ``"int"``: ``torch._int_mm`` (int8 × int8 → int32; exact while ``gs·2^14 < 2^31``, i.e. every group size up
  to 65536); the faster CPU path (eval/results/speed.md: 14.3 vs 19.3 ms for the float32 path on a 1536x576
  layer at 512 tokens), though one matmul per weight group keeps both well behind one bf16 matmul;
- ``"float32"``: float32 matmul on the integer codes, exact while ``gs·max|Wq|·max|Ã| <= 2^24`` (every
  partial sum is then an integer float32 holds exactly: ``float32_exact``).

``auto_method`` picks ``int`` on the CPU, else ``reference`` (``torch._int_mm`` on CUDA wants more than 16 rows
and dimensions that are multiples of 8: untested here, no GPU).  Pure torch: no ``nn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .activations import ActivationSeries, expand_activations, series_part
from .expansion import Expansion, reconstruct, term_offsets, term_scales
from .kernels import collapse_codes, collapse_shift, outlier_matrix, sparse_term

ACT_METHODS = ("reference", "int", "float32")
_CODE_DTYPES = {"reference": torch.float64, "int": torch.int8, "float32": torch.float32}
_FLOAT32_EXACT = 2**24


@dataclass(frozen=True)
class ActSpec:
    """How a layer expands its input: ``bits``, ``terms``, ``tol``, ``outliers`` per token, product ``method``."""

    bits: int
    terms: int
    tol: float = 0.0
    outliers: int = 0
    method: str = "reference"


@dataclass
class ActWeights:
    """A layer's weight series prepared for ``act_linear`` (first ``terms`` weight terms)."""

    codes: torch.Tensor  # [G, gs, T'·out] integer codes Wq (int8, or float holding integers), per group
    scale: torch.Tensor  # float32 [G, T', out]: s_w of each code matrix per group
    const: torch.Tensor | None  # float32 [out, G]: C (bias + mid-rise offsets - shift·s_w), or None when 0
    row_sum: torch.Tensor  # float32 [out]: W·1 (multiplies bias_A)
    dense_t: torch.Tensor | None  # float32 [in, out]: W.T, only for W·A_sa when W has saturated values (M_sa)
    outliers: torch.Tensor | None  # M_sa as float32 sparse CSR [out, in], or None
    max_code: int  # max |Wq|
    spec: ActSpec


def float32_exact(group_size: int, weight_max_code: int, act_bits: int) -> bool:
    """Whether float32 matmuls on the integer codes are exact: ``gs·max|Wq|·2^(act_bits-1) <= 2^24``."""
    return group_size * weight_max_code * 2 ** (act_bits - 1) <= _FLOAT32_EXACT


def auto_method(group_size: int, act_bits: int, device: torch.device | str) -> str:
    """``int`` (``torch._int_mm``, exact for every group size) on the CPU, else ``reference``."""
    return "int" if torch.device(device).type == "cpu" else "reference"


def weight_codes(e: Expansion, terms: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes ``[T', out, in]`` (int32), their scales ``[T', out, G]`` and the constant ``C`` ``[out, G]``
    of the first ``terms`` terms: collapsed into one matrix when ``kernels.collapse_shift`` fits int8."""
    steps = term_scales(e.scale, e.term_bits, terms, e.series)  # [k, out, G]
    offsets = torch.tensor(term_offsets(e.term_bits, terms, e.series), device=steps.device).view(-1, 1, 1)
    const = (steps * offsets).sum(0)  # the mid-rise half steps
    if e.zero is not None:
        const = const + e.zero.float()
    shift = collapse_shift(e.term_bits, terms, e.series)
    if shift is not None:
        codes = (collapse_codes(e, terms) + shift).unsqueeze(0)
        return codes, steps[-1:], const - shift * steps[-1]
    centred = torch.stack([e.codes[i].to(torch.int32) - 2 ** (e.term_bits[i] - 1) for i in range(terms)])
    return centred, steps, const


def prepare_act(e: Expansion, terms: int, spec: ActSpec, device: torch.device | str = "cpu") -> ActWeights:
    """Prepare the first ``terms`` weight terms of ``e`` for ``act_linear`` with ``spec`` (once per layer)."""
    if spec.method not in ACT_METHODS:
        raise ValueError(f"activation product method={spec.method!r} is not one of {ACT_METHODS}")
    codes, scale, const = weight_codes(e, terms)
    t, out, width = codes.shape
    gs = e.group_size
    groups = width // gs
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    if lo < -128 or hi > 127:
        raise ValueError(f"weight codes [{lo}, {hi}] do not fit int8 for the activation product")
    if spec.method == "float32" and not float32_exact(gs, max(-lo, hi), spec.bits):
        raise ValueError(
            f"float32 products are not exact for group_size={gs} with {spec.bits}-bit activations"
        )
    # [T', out, G, gs] -> [G, gs, T', out] -> [G, gs, T'·out]
    grouped = codes.view(t, out, groups, gs).permute(2, 3, 0, 1).reshape(groups, gs, t * out)
    w = reconstruct(e, terms)
    return ActWeights(
        codes=grouped.to(device=device, dtype=_CODE_DTYPES[spec.method]).contiguous(),
        scale=scale.permute(2, 0, 1).to(device=device, dtype=torch.float32).contiguous(),
        const=const.to(device) if bool(const.abs().max() > 0) else None,
        row_sum=w.sum(1).to(device),
        dense_t=w.t().contiguous().to(device) if spec.outliers and e.outlier_idx.numel() else None,
        outliers=outlier_matrix(e.outlier_idx, e.outlier_val, width).to(device)
        if e.outlier_idx.numel()
        else None,
        max_code=max(-lo, hi),
        spec=spec,
    )


def integer_products(a: torch.Tensor, codes: torch.Tensor, method: str) -> torch.Tensor:
    """``a @ codes`` for integer-valued ``a`` ``[M, gs]`` (int8) and one group's ``codes`` ``[gs, T'·out]``: the
    exact integer sums, as float32 (the same rounding whichever ``method`` computed them)."""
    if method == "int":
        return torch._int_mm(a, codes).float()
    return (a.to(codes.dtype) @ codes).float()


def weight_columns(w: ActWeights, cols: torch.Tensor) -> torch.Tensor:
    """``W[:, cols]ᵀ`` (float32 ``[len(cols), out]``) = ``Σ_t s_w·Wq + C`` at those inputs, read from the
    integer codes: no dense copy of W is kept (``M_sa`` excluded: with it, ``prepare_act`` keeps ``dense_t``)."""
    groups, gs, tout = w.codes.shape
    t = w.scale.shape[1]
    g = torch.div(cols, gs, rounding_mode="floor")
    q = w.codes[g, cols - g * gs].float()  # [K, T'·out]
    out = q.mul_(w.scale[g].view(-1, tout)) if t == 1 else (q.view(-1, t, tout // t) * w.scale[g]).sum(1)
    return out if w.const is None else out.add_(w.const.t()[g])


def act_linear(x2d: torch.Tensor, w: ActWeights) -> torch.Tensor:
    """``x2d @ W.T`` (``[N, in] -> [N, out]`` in x's dtype) with ``x2d`` expanded into its activation series."""
    spec, (groups, gs, tout) = w.spec, w.codes.shape
    t = w.scale.shape[1]
    out = tout // t
    s = expand_activations(x2d, spec.bits, spec.terms, spec.tol, spec.outliers)
    return _product(s, w, groups, gs, t, out).to(x2d.dtype)


def _product(s: ActivationSeries, w: ActWeights, groups: int, gs: int, t: int, out: int) -> torch.Tensor:
    """The sum of the module docstring.  ``s_A`` does not depend on the group, so the integer products are
    reduced as ``Σ_j s_A[j] · (Σ_g Σ_t s_w[t,g] · P[t,j,g])``: one matmul and one fused multiply-add per group
    (per channel: one matmul, scaled in place)."""
    j, n, width = s.codes.shape
    a = s.codes.reshape(j * n, width)
    if groups == 1:
        p = integer_products(a, w.codes[0], w.spec.method)
        acc = p.mul_(w.scale[0].reshape(-1)) if t == 1 else (p.view(j * n, t, out) * w.scale[0]).sum(1)
    else:
        # Σ_g Σ_t s_w·P, per act term
        acc = torch.zeros(j * n, out, dtype=torch.float32, device=s.codes.device)
        by_group = a.view(j * n, groups, gs).transpose(0, 1).contiguous()  # [G, J·N, gs]: one copy, not G
        for g in range(groups):
            p = integer_products(by_group[g], w.codes[g], w.spec.method)
            if t == 1:
                acc.addcmul_(p, w.scale[g])
            else:
                acc += (p.view(j * n, t, out) * w.scale[g]).sum(1)
    y = (
        acc.view(n, out).mul_(s.scale.view(n, 1))
        if j == 1
        else (acc.view(j, n, out) * s.scale.view(j, n, 1)).sum(0)
    )
    if w.const is not None:  # C_g · Σ_{c∈g} A_int, from the integer group sums of each term
        sums = s.codes.view(j, n, groups, gs).sum(-1, dtype=torch.float32)
        y.addmm_(torch.einsum("jn,jng->ng", s.scale, sums), w.const.t())
    if w.outliers is not None:
        y += sparse_term(series_part(s), w.outliers)
    y.addr_(s.bias, w.row_sum)  # bias_A · (W·1)
    if s.outlier_idx.numel():  # W·A_sa
        y += _outlier_product(s, w, n, width)
    return y


def _outlier_product(s: ActivationSeries, w: ActWeights, n: int, width: int) -> torch.Tensor:
    """``W·A_sa`` (float32 ``[n, out]``) = ``Σ_k val[n,k] · W[:, idx[n,k]]``: each token adds its ``K`` weighted
    weight columns, one weighted row gather (aten's ``embedding_bag``, mode 0 = sum; ~7x faster here than the
    dense ``[n, U] × [U, out]`` matmul it replaced).  The ``U`` distinct columns the tokens' outliers sit in are
    read once from the codes (activation outliers gather in few channels: SmolLM2 at 512 tokens, a median 29-98
    of 576 for q/k/v and gate/up); when W has saturated values of its own (``M_sa``), from the dense ``W.T``."""
    if w.dense_t is not None:
        table, index = w.dense_t, s.outlier_idx
    else:
        cols, index = torch.unique(s.outlier_idx, return_inverse=True)
        table = weight_columns(w, cols)
    k = index.shape[1]
    offsets = torch.arange(0, n * k, k, device=index.device)
    bag = torch.embedding_bag(table, index.reshape(-1), offsets, False, 0, False, s.outlier_val.reshape(-1))
    return bag[0]
