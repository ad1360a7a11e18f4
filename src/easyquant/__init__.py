"""easyquant: data-free weight-only LLM quantization (EasyQuant, arXiv 2403.02775)."""

from easyquant.config import QuantConfig
from easyquant.format.qweight import FORMAT_VERSION, QuantizedWeight
from easyquant.nn.quant_linear import QuantLinear
from easyquant.quantize import quantize_tensor

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "QuantConfig",
    "QuantLinear",
    "QuantizedWeight",
    "__version__",
    "quantize_tensor",
]
