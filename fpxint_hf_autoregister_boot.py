"""Start-up bootstrap of fpxint-hf, imported by ``fpxint_hf_autoregister.pth`` (see ``fpxint_hf/_autoregister.py``).

Imports only ``os`` and ``sys``.  Unless ``FPXINT_NO_AUTOREGISTER`` is set, it puts a finder at the front of
``sys.meta_path`` that returns None for every module but ``transformers.quantizers.auto``; for that one it loads
``fpxint_hf/_autoregister.py`` by path (without executing ``fpxint_hf/__init__.py``) and hands over.  Any failure
there (fpxint_hf gone or unreadable) leaves imports untouched.
"""

import os
import sys

TARGET = "transformers.quantizers.auto"
MARKER = "_fpxint_hf_autoregister"


class _FPxINTAutoregisterBootstrap:
    _fpxint_hf_autoregister = True
    hook = None

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != TARGET:
            return None
        if cls.hook is None:
            cls.hook = False
            try:
                from importlib.util import module_from_spec, spec_from_file_location

                pkg = None
                for finder in sys.meta_path:
                    if not getattr(finder, MARKER, False) and hasattr(finder, "find_spec"):
                        pkg = finder.find_spec("fpxint_hf", None)
                        if pkg is not None:
                            break
                file = os.path.join(pkg.submodule_search_locations[0], "_autoregister.py")
                spec = spec_from_file_location("_fpxint_hf_autoregister", file)
                module = module_from_spec(spec)
                spec.loader.exec_module(module)
                cls.hook = module
            except Exception:
                pass  # fpxint_hf is gone or unreadable: behave as if the hook were not installed
        return cls.hook.find_spec(name, path, target) if cls.hook else None


if os.environ.get("FPXINT_NO_AUTOREGISTER", "0") in ("", "0") and not any(
    getattr(f, MARKER, False) for f in sys.meta_path
):
    sys.meta_path.insert(0, _FPxINTAutoregisterBootstrap)
