"""Automatic registration of ``quant_method="fpxint"`` with transformers (a post-import hook).

Tools such as ``lm_eval --model hf --model_args pretrained=<dir>`` load a checkpoint with plain
``transformers`` and never ``import fpxint_hf``. transformers then does not know ``quant_method "fpxint"``: it
warns and comes up with randomly initialised layers, and lm-eval raises ``ValueError: Unknown quantization
type``. To avoid that, the wheel installs ``fpxint_hf_autoregister.pth`` into site-packages. Its single line runs
at interpreter start-up and only puts a tiny finder at the front of ``sys.meta_path``; it imports neither torch,
transformers nor ``fpxint_hf``. The first time anything imports ``transformers.quantizers.auto`` (the module that
holds ``AUTO_QUANTIZATION_CONFIG_MAPPING``), that finder loads this file (by path, without executing
``fpxint_hf/__init__.py``) and hands over to :func:`find_spec` here, which finds the module with the other
finders and wraps its loader; as soon as the module has executed, :func:`register_now` imports ``fpxint_hf.hf``
and calls its idempotent ``register()``. The import of ``transformers`` never fails because of this hook: a
failing registration only warns.

This file is also loaded outside the ``fpxint_hf`` package, so it imports only the standard library at module
level. ``install()`` puts the same hook in place from Python code (for an environment without the .pth).

Set ``FPXINT_NO_AUTOREGISTER=1`` (any value but ``""`` or ``"0"``) to disable the hook, at start-up or before
transformers is imported; ``import fpxint_hf`` still registers explicitly.
"""

from __future__ import annotations

import os
import sys

TARGET = "transformers.quantizers.auto"
ENV_DISABLE = "FPXINT_NO_AUTOREGISTER"
# Attribute set on every finder this hook puts on ``sys.meta_path`` (the .pth bootstrap has it too): the first
# such finder skips the others, and ``install()`` is idempotent even across several copies of this module.
MARKER = "_fpxint_hf_autoregister"


def disabled() -> bool:
    """True when ``FPXINT_NO_AUTOREGISTER`` is set to anything but ``""`` or ``"0"`` (same test as the .pth)."""
    return os.environ.get(ENV_DISABLE, "0") not in ("", "0")


def register_now() -> None:
    """Register ``"fpxint"`` with transformers; warn (never raise) when that fails."""
    if disabled():
        return
    pkg = sys.modules.get("fpxint_hf")
    mod = sys.modules.get("fpxint_hf.hf")
    if (pkg is not None and getattr(getattr(pkg, "__spec__", None), "_initializing", False)) or (
        mod is not None and not callable(getattr(mod, "register", None))
    ):
        # ``import fpxint_hf`` is running right now (it is what imported transformers.quantizers.auto); it
        # imports ``fpxint_hf.hf``, which registers at the end of its own import.
        return
    try:
        if mod is None:
            import fpxint_hf.hf as mod
        mod.register()
    except Exception as exc:  # never break the import of transformers
        import warnings

        warnings.warn(
            f"fpxint_hf: automatic registration of quant_method 'fpxint' with transformers failed "
            f"({type(exc).__name__}: {exc}). Checkpoints saved with FP=xINT will not load correctly; "
            f"run `python -c 'import fpxint_hf'` to see the full error. Set {ENV_DISABLE}=1 to switch the "
            f"hook off.",
            RuntimeWarning,
            stacklevel=2,
        )


class _ChainedLoader:
    """Delegates to the real loader and calls :func:`register_now` once the module has executed."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, is_package, get_resource_reader, ...
        if name == "loader":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # Give the module its real loader back (inspect, importlib.resources, reload use it).
        if getattr(module, "__loader__", None) in (None, self):
            try:
                module.__loader__ = self.loader
            except AttributeError:
                pass
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "loader", None) is self:
            spec.loader = self.loader
        self.loader.exec_module(module)
        register_now()


# Threads now inside find_spec(TARGET): guards against re-entrance (another finder that looks TARGET up again)
# without hiding TARGET from a second thread (importlib.util.find_spec does not take the module lock).
_busy: set[int] = set()


def find_spec(fullname, path=None, target=None):
    """Find ``TARGET`` with the other finders and return its spec with a loader that registers after exec.

    The hook's finders stay on ``sys.meta_path`` (removing entries could disturb another thread iterating it);
    for any other name they return None at once, and ``importlib.reload`` of ``TARGET`` registers again.
    """
    if fullname != TARGET or disabled():
        return None
    import _thread

    me = _thread.get_ident()
    if me in _busy:
        return None
    _busy.add(me)
    try:
        for finder in list(sys.meta_path):
            finder_find_spec = getattr(finder, "find_spec", None)
            if finder_find_spec is None or getattr(finder, MARKER, False):
                continue
            spec = finder_find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _ChainedLoader(spec.loader)
            return spec
        return None
    finally:
        _busy.discard(me)


class Finder:
    """``sys.meta_path`` entry that reacts to ``TARGET`` only (for ``install()`` from Python code)."""

    _fpxint_hf_autoregister = True
    find_spec = staticmethod(find_spec)


def installed() -> bool:
    """True when a finder of this hook (or the .pth bootstrap) is on ``sys.meta_path``."""
    return any(getattr(f, MARKER, False) for f in sys.meta_path)


def install() -> bool:
    """Put the hook on ``sys.meta_path`` (idempotent); if transformers is already loaded, register at once.

    Returns True when registration is (or will be) taken care of.
    """
    if disabled():
        return False
    if TARGET in sys.modules:
        register_now()
        return True
    if not installed():
        sys.meta_path.insert(0, Finder)
    return True


# --------------------------------------------------------------------------- the .pth bootstrap
# ``fpxint_hf_autoregister.pth`` (repository root, installed at the wheel root, i.e. into site-packages) holds
# ``pth_text()``. ``site`` executes its ``import ...`` line at every interpreter start-up, so that line is one
# cheap expression: unless disabled, it puts a finder at the front of ``sys.meta_path`` whose ``find_spec`` is a
# lambda that returns None for every other module name. Only for ``TARGET`` does it compile and run
# ``TRIGGER_SOURCE`` (once), which finds ``fpxint_hf`` with the other finders (without executing the package),
# loads this file by path and hands over to ``find_spec`` above. Any failure there leaves imports untouched.
TRIGGER_SOURCE = """\
import os, sys
hook = None
def find_spec(name, path=None, target=None):
    global hook
    if hook is None:
        hook = False
        try:
            from importlib.util import module_from_spec, spec_from_file_location
            pkg = None
            for finder in sys.meta_path:
                if not getattr(finder, "_fpxint_hf_autoregister", False) and hasattr(finder, "find_spec"):
                    pkg = finder.find_spec("fpxint_hf", None)
                    if pkg is not None:
                        break
            file = os.path.join(pkg.submodule_search_locations[0], "_autoregister.py")
            spec = spec_from_file_location("_fpxint_hf_autoregister", file)
            module = module_from_spec(spec)
            spec.loader.exec_module(module)
            hook = module
        except Exception:
            pass  # fpxint_hf is gone or unreadable: behave as if the hook were not installed
    return hook.find_spec(name, path, target) if hook else None
"""

PTH_NAME = "fpxint_hf_autoregister.pth"


def pth_text() -> str:
    """The content of ``fpxint_hf_autoregister.pth``: comments, then one line that ``site`` executes (it starts
    with ``import``). Kept to one small expression because ``site`` compiles it at every start-up (no .pyc).
    CPython 3.11 runs the .pth lines of a venv's site-packages twice (``site.venv`` and ``addsitepackages``),
    hence the ``not any(...)``; a second copy (two site directories) would be harmless anyway, the first hook
    finder on ``sys.meta_path`` skips the others. A test checks that the file in the repository matches."""
    line = (
        f"import os, sys; os.environ.get({ENV_DISABLE!r}, '0') in ('', '0') "
        f"and not any(getattr(f, {MARKER!r}, 0) for f in sys.meta_path) "
        "and sys.meta_path.insert(0, type('_FPxINTAutoregisterBootstrap', (), {"
        f"{MARKER!r}: True, 'find_spec': staticmethod(lambda n, p=None, t=None, g={{}}: None if n != {TARGET!r} "
        f"else (g or exec({TRIGGER_SOURCE!r}, g), g['find_spec'](n, p, t))[1])}}))\n"
    )
    return (
        '# fpxint-hf: registers quant_method "fpxint" with transformers the first time\n'
        "# transformers.quantizers.auto is imported (see fpxint_hf/_autoregister.py). Imports nothing at\n"
        "# start-up; FPXINT_NO_AUTOREGISTER=1 disables it. Generated by fpxint_hf._autoregister.pth_text().\n"
        + line
    )
