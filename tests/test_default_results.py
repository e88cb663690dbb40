"""eval/results/default_<model>.{json,md}: the markdown is what eval/_default_report.py renders from the JSON, and
the verdicts follow the numbers."""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "eval" / "results"


@pytest.mark.parametrize("model", ["smollm2", "qwen"])
def test_default_results_rerender_from_their_json(model, eval_module):
    report = eval_module("_default_report")
    res = json.loads((RESULTS / f"default_{model}.json").read_text())
    assert report.to_markdown(res) == (RESULTS / f"default_{model}.md").read_text()


def test_a_ratio_target_is_met_only_at_or_below_its_limit(eval_module):
    report = eval_module("_default_report")
    ours = {"label": "ours", "kl": 0.08, "bits": 4.5}
    peer = {"label": "peer", "kl": 0.1, "bits": 4.5}
    assert "| met |" in report._ratio_target("t", ours, [peer], 0.8)[0]
    assert "| missed |" in report._ratio_target("t", {**ours, "kl": 0.0801}, [peer], 0.8)[0]
    assert "not measured" in report._ratio_target("t", ours, [{**peer, "bits": 4.6}], 0.8)[0]
