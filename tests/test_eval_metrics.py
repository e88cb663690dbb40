"""fpxint_hf.evaluation.metrics: perplexity / KL(FP || model) / top-1 agreement on a tiny random LLaMA (fast), SmolLM2 (slow)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fpxint_hf.evaluation.metrics import (
    FPReference,
    QualityMetrics,
    evaluate_against,
    fp_reference,
    pydoc_windows,
    quality_metrics,
)
from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer

N_TOKENS, CONTEXT, BATCH = 384, 64, 2


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=0)


@pytest.fixture(scope="module")
def windows(tok):
    return pydoc_windows(tok, N_TOKENS, CONTEXT)


@pytest.fixture(scope="module")
def reference(model, windows):
    return fp_reference(model, windows, batch_size=BATCH)


def _perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "proj" in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def test_windows_shape_and_determinism(tok, windows):
    assert windows.shape == (N_TOKENS // CONTEXT, CONTEXT)
    assert windows.dtype == torch.long
    assert torch.equal(windows, pydoc_windows(tok, N_TOKENS, CONTEXT))
    assert torch.equal(pydoc_windows(tok, 400, CONTEXT), windows)  # budget rounds down to whole windows
    with pytest.raises(ValueError, match="fewer than"):
        pydoc_windows(tok, 4096, 512, text="far too short")


def test_model_against_itself(model, reference):
    m = evaluate_against(model, reference)
    assert isinstance(m, QualityMetrics)
    assert m.n_tokens == (N_TOKENS // CONTEXT) * (CONTEXT - 1)
    assert m.kl_vs_fp == 0.0
    assert m.top1_agreement == 1.0
    assert m.perplexity == pytest.approx(reference.perplexity, rel=1e-12)


def test_perplexity_is_exp_mean_nll(model, windows, reference):
    """Independent check: HF's own shifted cross-entropy, every window has the same number of targets."""
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in windows]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert evaluate_against(model, reference).perplexity == pytest.approx(expected, rel=1e-5)
    assert reference.perplexity == pytest.approx(expected, rel=1e-5)


def test_perturbed_model_has_positive_kl(model, windows, reference):
    other = _perturbed(model)
    m = evaluate_against(other, reference)
    assert m.kl_vs_fp > 1e-4
    assert 0.0 < m.top1_agreement < 1.0
    # Independent KL via torch's kl_div on the full tensors.
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
        lq = torch.log_softmax(other(input_ids=windows).logits[:, :-1].float(), -1)
    kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).mean()
    assert m.kl_vs_fp == pytest.approx(float(kl), rel=1e-4)
    top1 = (lp.argmax(-1) == lq.argmax(-1)).double().mean()
    assert m.top1_agreement == pytest.approx(float(top1))
    # A larger perturbation moves further away.
    assert evaluate_against(_perturbed(model, scale=0.3), reference).kl_vs_fp > m.kl_vs_fp


def test_quality_metrics_with_model_as_reference(model, tok):
    m = quality_metrics(model, model, tok, n_tokens=N_TOKENS, context=CONTEXT, batch_size=3)
    assert m.kl_vs_fp == 0.0 and m.top1_agreement == 1.0
    with pytest.raises(ValueError, match="tokenizer"):
        quality_metrics(model, model)


def test_reference_save_load_and_bf16(model, windows, reference, tmp_path):
    other = _perturbed(model)
    expected = evaluate_against(other, reference)
    path = tmp_path / "ref.pt"
    reference.save(path)
    loaded = FPReference.load(path)
    assert loaded.n_tokens == reference.n_tokens and loaded.batch_size == BATCH
    assert evaluate_against(other, loaded) == expected
    small = fp_reference(model, windows, batch_size=BATCH, store_dtype=torch.bfloat16)
    approx = evaluate_against(other, small)
    assert approx.kl_vs_fp == pytest.approx(expected.kl_vs_fp, rel=0.05)
    assert approx.perplexity == expected.perplexity


@pytest.mark.slow
def test_smollm2_fp_reference_and_gguf_model():
    """Real assets: FP folder vs the GGUF-loaded model over the pydoc budget (2048 tokens to stay quick)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fpxint_hf.evaluation.assets import fp_model_dir, load_gguf_model

    folder = fp_model_dir()
    fp = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ref = fp_reference(fp, pydoc_windows(tokenizer, 2048, 512))
    assert 2.0 < ref.perplexity < 100.0
    gguf_model, _ = load_gguf_model()
    m = evaluate_against(gguf_model, ref)
    assert m.kl_vs_fp == 0.0 and m.top1_agreement == 1.0
    assert m.perplexity == pytest.approx(ref.perplexity, rel=1e-12)
