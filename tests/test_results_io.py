"""``evaluation.results.write_results``: the one writer of every committed ``eval/results/*.{json,md}`` pair."""

import json

from fpxint_hf.evaluation.results import write_results


def test_write_results_writes_the_json_and_the_markdown_rendered_from_it(tmp_path):
    seen = []

    def render(res):
        seen.append(res)
        return f"# {res['rows'][0]['name']}\n"

    out = tmp_path / "new" / "folder" / "bench"  # created on the way
    md = write_results(out, {"rows": [{"name": "FP", "kl": 0.0}]}, render, indent=2)
    assert md == "# FP\n" == (tmp_path / "new" / "folder" / "bench.md").read_text()
    text = (tmp_path / "new" / "folder" / "bench.json").read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "rows"')  # indent=2, one trailing newline
    assert json.loads(text) == seen[0] == {"rows": [{"name": "FP", "kl": 0.0}]}
