"""transformers integration: ``FPxINTConfig``, the ``HfQuantizer`` and its registration as ``"fpxint"``."""

from __future__ import annotations

import transformers
from packaging.version import Version

if Version(transformers.__version__).major < 5:
    raise ImportError(
        f"fpxint_hf needs transformers >= 5.0 (its quantizer uses the v5 conversion-op API); found "
        f"transformers {transformers.__version__}. Upgrade with: pip install -U 'transformers>=5,<6'"
    )

import transformers.quantizers.auto as _auto  # noqa: E402

from .config import QUANT_METHOD, FPxINTConfig  # noqa: E402
from .quantizer import FPxINTHfQuantizer  # noqa: E402
from .reload import install_config_merge  # noqa: E402


def register() -> None:
    """Register ``quant_method="fpxint"`` with transformers (idempotent; survives a reload of its registry), and
    route a ``quantization_config`` passed for an already-quantized folder through ``reload.merge_with_checkpoint``."""
    if _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not FPxINTConfig:
        _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        _auto.register_quantization_config(QUANT_METHOD)(FPxINTConfig)
    if _auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not FPxINTHfQuantizer:
        _auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        _auto.register_quantizer(QUANT_METHOD)(FPxINTHfQuantizer)
    install_config_merge(_auto.AutoHfQuantizer)


register()

__all__ = ["FPxINTConfig", "FPxINTHfQuantizer", "register"]
