"""The default recipe: the streaming probe (one block at a time) and the second-order fit (GPTQ on the series'
grid with the probe's input covariance)."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import fpxint_modules

from fpxint_hf import FPxINTConfig
from fpxint_hf.expansion import ExpandOptions, expand, reconstruct
from fpxint_hf.gptq import output_error, round_to_grid, second_order_levels, series_grid
from fpxint_hf.hf import probe


def _files(path):
    return sorted(str(p) for p in path.glob("*.safetensors"))


def _correlated(n_in: int, tokens: int, seed: int) -> torch.Tensor:
    """Inputs with correlated, unevenly loud channels (as a decoder's are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(tokens, n_in, generator=g) @ mix
    return x * (torch.rand(n_in, generator=g) * 3 + 0.1)


@pytest.mark.parametrize(
    ("bits", "terms", "group", "seed"), [(4, 1, 32, 0), (3, 1, 64, 1), (4, 2, 32, 2), (2, 1, 16, 3)]
)
def test_second_order_never_raises_the_output_error_of_any_row(bits, terms, group, seed):
    g = torch.Generator().manual_seed(seed + 10)
    w = torch.randn(48, 128, generator=g) * 0.05
    x = _correlated(128, 256, seed)
    h = x.T @ x / x.shape[0]
    e = expand(w, options=ExpandOptions(importance=h.diagonal()), bits=bits, terms=terms, group_size=group)
    ours = second_order_levels(w, h, e.scale, e.zero, e.term_bits, group)
    plain = reconstruct(e)
    before, after = output_error(w, plain, h), output_error(w, ours, h)
    assert (after <= before * (1 + 1e-5) + 1e-12).all()
    assert after.sum() < 0.9 * before.sum()  # and on correlated inputs it helps


def test_second_order_levels_are_levels_of_the_series_grid_and_decompose_exactly():
    """``expand(hessian=...)`` stores exactly the chosen levels: reconstructing the codes gives them back."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(5)) * 0.05
    x = _correlated(128, 300, 7)
    h = x.T @ x / 300
    for bits, terms in ((4, 1), (4, 2), ((4, 2), 2)):
        plain = expand(
            w, options=ExpandOptions(importance=h.diagonal()), bits=bits, terms=terms, group_size=32
        )
        e = expand(
            w,
            options=ExpandOptions(importance=h.diagonal(), hessian=h),
            bits=bits,
            terms=terms,
            group_size=32,
        )
        want = second_order_levels(w, h, plain.scale, plain.zero, plain.term_bits, 32)
        base, step, top = series_grid(e.scale, e.zero, e.term_bits)
        got = reconstruct(e)
        assert torch.equal(e.scale, plain.scale)
        assert torch.allclose(got, want, atol=1e-6 * w.abs().max().item())
        grid = round_to_grid(got, base.repeat_interleave(32, 1), step.repeat_interleave(32, 1), top)
        assert torch.allclose(grid, got, atol=1e-6 * w.abs().max().item())
        unweighted = expand(w, options=ExpandOptions(hessian=h), bits=bits, terms=terms, group_size=32)
        left = reconstruct(unweighted) - w
        assert unweighted.errors[-1] == pytest.approx((left.norm() / w.norm()).item(), rel=1e-4)


def test_second_order_spans_and_transforms():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    x = _correlated(256, 400, 2)
    h = x.T @ x / 400
    plain = reconstruct(
        expand(w, options=ExpandOptions(importance=h.diagonal()), bits=4, terms=1, group_size=64)
    )
    span = reconstruct(
        expand(
            w,
            options=ExpandOptions(importance=h.diagonal(), hessian=h, hessian_span=64),
            bits=4,
            terms=1,
            group_size=64,
        )
    )
    assert output_error(w, span, h).sum() < output_error(w, plain, h).sum()
    from fpxint_hf.expansion import original_weight

    for kw in ({"dual_scale": True}, {"rotation": "hadamard"}):
        base = original_weight(
            expand(w, options=ExpandOptions(importance=h.diagonal()), bits=4, terms=1, group_size=64, **kw)
        )
        ours = original_weight(
            expand(
                w,
                options=ExpandOptions(importance=h.diagonal(), hessian=h),
                bits=4,
                terms=1,
                group_size=64,
                **kw,
            )
        )
        assert output_error(w, ours, h).sum() <= output_error(w, base, h).sum() * (1 + 1e-5)
    with pytest.raises(ValueError, match=r"hessian must be \[256, 256\]"):
        expand(w, options=ExpandOptions(hessian=h[:8, :8]), bits=4, terms=1, group_size=64)
    with pytest.raises(ValueError, match="needs series='nested'"):
        expand(w, options=ExpandOptions(hessian=h), bits=4, terms=1, group_size=64, series="legacy")


def test_streaming_probe_holds_one_block_at_a_time(fp_model_dir, load_fp, monkeypatch):
    """Each block's parameters are read just before it runs and dropped right after: never two blocks, never
    the embedding table, and the energies equal hooks on the loaded FP model with the same ids."""
    loaded: set[str] = set()
    peak = [0]
    fill, drop = probe._Reader.fill, probe._drop

    def counting_fill(self, module, prefix, skip=()):
        fill(self, module, prefix, skip)
        if ".layers." in prefix:
            loaded.add(prefix)
            peak[0] = max(peak[0], len(loaded))

    def counting_drop(module):
        drop(module)
        loaded.clear()

    monkeypatch.setattr(probe._Reader, "fill", counting_fill)
    monkeypatch.setattr(probe, "_drop", counting_drop)
    fp = load_fp(fp_model_dir)
    seen_blocks: list[int] = []
    stats: dict[str, probe.LayerStats] = {}

    def on_block(i, block_stats):
        seen_blocks.append(i)
        stats.update(block_stats)

    probe.stream_blocks(fp.config, _files(fp_model_dir), on_block, sequences=3, second_order=True)
    assert seen_blocks == list(range(fp.config.num_hidden_layers)) and peak[0] == 1
    ids = probe.probe_ids(fp.config.vocab_size, 3, probe.probe_tokens(fp.config))
    inputs: dict[str, torch.Tensor] = {}
    for name, m in fp.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(
                lambda _m, a, name=name: inputs.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]))
            )
    with torch.no_grad():
        fp(input_ids=ids)
    assert stats.keys() == inputs.keys()
    for name, x in inputs.items():
        s = stats[name]
        assert torch.allclose(s.second_moment, x.pow(2).mean(0), rtol=1e-4, atol=1e-6), name
        assert torch.allclose(s.hessian, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6), name
        assert torch.equal(s.weight, fp.get_submodule(name).weight), name


def test_default_is_a_4_bit_model_that_saves_and_reloads_bit_identical(
    make_fp_dir, load_quantized, logits_of, tmp_path
):
    from transformers import AutoModelForCausalLM

    from fpxint_hf.model_ops import model_bits_per_weight

    fp_dir = make_fp_dir("qwen2", intermediate_size=128)
    model = load_quantized(fp_dir)  # FPxINTConfig() with nothing set
    layers = fpxint_modules(model).values()
    counters = 32 * len(layers) / sum(m.in_features * m.out_features for m in layers)  # terms_used, per layer
    assert model_bits_per_weight(model) <= 4.5 + counters + 1e-9
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    q = back.config.quantization_config
    assert (q.version, q.terms, q.bits_budget, q.zero_bits) == (4, 2, 4.5, 8)  # the default recipe
    assert torch.equal(logits_of(model), logits_of(back))
    for (name, a), b in zip(fpxint_modules(model).items(), fpxint_modules(back).values(), strict=True):
        assert a.terms == b.terms and torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), name


def test_second_order_lowers_the_probed_output_error_on_load(make_fp_dir, load_fp, load_quantized):
    fp_dir = make_fp_dir("llama", intermediate_size=128)
    fp = load_fp(fp_dir)
    stats: dict[str, probe.LayerStats] = {}
    probe.stream_blocks(
        fp.config,
        _files(fp_dir),
        lambda _i, s: stats.update(s),
        sequences=probe.SECOND_ORDER_SEQUENCES,
        second_order=True,
    )
    first = fpxint_modules(load_quantized(fp_dir, terms=1, group_size=32, second_order=False))
    second = fpxint_modules(load_quantized(fp_dir, terms=1, group_size=32, second_order=True))

    def total(mods):
        return sum(
            output_error(s.weight, mods[n].dequantize(), s.hessian).sum().item() for n, s in stats.items()
        )

    assert total(second) < 0.95 * total(first)


def test_second_order_field_is_checked_and_old_configs_read_their_own_defaults():
    with pytest.raises(ValueError, match=r"second_order='yes' is invalid; allowed: True or False"):
        FPxINTConfig(second_order="yes")
    old = FPxINTConfig.from_dict({"version": 2, "bits": 4})
    assert (old.terms, old.group_size, old.act_proxy, old.second_order) == (2, 128, "norm", False)


def test_default_on_a_checkpoint_without_safetensors_falls_back_to_the_norm_proxy(
    tmp_path, caplog, load_quantized
):
    """The probe reads safetensors files; a checkpoint without them (a GGUF file, a .bin folder) still quantizes
    with the default config, weighted by the norm proxy, and says so."""
    from conftest import build_tiny_model

    model = build_tiny_model("llama_untied")
    model.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with caplog.at_level("WARNING"):
        model = load_quantized(tmp_path / "bin")
    assert "using act_proxy='norm' instead" in caplog.text
    assert len(fpxint_modules(model)) == 14
