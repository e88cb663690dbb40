"""Packed-integer CPU kernels for the FP=xINT series (Eq. 1 of ``expansion.py``).

Two fast paths compute ``y = x @ M.T`` for ``M = M_sa + bias·1 + Σ_{i<=k} scale_i·Q_i`` without ever
materialising the dequantized float matrix.  Both are prepared once per layer (``prepare_int4``/``prepare_int8``)
and then run per forward (``int4_linear``/``int8_linear``); ``backends.py`` registers them as backends (with
``backends.kernel_linear`` for any leading shape) and ``FPxINTLinear`` caches the prepared weights.

``int4`` (one ``torch.ops.aten._weight_int4pack_mm_for_cpu`` call for all active terms)
    The terms run as ONE matmul, stacked along the input dimension (the Abelian add inside the kernel):
    ``[x, x, …] @ [Q_1 | Q_2 | …]^T`` with a ``[T·G, N, 2]`` (scale, zero) table, the groups of term i
    following those of term i-1, so the kernel's float32 accumulator sums ``Σ_i scale_i·(Q_i x)`` and no
    per-term output is materialised (``eval/bench_speed.py`` times it against one int4 matmul of the same
    total size and against T sequential calls).  The codes are re-packed into PyTorch's own int4 layout
    (``_convert_weight_to_int4pack_for_cpu``; not the layout of ``packing.pack_4bit``), the table is in the
    compute dtype; the kernel computes ``(q - 8)·scale + zero``.  Term 1 carries the FP=xINT bias as its
    zero, later terms have zero 0.  ``M_sa x`` is added by ``sparse_term``.  Applies when

    - ``bits`` in {2, 3, 4} (2- and 3-bit codes are shifted by ``8 - 2^(X-1)`` into the int4 range,
      exactly);
    - the layer's group size is a multiple of a kernel group size in {32, 64, 128, 256} (per-channel
      layers too: their one scale per row is repeated over kernel groups);
    - x and the weights are on the CPU, x is float32, bfloat16 or float16.

    ``out_features`` need not be a multiple of 16 (the kernel's requirement): rows are zero-padded.

``int8`` (collapsed: one ``torch.ops.aten._weight_int8pack_mm`` call for all active terms)
    With one group per row (``group_size == in_features``) the terms merge into one wider integer:
    ``Σ_{i<=k} scale_i·c_i = scale_k · Σ_i m_i·c_i`` with integer multipliers ``m_i = scale_i / scale_k``
    (``collapse_multipliers``; legacy: powers of ``r = 2^X - 2`` with centred codes ``c_1 in [-2^(X-1),
    2^(X-1) - 1]``, ``c_i in [-(2^(X-1) - 1), 2^(X-1) - 1]``; nested: mid-rise codes, shifted by
    ``collapse_shift``).  Applies when that
    integer's worst-case range (``collapsed_range``) fits int8: e.g. (legacy) X=4 with k <= 2 (k=2: [-119, 105]),
    X=3 with k <= 2, X=2 with k <= 6, X=8 with k = 1.  The bias (``zero · Σx``) and ``M_sa x`` are
    added afterwards.  CPU only, x float32, bfloat16 or float16.

Speed (torch 2.13, AVX2 CPU; ``eval/results/bench_kernels.md``): both ops are vectorized only for
bfloat16 activations; with float32 or float16 they are exact but far slower than dense ``F.linear``.
``backends.choose_path`` (the ``"auto"`` forward mode) therefore picks a kernel for bfloat16 only.  At one
token (decode) the int4 op is compute-bound on AVX2 (unpacking nibbles), far below the copy bandwidth: it, not
the Python around it, sets FP=xINT's decode speed (``eval/results/speed.md`` and its profile).

Not implemented: a CUDA path (``torch.ops.aten._weight_int4pack_mm`` with
``_convert_weight_to_int4pack``).  No GPU was available to test it, so CUDA tensors are reported as
unsupported and ``FPxINTLinear`` in ``"auto"`` mode falls back to the ``dense`` backend there.

Pure torch functions and dataclasses: no ``nn.Module``, no transformers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .expansion import Expansion, code_range, normalize_bits, term_offsets, term_scales

INT4_GROUP_SIZES = (256, 128, 64, 32)  # group sizes of _weight_int4pack_mm_for_cpu, largest first
INT4_BITS = (2, 3, 4)
INT4_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AUTO_DTYPES = (torch.bfloat16,)  # the activation dtypes for which the CPU kernels are fast (torch 2.13)
_INT4_OPS = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
_INT8_OPS = ("_weight_int8pack_mm",)


@dataclass(frozen=True)
class Support:
    """Whether a kernel applies, and why not (``reason`` is empty when it does)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __iter__(self):  # ``ok, reason = backend.can_implement(query)``
        return iter((self.ok, self.reason))


@dataclass
class Int4Weights:
    """Prepared ``int4`` weights of the first ``terms`` terms of one layer, stacked along the input dimension."""

    packed: torch.Tensor  # uint8, _convert_weight_to_int4pack_for_cpu layout of [N_pad, terms·in] codes
    scale_and_zero: torch.Tensor  # [terms·G', N_pad, 2] (scale, zero) in the compute dtype, term-major groups
    group_size: int  # kernel group size (divides the layer's group size)
    out_features: int
    terms: int
    outliers: torch.Tensor | None  # M_sa as float32 sparse CSR [out, in] (``outlier_matrix``), or None


@dataclass
class Int8Weights:
    """Prepared collapsed ``int8`` weight of the first ``terms`` terms of one per-channel layer."""

    weight: torch.Tensor  # int8 [out, in]: Σ_i m_i·c_i + shift (see ``collapse_codes``)
    scales: torch.Tensor  # [out] scale_k in the compute dtype
    zero: torch.Tensor | None  # float32 [out, 1]: bias + mid-rise offsets - shift·scale_k, or None when all 0
    terms: int
    outliers: torch.Tensor | None  # M_sa as float32 sparse CSR [out, in], or None


@dataclass
class DenseWeights:
    """The first ``terms`` terms dequantized once into one matrix in the compute dtype (``"dense"`` mode).

    Fastest where no packed kernel is (float32/float16 on the CPU, CUDA), at the memory of a dense layer."""

    weight: torch.Tensor  # [out, in] in the compute dtype
    terms: int


def _ops_missing(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not hasattr(torch.ops.aten, n)]


def _common_support(device: torch.device | str, dtype: torch.dtype, ops: tuple[str, ...]) -> Support:
    missing = _ops_missing(ops)
    if missing:
        return Support(False, f"torch {torch.__version__} lacks torch.ops.aten.{', '.join(missing)}")
    if torch.device(device).type != "cpu":
        return Support(False, f"device {torch.device(device)} is not the CPU (no CUDA path is implemented)")
    if dtype not in KERNEL_DTYPES:
        return Support(False, f"activation dtype {dtype} is not one of {KERNEL_DTYPES}")
    return Support(True)


def int4_group_size(group_size: int) -> int | None:
    """Largest kernel group size dividing the layer's ``group_size`` (``None`` if there is none)."""
    return next((g for g in INT4_GROUP_SIZES if group_size % g == 0), None)


def term_widths(bits: int | tuple[int, ...], terms: int = 1) -> tuple[int, ...]:
    """The widths of the first ``terms`` terms: ``bits`` repeated, or the head of a per-term tuple."""
    return normalize_bits(bits, terms) if isinstance(bits, int) else tuple(bits)[:terms]


def int4_supported(
    bits: int | tuple[int, ...],
    group_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Support:
    """Whether the ``int4`` path applies to a layer with these parameters (see the module docstring)."""
    widths = term_widths(bits, len(bits) if isinstance(bits, tuple) else 1)
    if any(b not in INT4_BITS for b in widths):
        return Support(False, f"bits={bits} is not one of {INT4_BITS}")
    if int4_group_size(group_size) is None:
        return Support(False, f"group_size={group_size} is not a multiple of 32")
    return _common_support(device, dtype, _INT4_OPS)


def collapse_multipliers(bits: int | tuple[int, ...], terms: int, series: str) -> tuple[int, ...]:
    """``m_i = scale_i / scale_k`` (integers) for ``i <= k = terms``."""
    widths = term_widths(bits, terms)
    steps = term_scales(torch.ones(1, 1), widths, terms, series)[:, 0, 0].double()
    return tuple(int(round(float(v))) for v in steps / steps[-1])


def collapsed_range(bits: int | tuple[int, ...], terms: int, series: str) -> tuple[int, int]:
    """Worst-case range of ``Σ_{i<=k} m_i·c_i`` (``k = terms``) over all valid centred codes."""
    widths = term_widths(bits, terms)
    mult = collapse_multipliers(widths, terms, series)
    ranges = [code_range(b, i, series) for i, b in enumerate(widths)]
    return sum(m * r[0] for m, r in zip(mult, ranges, strict=True)), sum(
        m * r[1] for m, r in zip(mult, ranges, strict=True)
    )


def collapse_shift(bits: int | tuple[int, ...], terms: int, series: str) -> int | None:
    """The integer added to ``Σ m_i·c_i`` so that it fits int8 (0 when it already does), or ``None``."""
    lo, hi = collapsed_range(bits, terms, series)
    if hi - lo > 255:
        return None
    return 0 if lo >= -128 and hi <= 127 else -128 - lo


def int8_supported(
    bits: int | tuple[int, ...],
    group_size: int,
    in_features: int,
    terms: int,
    series: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Support:
    """Whether the collapsed ``int8`` path applies to the first ``terms`` terms of such a layer."""
    if group_size != in_features:
        return Support(False, f"group_size={group_size} is not per-channel (in_features={in_features})")
    if collapse_shift(bits, terms, series) is None:
        lo, hi = collapsed_range(bits, terms, series)
        return Support(False, f"{terms} terms of {bits} bits collapse to [{lo}, {hi}], wider than int8")
    return _common_support(device, dtype, _INT8_OPS)


# --------------------------------------------------------------------------- shared small terms


def zero_term(x2d: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``bias · Σx`` per group: float32 ``[n, out]`` for ``x2d`` ``[n, in]`` and ``zero`` ``[out, G]``."""
    xs = x2d.float().reshape(x2d.shape[0], -1, group_size).sum(-1)  # [n, G]
    return xs @ zero.float().t()


def outlier_matrix(idx: torch.Tensor, val: torch.Tensor, in_features: int) -> torch.Tensor:
    """``M_sa`` as a float32 sparse CSR ``[out, in]`` from its per-row lists ``idx``/``val`` ``[out, K]``
    (duplicate columns summed, unused slots kept as explicit zeros)."""
    out_features, k = idx.shape
    rows = torch.arange(out_features, device=idx.device).repeat_interleave(k)
    with warnings.catch_warnings():  # torch warns once that sparse CSR is "beta"
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
        coo = torch.sparse_coo_tensor(
            torch.stack([rows, idx.reshape(-1).long()]), val.reshape(-1).float(), (out_features, in_features)
        )
        return coo.coalesce().to_sparse_csr()


def sparse_term(x2d: torch.Tensor, m_sa: torch.Tensor) -> torch.Tensor:
    """``M_sa x``: float32 ``[n, out]`` for ``x2d`` ``[n, in]`` and the CSR ``m_sa`` of ``outlier_matrix``.

    One sparse matmul: on the CPU ~30x faster at 128 tokens than gathering the K columns of x per row.
    """
    return (m_sa @ x2d.float().t()).t()


def _outliers(e: Expansion, device: torch.device) -> torch.Tensor | None:
    if not e.outlier_idx.numel():
        return None
    return outlier_matrix(e.outlier_idx.to(device), e.outlier_val.to(device), e.shape[1])


def _finish(y: torch.Tensor, x2d: torch.Tensor, w: Int4Weights | Int8Weights) -> torch.Tensor:
    if w.outliers is not None:
        y = y.float() + sparse_term(x2d, w.outliers)
    return y.to(x2d.dtype)


# --------------------------------------------------------------------------- int4


def prepare_int4(
    e: Expansion, terms: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Int4Weights:
    """Re-pack the first ``terms`` terms of ``e`` for ``_weight_int4pack_mm_for_cpu`` (once per layer)."""
    device = torch.device(device)
    why = int4_supported(e.term_bits[:terms], e.group_size, device, dtype)
    if not why:
        raise ValueError(f"the int4 kernel does not apply: {why.reason}")
    gs = int4_group_size(e.group_size)
    if gs is None:  # excluded by int4_supported above
        raise ValueError(f"group_size={e.group_size} has no int4 kernel group size")
    n_out, _ = e.shape
    pad = (-n_out) % INT4_ROW_MULTIPLE
    rep = e.group_size // gs
    steps = term_scales(e.scale.to(device), e.term_bits, terms, e.series).repeat_interleave(rep, dim=2)
    offsets = term_offsets(e.term_bits, terms, e.series)
    packed, tables = [], []
    for i in range(terms):
        shift = 8 - 2 ** (e.term_bits[i] - 1)  # codes q + shift, so that (q + shift - 8) = q - 2^(X-1)
        codes = e.codes[i].to(device=device, dtype=torch.int32) + shift
        scale = steps[i]  # [out, G']
        zero = scale * offsets[i]  # the mid-rise half step of a nested term (0 otherwise)
        if i == 0 and e.zero is not None:
            zero = zero + e.zero.to(device).float().repeat_interleave(rep, dim=1)
        if pad:  # code 8 with scale 0 and zero 0: rows of value 0
            codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
            scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
        packed.append(codes)
        tables.append(torch.stack([scale.t(), zero.t()], dim=-1))
    stacked = torch.cat(packed, dim=1).contiguous()  # [N_pad, terms·in]: term i's columns after term i-1's
    packed_all = torch.ops.aten._convert_weight_to_int4pack_for_cpu(stacked, 1)
    table = torch.cat(tables, dim=0).to(dtype).contiguous()  # [terms·G', N_pad, 2]
    return Int4Weights(packed_all, table, gs, n_out, terms, _outliers(e, device))


def int4_linear(x2d: torch.Tensor, w: Int4Weights) -> torch.Tensor:
    """``x2d @ M.T`` (``[n, in] -> [n, out]``, x's dtype): one int4 matmul for all terms (x repeated once per
    term along the input dimension), plus ``M_sa x``."""
    # torch.cat: one op, ~7x cheaper than Tensor.repeat at one token
    xs = torch.cat([x2d] * w.terms, dim=1) if w.terms > 1 else x2d.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xs, w.packed, w.group_size, w.scale_and_zero)
    if y.shape[1] != w.out_features:  # rows padded to a multiple of 16
        y = y[:, : w.out_features]
    return y if w.outliers is None else _finish(y, x2d, w)


# --------------------------------------------------------------------------- collapsed int8


def collapse_codes(e: Expansion, terms: int) -> torch.Tensor:
    """int32 ``[out, in]``: ``Σ_{i<=k} m_i·c_i`` for ``k = terms``, centred codes ``c_i`` and
    ``m_i = scale_i / scale_k`` (``collapse_multipliers``)."""
    mult = collapse_multipliers(e.term_bits, terms, e.series)
    total = torch.zeros(e.shape, dtype=torch.int32, device=e.codes.device)
    for i in range(terms):
        total.add_((e.codes[i].to(torch.int32) - 2 ** (e.term_bits[i] - 1)) * mult[i])
    return total


def prepare_int8(
    e: Expansion, terms: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Int8Weights:
    """Collapse the first ``terms`` terms of a per-channel ``e`` into one int8 matrix (once per layer).

    ``Σ_i scale_i·(c_i + o_i) = scale_k·(Σ_i m_i·c_i + shift) + Σ_i scale_i·o_i - shift·scale_k``: the
    integer goes to the kernel, the per-row constant joins the bias term."""
    device = torch.device(device)
    why = int8_supported(e.term_bits[:terms], e.group_size, e.shape[1], terms, e.series, device, dtype)
    if not why:
        raise ValueError(f"the collapsed int8 kernel does not apply: {why.reason}")
    shift = collapse_shift(e.term_bits, terms, e.series)
    if shift is None:  # excluded by int8_supported above
        raise ValueError(f"{terms} terms of {e.term_bits} bits do not collapse into int8")
    weight = (collapse_codes(e, terms) + shift).to(device=device, dtype=torch.int8).contiguous()
    steps = term_scales(e.scale.to(device), e.term_bits, terms, e.series)[:, :, 0]  # [k, out]
    offsets = torch.tensor(term_offsets(e.term_bits, terms, e.series), device=device).view(-1, 1)
    const = (steps * offsets).sum(0) - shift * steps[-1]  # [out]
    if e.zero is not None:
        const = const + e.zero.to(device).float()[:, 0]
    zero = const.view(-1, 1) if bool(const.abs().max() > 0) else None
    return Int8Weights(weight, steps[-1].to(dtype).contiguous(), zero, terms, _outliers(e, device))


def int8_linear(x2d: torch.Tensor, w: Int8Weights) -> torch.Tensor:
    """``x2d @ M.T`` (``[n, in] -> [n, out]``, x's dtype): one int8 matmul, plus ``bias·Σx`` and ``M_sa x``."""
    x2d = x2d.contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2d, w.weight, w.scales)
    if w.zero is not None:
        y = y.float() + zero_term(x2d, w.zero, x2d.shape[1])
    return _finish(y, x2d, w)
