"""Data-free activation proxies: an estimate of ``E[x_j²]`` for every input column j of a linear layer.

The first-term fit minimizes ``Σ_j a_j (w_j - ŵ_j)²`` (``fit.py``, Eq. F); with ``a_j = E[x_j²]`` that is the
expected squared error of the layer's *output* when the input channels are uncorrelated.  Without calibration
data ``E[x_j²]`` is read off the neighbouring weights of a LLaMA/Qwen2-style decoder block:

- ``q/k/v_proj`` read ``RMSNorm(h)·γ`` with ``γ = input_layernorm.weight``: ``E[x_j²] ∝ γ_j²``, floored at the
  mean ``γ²`` (``GAIN_FLOOR``: a gain below average says nothing, see there; in every formula below too);
  ``gate/up_proj`` likewise with ``post_attention_layernorm.weight``;
- ``o_proj`` reads attention-weighted averages of the values ``v = W_v·(RMSNorm(h)·γ) + b_v``:
  ``E[x_j²] ≲ ||W_v[j] ⊙ γ||² + b_v[j]²`` (value channel j, repeated over the query heads sharing it);
- ``down_proj`` reads ``silu(g_j)·u_j``: ``E[x_j²] ∝ (||W_gate[j] ⊙ γ|| · ||W_up[j] ⊙ γ||)²``.

Layers of other shapes or names get ``None`` (all columns equal).  The source tensors are read straight from the
checkpoint's safetensors files (small norm vectors, and one neighbouring weight for o/down_proj), so the proxy
does not depend on the order in which transformers streams the weights.
"""

from __future__ import annotations

import torch

ATTN_IN, MLP_IN = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
GAIN_FLOOR = 1.0
"""``γ_j²`` below ``GAIN_FLOOR·mean(γ²)`` counts as that floor.  A small gain is no evidence of a quiet column: trained
models damp their massive-activation channels with small gains, so there ``E[x_j²] = γ_j²·E[(h_j/rms)²]`` is often
*larger* than average (Qwen2.5-Coder-1.5B: γ² 8-17x below its mean on inputs 10-14x louder than average); trusting
``γ_j²`` let the fit clip exactly those columns (eval/results/qwen_diagnosis.md)."""


class ActivationProxy:
    """``importance(module_name)`` for the layers of one checkpoint (``checkpoint_files``: its safetensors)."""

    def __init__(
        self,
        checkpoint_files: list[str],
        num_key_value_heads: int | None = None,
        gain_floor: float = GAIN_FLOOR,
    ):
        from safetensors import safe_open

        self.files: dict[str, str] = {}
        for path in checkpoint_files or []:
            if str(path).endswith(".safetensors"):
                with safe_open(str(path), framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), str(path)))
        self.kv_heads = num_key_value_heads
        self.gain_floor = gain_floor
        self._cache: dict[str, torch.Tensor] = {}

    def _get(self, key: str) -> torch.Tensor | None:
        if key not in self.files:
            return None
        if key in self._cache:
            return self._cache[key]
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt") as f:
            t = f.get_tensor(key).float()
        if t.dim() == 1:
            self._cache[key] = t  # norm weights: tiny and used three times
        return t

    def _gain(self, key: str) -> torch.Tensor | None:
        """``|γ|`` of a norm, raised to at least ``sqrt(gain_floor)`` times its RMS."""
        g = self._get(key)
        if g is None:
            return None
        return g.abs().clamp(min=(self.gain_floor * g.pow(2).mean()).sqrt().item())

    def importance(self, module_name: str) -> torch.Tensor | None:
        parent, _, leaf = module_name.rpartition(".")
        block = parent.rpartition(".")[0]
        if leaf in ATTN_IN or leaf in MLP_IN:
            norm = "input_layernorm" if leaf in ATTN_IN else "post_attention_layernorm"
            g = self._gain(f"{block}.{norm}.weight")
            return None if g is None else g.pow(2)
        if leaf == "o_proj":
            return self._o_proj(block, parent)
        if leaf == "down_proj":
            g = self._gain(f"{block}.post_attention_layernorm.weight")
            up, gate = self._get(f"{parent}.up_proj.weight"), self._get(f"{parent}.gate_proj.weight")
            if g is None or up is None or gate is None:
                return None
            return ((up * g).norm(dim=1) * (gate * g).norm(dim=1)).pow(2)
        return None

    def _o_proj(self, block: str, attn: str) -> torch.Tensor | None:
        g, wv = self._gain(f"{block}.input_layernorm.weight"), self._get(f"{attn}.v_proj.weight")
        wo_key = f"{attn}.o_proj.weight"
        if g is None or wv is None or wo_key not in self.files or not self.kv_heads:
            return None
        second = (wv * g).pow(2).sum(1)
        bv = self._get(f"{attn}.v_proj.bias")
        if bv is not None:
            second = second + bv.pow(2)
        from safetensors import safe_open

        with safe_open(self.files[wo_key], framework="pt") as f:
            o_in = f.get_slice(wo_key).get_shape()[1]
        rep, head_dim = o_in // second.numel(), second.numel() // self.kv_heads
        if rep * second.numel() != o_in or head_dim * self.kv_heads != second.numel():
            return None
        return second.view(self.kv_heads, head_dim).repeat_interleave(rep, dim=0).reshape(-1)
