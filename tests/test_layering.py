"""House rules that a reader cannot see at a glance: import direction, small files, no asserts/prints."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fpxint_hf"
# each layer may import only from the layers to its left
ORDER = [
    "atomic",
    "settings",
    "activations",
    "fit",
    "gptq",
    "bias",
    "first_term",
    "saturation",
    "rotation",
    "dual_scale",
    "transform",
    "expansion",
    "packing",
    "layout",
    "budget",
    "kernels",
    "terms_forward",
    "act_kernels",
    "backends",
    "series",
    "offload",
    "linear",
    "model_ops",
    "vllm",
    "hf",
    "evaluation",
    "cli_checks",
    "cli_parser",
    "cli",
]
FORBIDDEN_EXTERNAL = {
    "atomic": {"torch", "transformers", "accelerate"},
    "settings": {"torch", "transformers", "accelerate"},
    "fit": {"torch.nn", "transformers", "accelerate"},
    "gptq": {"torch.nn", "transformers", "accelerate"},
    "bias": {"torch.nn", "transformers", "accelerate"},
    "first_term": {"torch.nn", "transformers", "accelerate"},
    "saturation": {"torch.nn", "transformers", "accelerate"},
    "budget": {"torch", "transformers", "accelerate"},
    "rotation": {"torch.nn", "transformers", "accelerate"},
    "dual_scale": {"torch.nn", "transformers", "accelerate"},
    "transform": {"torch.nn", "transformers", "accelerate"},
    "expansion": {"torch.nn", "transformers", "accelerate"},
    "terms_forward": {"torch.nn", "transformers", "accelerate"},
    "packing": {"torch.nn", "transformers", "accelerate"},
    "layout": {"torch.nn", "transformers", "accelerate"},
    "kernels": {"torch.nn", "transformers", "accelerate"},
    "activations": {"torch.nn", "transformers", "accelerate"},
    "act_kernels": {"torch.nn", "transformers", "accelerate"},
    "backends": {"torch.nn", "transformers", "accelerate"},
    "series": {"torch.nn", "transformers", "accelerate"},
    "offload": {"torch", "transformers", "accelerate"},
    "linear": {"transformers", "accelerate"},
    "model_ops": {"transformers", "accelerate"},
}


# package-level files above every layer: the public surface and the start-up hook
TOP = {"__init__", "_autoregister"}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    if rel.parts[0] in ORDER:
        return rel.parts[0]
    if rel.parts[0] in TOP and len(rel.parts) == 1:
        return "top"
    raise AssertionError(f"{rel} belongs to no layer: add it to ORDER (or TOP) in tests/test_layering.py")


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                parent = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
                base = ".".join((*parent, base)) if base else ".".join(parent)
                names += [f"{base}.{a.name}" for a in node.names] if not node.module else [base]
            else:
                names.append(base)
    return names


SOURCES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_layers_import_one_way(path):
    layer = layer_of(path)
    allowed = set(ORDER) if layer == "top" else set(ORDER[: ORDER.index(layer) + 1])
    for name in imports(path):
        if name.startswith("fpxint_hf."):
            target = name.split(".")[1]
            if target in ORDER:
                assert target in allowed, f"{path.name} ({layer}) imports {name}"
        for bad in FORBIDDEN_EXTERNAL.get(layer, ()):
            assert not (name == bad or name.startswith(bad + ".")), f"{path.name} ({layer}) imports {name}"
        assert not name.startswith("eval"), f"library code imports the eval scripts: {name}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_small_files_without_asserts_or_prints(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 400, f"{path.name} has grown past 400 lines"
    for node in ast.walk(ast.parse(text)):
        assert not isinstance(node, ast.Assert), f"assert in library code: {path.name}:{node.lineno}"
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and path.name != "cli.py":
            raise AssertionError(f"print in library code: {path.name}:{node.lineno}")


@pytest.mark.parametrize(
    "path",
    sorted([*(PKG.parent / "eval").glob("*.py"), *(PKG.parent / "tests").glob("*.py")]),
    ids=lambda p: str(p.relative_to(PKG.parent)),
)
def test_scripts_and_tests_stay_small(path):
    assert len(path.read_text().splitlines()) <= 400, f"{path.name} has grown past 400 lines"


def test_ruff_clean():
    """The repository passes ``ruff check`` and ``ruff format --check`` (the project's lint gate)."""
    import subprocess
    import sys

    root = PKG.parent
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The rule itself can fail: a pure-math file importing the module layer is reported."""
    fake = PKG / "fit.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from .linear import FPxINTLinear\n")
    with pytest.raises(AssertionError, match="imports fpxint_hf.linear"):
        test_layers_import_one_way(fake)
    with pytest.raises(AssertionError, match="belongs to no layer"):
        layer_of(PKG / "stray.py")


def test_pure_layers_import_without_transformers():
    """``import fpxint_hf.expansion`` (and the other torch-only layers) must not pull in transformers: the package
    ``__init__`` is lazy, and registration waits for transformers' own import."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, fpxint_hf.expansion, fpxint_hf.packing, fpxint_hf.kernels, fpxint_hf.linear\n"
        "bad = [m for m in ('transformers', 'accelerate') if m in sys.modules]\n"
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    env = {k: v for k, v in os.environ.items() if k != "FPXINT_NO_AUTOREGISTER"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    code = (
        "import fpxint_hf\nfrom transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m\n"
        "raise SystemExit(0 if m.get('fpxint') is not None else 1)"
    )
    for extra in ({}, {"FPXINT_NO_AUTOREGISTER": "1"}):  # the hook, or the eager import when it is off
        done = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (extra, done.stdout + done.stderr)
