"""Quantization speed: quantize_tensor per shape, a Llama-2-7B-shaped model against RTN and HQQ,
or every decoder weight of SmolLM2-135M.

    python benchmarks/bench_quantize.py [--device cpu|cuda] [--steps 100 500] [--backend torch]
    python benchmarks/bench_quantize.py --workload llama7b [--layers 32] [--check] [--sweep]
    python benchmarks/bench_quantize.py --workload smollm2 --device cpu --steps 500

Workloads:
- ``shapes``: quantize_tensor on a 4096x4096 and an 11008x4096 Student-t matrix.
- ``llama7b`` (GPU): 32 layers of Llama-2-7B shapes (q,k,v,o 4096x4096, gate/up 11008x4096,
  down 4096x11008: 6.48B parameters), bf16 Student-t (df=5) x 0.02, generated on the GPU with one
  seed per layer. From weights on the GPU to packed results on the GPU, in one run: RTN, HQQ
  (``Quantizer.quantize``, 4-bit, group 64, axis 1, optimize=True; needs ``hqq`` importable),
  EasyQuant 4-bit per channel, n = 3, through the torch path and the Triton kernel.
  ``--check`` compares the kernel with the torch path on layer 0 first; ``--sweep`` times
  launch plans and rounding modes of the kernel alone, and an FMA-rate ceiling.
- ``smollm2``: the 210 decoder Linear weights of the default model (SmolLM2-135M-Instruct GGUF,
  loaded as float32: those weights were Q4_1 block-quantized upstream).

Prints a table and writes benchmarks/results/<device>-<date>[-<workload>]-quantize.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchlib import RESULTS, print_table, write_result
from easyquant import QuantConfig, quantize_tensor
from easyquant.algorithm.outliers import outlier_mask
from easyquant.algorithm.range_search import adam_range_search

SHAPES = [(4096, 4096), (11008, 4096)]
LLAMA2_7B_LAYER = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
HQQ_ARGS = dict(nbits=4, channel_wise=True, group_size=64, optimize=True, axis=1, bitpack=True)


def heavy_tailed(
    shape: tuple[int, int], device: str, dtype: torch.dtype, seed: int = 0
) -> torch.Tensor:
    """Student-t (df = 5) x 0.02, like LLM weights; drawn on ``device`` (same seed, same draw)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    normal = torch.randn(shape, generator=gen, device=device)
    chi = torch.zeros(shape, device=device)
    for _ in range(5):  # chi-square(5), one normal at a time to keep memory low
        chi.add_(torch.randn(shape, generator=gen, device=device).square_())
    return (normal / (chi / 5).sqrt_() * 0.02).to(dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- workload "shapes" ---------------------------------------------------------------------------
def bench_shapes(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    rows = []
    for shape in SHAPES:
        weight = heavy_tailed(shape, args.device, dtype)
        for steps in args.steps:
            config = QuantConfig(steps=steps)
            quantize_tensor(weight[:64], config, backend=args.backend)  # warm-up
            times = []
            for _ in range(args.repeats):
                sync(args.device)
                start = time.perf_counter()
                quantize_tensor(weight, config, backend=args.backend)
                sync(args.device)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append(
                {
                    "shape": f"{shape[0]}x{shape[1]}",
                    "steps": steps,
                    "backend": args.backend,
                    "seconds": round(seconds, 4),
                    "Melem/s": round(weight.numel() / seconds / 1e6, 2),
                }
            )
            print_table(rows[-1:], list(rows[-1]))
    return "quantize", {"dtype": str(dtype), "rows": rows}


# ---- workload "smollm2" --------------------------------------------------------------------------
def bench_smollm2(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from torch import nn
    from transformers import AutoModelForCausalLM

    from easyquant.models.gguf_source import default_model_path
    from easyquant.models.select import Selection

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    selection = Selection()
    weights = [
        module.weight.detach().to(args.device)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and selection.wants(name, tuple(module.weight.shape))
    ]
    params = sum(w.numel() for w in weights)
    rows = []
    for steps in args.steps:
        config = QuantConfig(steps=steps)
        quantize_tensor(weights[0][:64], config, backend=args.backend)  # warm-up
        sync(args.device)
        start = time.perf_counter()
        for weight in weights:
            quantize_tensor(weight, config, backend=args.backend)
        sync(args.device)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> float32)",
                "weights": len(weights),
                "params": params,
                "steps": steps,
                "backend": args.backend,
                "seconds": round(seconds, 2),
                "Mparam/s": round(params / seconds / 1e6, 3),
            }
        )
        print_table(rows[-1:], list(rows[-1]))
    return "smollm2-quantize", {"config": QuantConfig().to_dict(), "rows": rows}


# ---- workload "llama7b" --------------------------------------------------------------------------
def llama_weights(layers: int, device: str) -> list[list[torch.Tensor]]:
    return [
        [
            heavy_tailed(shape, device, torch.bfloat16, seed=1000 * layer + i)
            for i, shape in enumerate(LLAMA2_7B_LAYER.values())
        ]
        for layer in range(layers)
    ]


def time_pass(
    quantize: Callable[[torch.Tensor], Any], model: list[list[torch.Tensor]], device: str
) -> float:
    """Seconds to quantize every matrix of ``model``, all results kept on the device."""
    sync(device)
    start = time.perf_counter()
    results = [quantize(w) for layer in model for w in layer]
    sync(device)
    seconds = time.perf_counter() - start
    del results
    return seconds


def relative_error(dequantized: list[torch.Tensor], weights: list[torch.Tensor]) -> float:
    pairs = zip(dequantized, weights, strict=True)
    num = sum(float((d.float() - w.float()).square().sum()) for d, w in pairs)
    return num / sum(float(w.float().square().sum()) for w in weights)


def hqq_method() -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]] | None:
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as exc:
        print(f"HQQ skipped: {exc}")
        return None

    def quantize(w: torch.Tensor) -> Any:
        return Quantizer.quantize(w, compute_dtype=torch.float16, device=str(w.device), **HQQ_ARGS)

    def dequantize(result: Any) -> torch.Tensor:
        w_q, meta = result
        return Quantizer.dequantize(w_q, {**meta, "compute_dtype": torch.float16})

    return quantize, dequantize


def easyquant_method(config: QuantConfig, backend: str):
    def quantize(w: torch.Tensor) -> Any:
        return quantize_tensor(w, config, backend=backend)  # type: ignore[arg-type]

    def dequantize(result: Any) -> torch.Tensor:
        return result.dequantize(torch.float32)

    return quantize, dequantize


def fused_method(config: QuantConfig):
    """The whole pipeline with the finish fused (kernels/triton_range_pipeline.py)."""
    from easyquant.kernels.triton_range_pipeline import quantize_tensor_triton

    def quantize(w: torch.Tensor) -> Any:
        return quantize_tensor_triton(w, config)

    def dequantize(result: Any) -> torch.Tensor:
        return result.dequantize(torch.float32)

    return quantize, dequantize


def check_kernel(layer: list[torch.Tensor], steps: int) -> list[dict[str, Any]]:
    """Kernel vs torch range search on real-shaped rows: ranges, losses, end-to-end codes."""
    from easyquant.kernels.triton_range_pipeline import quantize_tensor_triton
    from easyquant.kernels.triton_range_search import (
        EXACT,
        MINMAX,
        SATURATE,
        triton_range_search_with_loss,
    )

    config = QuantConfig(steps=steps)
    rows = []
    for name, w in zip(LLAMA2_7B_LAYER, layer, strict=True):
        if name not in ("q_proj", "gate_proj", "down_proj"):
            continue
        for bits, group in ((4, None), (2, None), (3, 128), (8, None)):
            cfg = config.replace(bits=bits, group_size=group)
            normals = (
                w.float().masked_fill(outlier_mask(w, 3.0), 0.0).reshape(-1, group or w.shape[1])
            )
            ref_s, ref_l = adam_range_search(normals, cfg.qmin, cfg.qmax, steps, cfg.lr)
            # Control: the reference itself with its columns in another order (only the
            # rounding of its sums changes) spreads as far as this from its own result.
            perm = torch.randperm(normals.shape[1], device=normals.device)
            control = adam_range_search(normals[:, perm], cfg.qmin, cfg.qmax, steps, cfg.lr)
            modes = [("control", control), ("default", None), ("saturate", SATURATE)]
            modes += [("minmax", MINMAX)]
            if (bits, group) == (3, 128):
                modes.append(("exact", EXACT))
            for mode_name, mode in modes:
                if mode_name == "control":
                    s, loss = mode
                else:
                    s, loss = triton_range_search_with_loss(
                        normals, cfg.qmin, cfg.qmax, steps, cfg.lr, mode=mode
                    )
                on = ref_s.squeeze(1) > 0
                rel_s = ((s - ref_s).abs() / ref_s.clamp_min(1e-30)).squeeze(1)[on]
                rel_l = ((loss - ref_l) / ref_l.clamp_min(1e-30))[on]
                row = {
                    "matrix": name,
                    "bits": bits,
                    "group": group or "channel",
                    "mode": mode_name,
                    "max_rel_scale": f"{float(rel_s.max()):.1e}",
                    "rows_scale>1e-4": f"{float((rel_s > 1e-4).float().mean()):.2%}",
                    "max_rel_loss": f"{float(rel_l.abs().max()):.1e}",
                    "mean_rel_loss(+=worse)": f"{float(rel_l.mean()):.1e}",
                }
                worst = int(rel_l.abs().argmax())
                row["worst_row(ref,kernel loss)"] = (
                    f"{float(ref_l[on][worst]):.3e},{float(loss[on][worst]):.3e}"
                )
                if mode_name == "default" and group is None:
                    got = quantize_tensor(w, cfg, backend="triton")
                    ref = quantize_tensor(w, cfg, backend="torch")
                    fused = quantize_tensor_triton(w, cfg)
                    row["fused_equal"] = all(
                        torch.equal(a, b)
                        for a, b in zip(
                            fused.state_dict().values(), got.state_dict().values(), strict=True
                        )
                    )
                    same_out = torch.equal(
                        got.outlier_indices, ref.outlier_indices
                    ) and torch.equal(got.outlier_values, ref.outlier_values)
                    codes = got.codes() != ref.codes()
                    row["codes_differ"] = f"{float(codes.float().mean()):.2e}"
                    row["outliers_same"] = same_out
                rows.append(row)
                print_table(rows[-1:], list(rows[-1]))
    return rows


@torch.no_grad()
def bench_llama7b(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    device = args.device
    if args.sweep and not device.startswith("cuda"):
        raise SystemExit("--sweep times kernels with CUDA events: it needs --device cuda")
    gen_start = time.perf_counter()
    model = llama_weights(args.layers, device)
    sync(device)
    params = sum(w.numel() for layer in model for w in layer)
    print(
        f"{args.layers} layers, {params / 1e9:.3f}B parameters generated in "
        f"{time.perf_counter() - gen_start:.1f} s"
    )
    payload: dict[str, Any] = {"layers": args.layers, "params": params, "hqq_args": HQQ_ARGS}
    if args.check:
        payload["check"] = check_kernel(model[0], steps=100)
        if args.check_only:
            payload["rows"] = payload["check"]
            return "llama7b-check", payload
    if args.sweep:
        payload["sweep"] = sweep_kernel(model[0], steps=100)
        payload["kernel_only"] = kernel_only(model[0], args.layers, args.steps)

    methods: list[tuple[str, int | None, Any]] = [
        ("rtn", None, easyquant_method(QuantConfig(method="rtn", outlier_sigma=None), "torch"))
    ]
    hqq = hqq_method()
    if hqq is not None:
        methods.append(("hqq 4-bit g64 optimize", None, hqq))
    for steps in args.torch_steps:
        methods.append(
            ("easyquant torch", steps, easyquant_method(QuantConfig(steps=steps), "torch"))
        )
    for steps in args.steps:
        methods.append(
            ("easyquant triton", steps, easyquant_method(QuantConfig(steps=steps), "triton"))
        )
    for steps in args.steps:
        methods.append(("easyquant triton fused", steps, fused_method(QuantConfig(steps=steps))))
    rows = []
    for name, steps, (quantize, dequantize) in methods:
        results = [quantize(w) for w in model[0]]  # warm-up (compilation) and layer-0 quality
        error = relative_error([dequantize(r) for r in results], model[0])
        bpw = None
        if hasattr(results[0], "bits_per_weight"):
            bits = sum(r.storage_bits for r in results)
            bpw = round(bits / sum(w.numel() for w in model[0]), 3)
        del results
        times = [time_pass(quantize, model, device)]
        while len(times) < args.repeats and sum(times) < 15:
            times.append(time_pass(quantize, model, device))
        seconds = statistics.median(times)
        rows.append(
            {
                "method": name,
                "steps": steps if steps is not None else "",
                "seconds": round(seconds, 3),
                "Gparam/s": round(params / seconds / 1e9, 2),
                "runs": len(times),
                "rel_err_layer0": f"{error:.3e}",
                "bits/weight": bpw if bpw is not None else "",
            }
        )
        print_table(rows[-1:], list(rows[-1]))
        torch.cuda.empty_cache()
    hqq_seconds = next((r["seconds"] for r in rows if r["method"].startswith("hqq")), None)
    for row in rows:
        row["speedup_vs_hqq"] = round(hqq_seconds / row["seconds"], 2) if hqq_seconds else ""
    payload["rows"] = rows
    payload["note"] = (
        "4-bit per channel, outliers n=3 (tensor); HQQ 4-bit group 64. Seconds: all 32 layers, "
        "bf16 weights on the GPU to packed results on the GPU, median of runs. rel_err_layer0: "
        "sum ||W_q - W||^2 / sum ||W||^2 over layer 0's seven matrices."
    )
    return "llama7b-quantize", payload


def normals_of(w: torch.Tensor) -> torch.Tensor:
    return w.float().masked_fill(outlier_mask(w, 3.0), 0.0)


def kernel_only(layer: list[torch.Tensor], layers: int, steps_list: list[int]) -> list[dict]:
    """The range-search kernel alone, per distinct shape (its time does not depend on values)."""
    import triton.testing

    from easyquant.kernels.triton_range_search import launch_plan, triton_range_search

    per_shape: dict[tuple[int, int], int] = {}
    for shape in LLAMA2_7B_LAYER.values():
        per_shape[shape] = per_shape.get(shape, 0) + layers
    samples = {
        shape: normals_of(w) for shape, w in zip(LLAMA2_7B_LAYER.values(), layer, strict=True)
    }
    rows = []
    for steps in steps_list:
        total = 0.0
        for shape, count in per_shape.items():
            x = samples[shape]
            ms = triton.testing.do_bench(
                lambda x=x, steps=steps: triton_range_search(x, -8, 7, steps, 1e-2),
                return_mode="median",
            )
            total += ms / 1e3 * count
            rows.append(
                {
                    "shape": f"{shape[0]}x{shape[1]}",
                    "steps": steps,
                    "plan": str(launch_plan(*shape)),
                    "ms": round(ms, 3),
                    "Gelem-steps/s": round(x.numel() * (steps + 1) / ms / 1e6, 1),
                }
            )
            print_table(rows[-1:], list(rows[-1]))
        rows.append({"shape": "all layers", "steps": steps, "seconds": round(total, 3)})
        print(f"kernel only, whole model, {steps} steps: {total:.3f} s")
    return rows


def sweep_kernel(layer: list[torch.Tensor], steps: int) -> list[dict[str, Any]]:
    """Launch plans and rounding modes of the kernel on one gate_proj and one down_proj."""
    import triton.testing

    from easyquant.kernels.triton_range_search import (
        MINMAX,
        SATURATE,
        LaunchPlan,
        chunk_lengths,
        launch_plan,
        triton_range_search_with_loss,
    )

    ceiling = fma_ceiling()
    rows: list[dict[str, Any]] = [{"what": "FFMA ceiling", "Gelem-steps/s": "", **ceiling}]
    print(rows[0])
    cases = {
        "gate_proj": [LaunchPlan(1, (4096,), w) for w in (1, 2, 4)],
        "down_proj": [LaunchPlan(1, chunk_lengths(11008, 3), w) for w in (2, 4, 8)]
        + [LaunchPlan(1, chunk_lengths(11008, 4), 4)],
    }
    for group in (64, 128):
        cases[f"q_proj g{group}"] = [
            LaunchPlan(rows, (group,), warps) for rows, warps in ((4, 1), (8, 1), (16, 4))
        ]
    for name, plans in cases.items():
        matrix, _, group = name.partition(" g")
        x = normals_of(layer[list(LLAMA2_7B_LAYER).index(matrix)])
        if group:
            x = x.reshape(-1, int(group))
        default = launch_plan(*x.shape)
        for plan in plans:
            for mode_name, mode in (("saturate", SATURATE), ("minmax", MINMAX)):
                if mode == MINMAX and plan.chunks != default.chunks:
                    continue
                try:
                    ms = triton.testing.do_bench(
                        lambda x=x, plan=plan, mode=mode: triton_range_search_with_loss(
                            x, -8, 7, steps, 1e-2, plan=plan, mode=mode
                        ),
                        return_mode="median",
                    )
                except Exception as exc:  # a plan that does not compile is a result too
                    rows.append(
                        {
                            "what": name,
                            "plan": str(plan),
                            "mode": mode_name,
                            "error": str(exc).splitlines()[0][:120],
                        }
                    )
                    print(rows[-1])
                    continue
                rate = x.numel() * (steps + 1) / ms / 1e6
                rows.append(
                    {
                        "what": name,
                        "plan": f"rows={plan.block_rows} chunks={plan.chunks} "
                        f"warps={plan.num_warps}",
                        "mode": mode_name,
                        "default": plan == default,
                        "ms": round(ms, 3),
                        "Gelem-steps/s": round(rate, 1),
                    }
                )
                print_table(rows[-1:], list(rows[-1]))
    return rows


def fma_ceiling() -> dict[str, Any]:
    """Measured FP32 FMA rate of this GPU through Triton (the arithmetic ceiling)."""
    import triton
    import triton.language as tl
    import triton.testing

    @triton.jit
    def fma_chain(out_ptr, iters, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = offs.to(tl.float32) * 1e-6
        for _ in range(iters):
            x = x * 0.999 + 1e-3
            x = x * 0.999 + 1e-3
            x = x * 0.999 + 1e-3
            x = x * 0.999 + 1e-3
        tl.store(out_ptr + offs, x)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block, programs, iters = 4096, sms * 8, 1000
    out = torch.empty(block * programs, device="cuda")
    ms = triton.testing.do_bench(
        lambda: fma_chain[(programs,)](out, iters, BLOCK=block, num_warps=4),
        return_mode="median",
    )
    fmas = block * programs * iters * 4
    return {"ms": round(ms, 3), "TFMA/s": round(fmas / ms / 1e9, 2), "sms": sms}


# ---- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="shapes", choices=("shapes", "llama7b", "smollm2"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--layers", type=int, default=32, help="llama7b: decoder layers")
    parser.add_argument(
        "--torch-steps", type=int, nargs="*", default=[100], help="llama7b: torch-path steps"
    )
    parser.add_argument("--check", action="store_true", help="llama7b: kernel vs torch first")
    parser.add_argument("--check-only", action="store_true", help="llama7b: --check, no timing")
    parser.add_argument("--sweep", action="store_true", help="llama7b: kernel plans and modes")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    bench = {"shapes": bench_shapes, "llama7b": bench_llama7b, "smollm2": bench_smollm2}
    kind, payload = bench[args.workload](args)
    print()
    print_table(payload["rows"], list(payload["rows"][-1]))
    path = write_result(kind, args.device, payload, out_dir=args.out_dir)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
