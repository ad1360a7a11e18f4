"""``easyquant demo``: quantize real SmolLM2 weight matrices, RTN vs EasyQuant (tensor level).

To be replaced by the whole-model demo (perplexity table) once the model pipeline lands.
"""

from __future__ import annotations

import argparse
import time

import torch

from easyquant.config import QuantConfig
from easyquant.quantize import quantize_tensor


def read_gguf_tensor(path: str, name: str) -> torch.Tensor:
    """One tensor of a GGUF file, dequantized to float32 in PyTorch's [out, in] order."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from easyquant.cli import UserError

    reader = GGUFReader(path)
    for tensor in reader.tensors:
        if tensor.name == name:
            return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
    raise UserError(f"{path} has no tensor named {name!r}")


def run(args: argparse.Namespace) -> int:
    from easyquant.models.gguf_source import default_model_path

    path = str(default_model_path())
    names = [f"blk.{args.layer}.{kind}.weight" for kind in ("attn_q", "ffn_up", "ffn_down")]
    print(f"model: {path}\n(weights as loaded from the Q4_1 GGUF are the full-precision reference)")
    header = f"{'tensor':<24} {'method':<22} {'rel. error':>10} {'bits/weight':>11} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for name in names:
        weight = read_gguf_tensor(path, name)
        for label, config in (
            ("RTN", QuantConfig(bits=args.bits, method="rtn", outlier_sigma=None)),
            ("EasyQuant (paper)", QuantConfig.paper(bits=args.bits)),
        ):
            start = time.perf_counter()
            qw = quantize_tensor(weight, config)
            seconds = time.perf_counter() - start
            rel = ((qw.dequantize() - weight).norm() / weight.norm()).item()
            print(
                f"{name:<24} {label:<22} {rel:>10.4f} {qw.bits_per_weight:>11.3f} {seconds:>8.2f}"
            )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="quantize real SmolLM2 weights: RTN vs EasyQuant")
    demo.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    demo.add_argument("--layer", type=int, default=0)
    demo.set_defaults(func=run)
