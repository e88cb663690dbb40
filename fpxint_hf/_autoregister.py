"""Automatic registration of ``quant_method="fpxint"`` with transformers (a post-import hook).

Tools such as ``lm_eval --model hf --model_args pretrained=<dir>`` load a checkpoint with plain
``transformers`` and never ``import fpxint_hf``. transformers then does not know ``quant_method "fpxint"``: it
warns and comes up with randomly initialised layers, and lm-eval raises ``ValueError: Unknown quantization
type``. To avoid that, the wheel installs ``fpxint_hf_autoregister.pth`` and ``fpxint_hf_autoregister_boot.py``
into site-packages. The .pth's single ``import`` line runs at interpreter start-up and imports that bootstrap module
(``os`` and ``sys`` only; about 0.1 ms), which puts a tiny finder at the front of ``sys.meta_path``; neither torch,
transformers nor ``fpxint_hf`` is imported. The first time anything imports ``transformers.quantizers.auto`` (the
module that holds ``AUTO_QUANTIZATION_CONFIG_MAPPING``), that finder loads this file (by path, without executing
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
            import importlib

            mod = importlib.import_module("fpxint_hf.hf")
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
# ``pth_text()``: one ``import`` line that ``site`` executes at every interpreter start-up.  It imports
# ``fpxint_hf_autoregister_boot`` (also installed at the wheel root; only ``os`` and ``sys``), whose finder returns
# None for every module name but ``TARGET``; for that one it loads this file by path (without executing the
# ``fpxint_hf`` package) and hands over to ``find_spec`` above.  The line checks that the bootstrap module exists
# first, so a .pth left behind by a broken uninstall stays silent.

PTH_NAME = "fpxint_hf_autoregister.pth"
BOOT_MODULE = "fpxint_hf_autoregister_boot"


def pth_text() -> str:
    """The content of ``fpxint_hf_autoregister.pth``: comments, then the one line ``site`` executes.  CPython 3.11
    runs a venv's .pth lines twice; the second import is a no-op.  A test checks that the file in the repository
    matches."""
    return (
        '# fpxint-hf: registers quant_method "fpxint" with transformers the first time\n'
        "# transformers.quantizers.auto is imported (see fpxint_hf/_autoregister.py). Imports nothing heavy at\n"
        "# start-up; FPXINT_NO_AUTOREGISTER=1 disables it. Generated by fpxint_hf._autoregister.pth_text().\n"
        f"import os, sys; any(os.path.isfile(os.path.join(p, {BOOT_MODULE + '.py'!r})) for p in sys.path) "
        f"and __import__({BOOT_MODULE!r})\n"
    )
