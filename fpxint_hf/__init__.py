"""fpxint_hf: FP=xINT low-bit series expansion as a Hugging Face transformers quantizer.

``import fpxint_hf`` makes sure ``quant_method="fpxint"`` is registered with transformers: at once when
transformers' quantizer registry is already loaded (or the start-up hook is switched off with
``FPXINT_NO_AUTOREGISTER=1``), otherwise the moment that registry is first imported (``_autoregister``).  The
public names are loaded lazily, so ``import fpxint_hf.expansion`` (pure torch math) does not import transformers.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from . import _autoregister

__version__ = "0.2.0"

_EXPORTS = {
    "Expansion": ".expansion",
    "ExpandOptions": ".expansion",
    "expand": ".expansion",
    "reconstruct": ".expansion",
    "FPxINTLinear": ".linear",
    "FPxINTSeries": ".series",
    "forward_paths": ".model_ops",
    "set_active_terms": ".model_ops",
    "set_forward_mode": ".model_ops",
    "FPxINTConfig": ".hf",
    "FPxINTHfQuantizer": ".hf",
    "register": ".hf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fpxint_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if _autoregister.disabled() or _autoregister.TARGET in sys.modules:
    importlib.import_module(".hf", __name__)  # registers now (fpxint_hf.hf calls register() when imported)
else:
    _autoregister.install()  # registers when transformers.quantizers.auto is first imported
