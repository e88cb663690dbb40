"""Bits budget, mixed widths and old checkpoints through transformers (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import fpxint_modules

import fpxint_hf
from fpxint_hf.budget import FUSED, LayerCandidates, allocate_terms, fused_groups, merge_candidates
from fpxint_hf.expansion import snr_db
from fpxint_hf.model_ops import model_bits_per_weight


def _counter_bits(model) -> float:
    """Bits per weight of the per-layer 32-bit ``terms_used`` counters, which a bits budget leaves out."""
    layers = fpxint_modules(model).values()
    return 32 * len(layers) / sum(m.in_features * m.out_features for m in layers)


def test_allocate_terms_spends_where_the_error_falls_most():
    layers = [
        LayerCandidates("a", 100, (450, 650, 850), (0.10, 0.025, 0.006)),
        LayerCandidates("b", 100, (450, 650, 850), (0.05, 0.012, 0.003)),
    ]
    assert allocate_terms(layers, 4.5) == {"a": 1, "b": 1}
    assert allocate_terms(layers, 5.5) == {"a": 2, "b": 1}  # a's step removes more error per bit
    assert allocate_terms(layers, 8.5) == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="bits_budget=4.0 is below"):
        allocate_terms(layers, 4.0)


def test_fused_pieces_are_allocated_together():
    names = ["m.l0.self_attn.q_proj", "m.l0.self_attn.k_proj", "m.l0.self_attn.o_proj", "m.l0.mlp.up_proj"]
    names += ["m.l0.mlp.gate_proj", "m.l1.self_attn.q_proj"]
    assert fused_groups(names) == {
        "m.l0.self_attn.qkv_proj": ["m.l0.self_attn.q_proj", "m.l0.self_attn.k_proj"],
        "m.l0.self_attn.o_proj": ["m.l0.self_attn.o_proj"],
        "m.l0.mlp.gate_up_proj": ["m.l0.mlp.up_proj", "m.l0.mlp.gate_proj"],
        "m.l1.self_attn.qkv_proj": ["m.l1.self_attn.q_proj"],
    }
    a = LayerCandidates("a", 100, (450, 650), (0.3, 0.1))
    b = LayerCandidates("b", 50, (225, 325), (0.4, 0.2))
    merged = merge_candidates("ab", [a, b])
    assert (merged.n_weights, merged.bits) == (150, (675, 975))
    assert merged.errors == pytest.approx((0.5, (0.01 + 0.04) ** 0.5))  # squared errors add


def _fused_terms_agree(model) -> bool:
    terms = {n: m.terms for n, m in fpxint_modules(model).items()}
    groups = fused_groups(list(terms))
    return all(len({terms[n] for n in names}) == 1 for names in groups.values()) and any(
        len(names) == len(FUSED["qkv_proj"]) for names in groups.values()
    )


def test_budget_model_meets_its_budget_saves_and_reloads(
    make_fp_dir, load_fp, load_quantized, logits_of, tmp_path
):
    fp_dir = make_fp_dir("llama_untied")
    ref = logits_of(load_fp(fp_dir))
    snrs, bpws = [], []
    for budget in (6.0, 7.5, 9.1):  # group 32: one 4-bit term is 5 bits per weight
        q = load_quantized(fp_dir, bits=[4, 2, 2], terms=3, group_size=32, bits_budget=budget)
        bpw = model_bits_per_weight(q)
        assert bpw <= budget + _counter_bits(q) + 1e-9
        bpws.append(bpw)
        snrs.append(snr_db(logits_of(q), ref))
    assert bpws[0] < bpws[1] < bpws[2]
    assert snrs[0] < snrs[1] < snrs[2], snrs
    q = load_quantized(fp_dir, bits=[4, 2, 2], terms=3, group_size=32, bits_budget=7.5)
    per_layer = {n: m.terms for n, m in fpxint_modules(q).items()}
    assert len(set(per_layer.values())) > 1  # a mix of terms across layers
    assert _fused_terms_agree(q)  # q/k/v and gate/up keep one number of terms each (vLLM fuses them)
    before = logits_of(q)
    q.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert saved["layer_terms"] == {n: k for n, k in per_layer.items() if k != 3}
    reloaded = load_fp(tmp_path / "b")
    assert {n: m.terms for n, m in fpxint_modules(reloaded).items()} == per_layer
    assert torch.equal(logits_of(reloaded), before)
    assert model_bits_per_weight(reloaded) == pytest.approx(model_bits_per_weight(q))
    fpxint_hf.set_active_terms(reloaded, 1)  # truncation still works on a budget model
    assert model_bits_per_weight(reloaded, 1) < model_bits_per_weight(reloaded)


@pytest.mark.parametrize(
    "bits,terms,symmetric",
    [([4, 2], 2, False), (2, 3, False), (3, 2, False), (3, 1, False), (3, 1, True), ([3, 2], 2, False)],
)
def test_mixed_and_low_width_series_save_and_reload(
    bits, terms, symmetric, make_fp_dir, load_fp, load_quantized, logits_of, tmp_path
):
    fp_dir = make_fp_dir("qwen2")
    q = load_quantized(fp_dir, bits=bits, terms=terms, group_size=32, symmetric=symmetric)
    before = logits_of(q)
    q.save_pretrained(tmp_path / "m")
    reloaded = load_fp(tmp_path / "m")
    assert torch.equal(logits_of(reloaded), before)
    assert snr_db(before, logits_of(load_fp(fp_dir))) > (25.0 if terms > 1 else 12.0)


@pytest.mark.parametrize(
    "bits,terms,symmetric,budget,mixed",
    [
        ([3, 2], 2, False, 3.5, False),  # the budget is one 3-bit term (asymmetric, group 64): one term each
        ([3, 2], 2, True, 3.25, False),  # the same, symmetric
        ([3, 2], 2, True, 3.5, True),  # a symmetric 3-bit term (3.25) and 2-bit residuals where they pay most
        ([2, 2, 2], 3, False, 3.25, True),
        ([2, 2, 2], 3, False, 3.5, True),
    ],
)
def test_low_bits_budgets_meet_the_budget_and_reload_bit_exact(
    bits, terms, symmetric, budget, mixed, make_fp_dir, load_fp, load_quantized, logits_of, tmp_path
):
    fp_dir = make_fp_dir("llama_untied")
    q = load_quantized(  # a float16 bias: one term of [3, 2] is then 3.5 bits, all of a 3.5 budget
        fp_dir, bits=bits, terms=terms, group_size=64, symmetric=symmetric, bits_budget=budget, zero_bits=16
    )
    layers = fpxint_modules(q)
    bpw = model_bits_per_weight(q)
    assert bpw <= budget + _counter_bits(q) + 1e-9  # all counted but the per-layer counter
    assert (len({m.terms for m in layers.values()}) > 1) == mixed
    assert _fused_terms_agree(q)
    assert bpw > budget - (1.5 if mixed else 0.001)
    assert snr_db(logits_of(q), logits_of(load_fp(fp_dir))) > 10.0
    before = logits_of(q)
    q.save_pretrained(tmp_path / "lo")
    reloaded = load_fp(tmp_path / "lo")
    terms_of = {n: m.terms for n, m in layers.items()}
    assert {n: m.terms for n, m in fpxint_modules(reloaded).items()} == terms_of
    assert torch.equal(logits_of(reloaded), before)


@pytest.mark.parametrize(
    "transform",
    [{"dual_scale": True}, {"rotation": "hadamard"}, {"dual_scale": True, "rotation": "hadamard"}],
)
def test_budget_with_input_transforms_counts_their_bits_and_reloads_bit_exact(
    transform, make_fp_dir, load_fp, load_quantized, logits_of, tmp_path
):
    """A bits budget quantizes its candidates with the input transforms and counts their stored ``t`` and signs
    (it raised KeyError('col_scale') before): the model stays under the budget and reloads bit-exact."""
    fp_dir = make_fp_dir("llama_untied")
    q = load_quantized(fp_dir, bits=[4, 2, 2], terms=3, group_size=32, bits_budget=7.5, **transform)
    layers = fpxint_modules(q)
    assert len({m.terms for m in layers.values()}) > 1 and _fused_terms_agree(q)
    assert model_bits_per_weight(q) <= 7.5 + _counter_bits(q) + 1e-9
    before = logits_of(q)
    q.save_pretrained(tmp_path / "t")
    reloaded = load_fp(tmp_path / "t")
    assert {n: m.terms for n, m in fpxint_modules(reloaded).items()} == {
        n: m.terms for n, m in layers.items()
    }
    assert torch.equal(logits_of(reloaded), before)


def test_budget_below_one_term_names_the_way_out(make_fp_dir, load_quantized):
    with pytest.raises(ValueError, match=r"bits_budget=3.25 is below .*bits=\[2, 2, 2\]"):
        load_quantized(make_fp_dir("llama_untied"), bits=[3, 2], terms=2, group_size=64, bits_budget=3.25)


def test_default_recipe_spends_its_budget_and_falls_back_to_one_term_where_one_term_exceeds_it(
    make_fp_dir, load_quantized, caplog
):
    """``FPxINTConfig()``: 2 terms under bits + 0.5 (some layers get the second term, within 4.5 bits per weight);
    at group 32 one term already costs 4.75, so the recipe keeps one term everywhere (a warning), while the same
    budget given by the user is refused."""
    fp = make_fp_dir("llama_untied")
    model = load_quantized(fp, dtype=torch.float32)
    q = model.config.quantization_config
    assert (q.terms, q.bits_budget) == (2, 4.5) and model_bits_per_weight(model) <= 4.5
    wider = load_quantized(fp, dtype=torch.float32, bits_budget=5.0)  # the recipe, the user's budget
    assert sorted({m.terms for m in fpxint_modules(wider).values()}) == [1, 2]
    assert model_bits_per_weight(wider) <= 5.0
    narrow = load_quantized(fp, dtype=torch.float32, group_size=32)
    assert {m.terms for m in fpxint_modules(narrow).values()} == {1}
    assert "every layer keeps one term" in caplog.text
    with pytest.raises(ValueError, match=r"bits_budget=4.5 is below"):
        load_quantized(fp, dtype=torch.float32, group_size=32, terms=2, bits_budget=4.5)


def test_old_checkpoint_without_series_keys_still_loads(
    make_fp_dir, load_fp, load_quantized, logits_of, tmp_path
):
    """A checkpoint written by fpxint_hf 0.1 has no series/fit in its config.json and legacy tensors."""
    q = load_quantized(make_fp_dir("llama"), bits=4, terms=2, group_size=32, series="legacy", fit="minmax")
    before = logits_of(q)
    q.save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # nor any key added since (format 2: version, quantized_modules, layer_group_size)
    for key in ("series", "fit", "bits_budget", "layer_terms", "act_proxy", "version", "quantized_modules"):
        cfg["quantization_config"].pop(key)
    cfg["quantization_config"].pop("layer_group_size")
    cfg["quantization_config"]["forward_mode"] = "reference"
    cfg_path.write_text(json.dumps(cfg))
    reloaded = load_fp(tmp_path / "old")
    assert all(m.series == "legacy" for m in fpxint_modules(reloaded).values())
    assert torch.equal(logits_of(reloaded), before)


def test_budget_options_wait_on_disk_and_read_back_exactly(tmp_path):
    """The options of fewer terms are written to a temporary folder, not held: read back, each equals the
    series fitted for exactly k terms; the summary keeps their errors and bits; ``close`` deletes the folder."""
    from fpxint_hf.hf.bits_budget import BudgetCandidates
    from fpxint_hf.series import FPxINTSeries, SeriesSpec
    from fpxint_hf.settings import ExpansionSettings

    torch.manual_seed(0)
    w = torch.randn(48, 128)
    spec = SeriesSpec.for_layer(ExpansionSettings(bits=(4, 2, 2), terms=3, group_size=32), 48, 128)
    full = FPxINTSeries.from_weight(w, spec)
    cands = BudgetCandidates(spill_dir=str(tmp_path))
    cands.add("layer", full, w)
    (folder,) = list(tmp_path.iterdir())
    assert len(list(folder.iterdir())) == 2  # k = 1 and 2; the full series stays the module's
    for k in (1, 2):
        direct = FPxINTSeries.from_weight(w, spec.truncated(k))
        back = cands.series("layer", k)
        assert back.spec == direct.spec and set(back.tensors) == set(direct.tensors)
        assert all(torch.equal(back.tensors[n], t) for n, t in direct.tensors.items())
        assert cands.summary["layer"][k] == (direct.errors[-1], direct.stored_bits())
    assert cands.summary["layer"][3] == (full.errors[-1], full.stored_bits())
    errors = [cands.summary["layer"][k][0] for k in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]
    cands.close()
    assert not folder.exists()


def test_budget_load_reads_shrunk_layers_from_disk_and_leaves_nothing_behind(
    make_fp_dir, load_quantized, monkeypatch, tmp_path
):
    import tempfile

    from fpxint_hf.hf.bits_budget import BudgetCandidates

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    read = []
    original = BudgetCandidates.series

    def series(self, name, k):
        read.append((name, k, len(list(tmp_path.glob("fpxint-budget-*/*.pt")))))
        return original(self, name, k)

    monkeypatch.setattr(BudgetCandidates, "series", series)
    q = load_quantized(make_fp_dir("llama_untied"), bits=[4, 2, 2], terms=3, group_size=32, bits_budget=7.5)
    layers = fpxint_modules(q)
    shrunk = {n: m.terms for n, m in layers.items() if m.terms < 3}
    assert shrunk and {(n, k) for n, k, _ in read} == set(shrunk.items())
    assert all(files == 2 * len(layers) for _, _, files in read)  # k = 1, 2 of every layer on disk
    assert not list(tmp_path.glob("fpxint-budget-*"))


def test_budget_spill_failure_names_the_folder_to_change(monkeypatch, tmp_path):
    from fpxint_hf.hf import bits_budget
    from fpxint_hf.series import FPxINTSeries, SeriesSpec
    from fpxint_hf.settings import ExpansionSettings

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bits_budget.torch, "save", full_disk)
    w = torch.randn(32, 64)
    spec = SeriesSpec.for_layer(ExpansionSettings(bits=4, terms=2, group_size=32), 32, 64)
    cands = bits_budget.BudgetCandidates(spill_dir=str(tmp_path))
    with pytest.raises(OSError, match=r"layer's 1-term candidate .*TMPDIR"):
        cands.add("layer", FPxINTSeries.from_weight(w, spec), w)
    cands.close()
