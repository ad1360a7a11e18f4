"""easyquant: data-free weight-only LLM quantization (EasyQuant, arXiv 2403.02775)."""

from typing import Any

from easyquant.config import QuantConfig
from easyquant.format.qweight import FORMAT_VERSION, QuantizedWeight
from easyquant.nn.quant_linear import QuantLinear
from easyquant.quantize import quantize_tensor

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "EasyQuantConfig",
    "QuantConfig",
    "QuantLinear",
    "QuantizedWeight",
    "__version__",
    "load_quantized",
    "quantize_model",
    "quantize_tensor",
]

# The model pipeline is exported lazily: importing easyquant stays free of its heavier imports.
_LAZY = {"quantize_model", "load_quantized"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from easyquant import models

        return getattr(models, name)
    if name == "EasyQuantConfig":
        from easyquant.integrations.transformers import EasyQuantConfig

        return EasyQuantConfig
    raise AttributeError(f"module 'easyquant' has no attribute {name!r}")


# Register "easyquant" with transformers when transformers loads its quantizers (no import now).
from easyquant.integrations import install_import_hook as _install_import_hook  # noqa: E402

_install_import_hook()
