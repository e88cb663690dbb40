"""fpxint_hf: FP=xINT low-bit series expansion as a Hugging Face transformers quantizer.

``import fpxint_hf`` registers ``quant_method="fpxint"`` with transformers.
"""

from .expansion import Expansion, expand, reconstruct
from .hf import FPxINTConfig, FPxINTHfQuantizer, register
from .linear import FPxINTLinear
from .model_ops import set_active_terms, set_forward_mode

__version__ = "0.2.0"

__all__ = [
    "Expansion",
    "FPxINTConfig",
    "FPxINTHfQuantizer",
    "FPxINTLinear",
    "expand",
    "reconstruct",
    "register",
    "set_active_terms",
    "set_forward_mode",
]
