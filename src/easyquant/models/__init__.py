"""Whole models: which weights to quantize, quantizing a checkpoint to a directory, loading it back.

transformers is imported only when a function that needs it runs.
"""

from easyquant.models.loader import is_quantized, load_quantized
from easyquant.models.pipeline import QuantizeResult, quantize_model
from easyquant.models.select import Selection, TensorReport, quantize_model_inplace

__all__ = [
    "QuantizeResult",
    "Selection",
    "TensorReport",
    "is_quantized",
    "load_quantized",
    "quantize_model",
    "quantize_model_inplace",
]
