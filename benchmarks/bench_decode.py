"""End-to-end decode speed at batch 1 (or ``--batch B`` sequences decoded together): a
Llama-2-7B-shaped model with random weights, fp16 against EasyQuant (RTN codes + outliers, fused
kernels), in the same run.

    python benchmarks/bench_decode.py [--layers 32] [--new-tokens 128] [--bits 4] [--no-graph]
        [--batch 1]
    python benchmarks/bench_decode.py --tiny --device cpu --no-graph   # smoke test of the code path

transformers' ``LlamaForCausalLM`` from a ``LlamaConfig`` (hidden 4096, MLP 11008, 32 heads,
vocab 32000), fp16, ``StaticCache``; each decode step (forward, greedy pick, position update) is
captured once in a CUDA graph and replayed (``--compile``: the step is ``torch.compile``-d first,
for both models). Every ``nn.Linear`` of the decoder blocks becomes a
``QuantLinear`` (``lm_head`` stays fp16); ranges are RTN (the speed does not depend on how the
ranges were found) and the outlier threshold is the n-sigma rule with n set so that ~``--outliers``
of Gaussian weights are outliers (0.5%: n = 2.81). Also times a prefill of ``--prefill`` tokens
(large-batch path; replayed from a CUDA graph unless ``--no-graph``). Then (unless ``--no-fuse``)
the same quantized model again with q/k/v and gate/up each run as one concatenated layer
(``easyquant.nn.quant_linear.fuse_siblings``).
Writes ``<device>-<date>-decode.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from benchlib import RESULTS, print_table, write_result
from easyquant import QuantConfig, QuantLinear, quantize_tensor


def llama_config(tiny: bool, layers: int):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
            max_position_embeddings=2048,
        )
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )


def build_model(config, device: str) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def quantize_blocks(
    model: nn.Module, config: QuantConfig, kv_bits: int | None = None
) -> tuple[int, int, int]:
    """Replace every Linear inside the decoder blocks (``kv_bits``: k_proj and v_proj at that
    width, as the best preset's per-module change); returns (layers, outliers, weights)."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    ]
    outliers = weights = 0
    for name, linear in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        kv = kv_bits is not None and name.endswith(("k_proj", "v_proj"))
        layer_config = config.replace(bits=kv_bits) if kv else config
        qweight = quantize_tensor(linear.weight.detach(), layer_config)
        layer = QuantLinear(qweight, linear.bias.detach() if linear.bias is not None else None)
        setattr(parent, name.rsplit(".", 1)[1], layer)
        outliers += qweight.num_outliers
        weights += linear.weight.numel()
        del linear
    return len(targets), outliers, weights


def fuse_projections(model: nn.Module) -> int:
    """q/k/v and gate/up of every decoder block as one QuantLinear each; returns the groups."""
    from easyquant.nn.quant_linear import fuse_siblings

    groups = 0
    for module in model.modules():
        if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj")):
            # k/v at another width than q (--kv-bits): k/v alone
            groups += fuse_siblings(module, ("q_proj", "k_proj", "v_proj")) or fuse_siblings(
                module, ("k_proj", "v_proj")
            )
        if all(hasattr(module, name) for name in ("gate_proj", "up_proj")):
            groups += fuse_siblings(module, ("gate_proj", "up_proj"))
    return groups


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_speed(
    model: nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    use_graph: bool,
    device: str,
    profile: bool = False,
    compile_model: bool = False,
) -> dict:
    from transformers import StaticCache

    forward = model
    if compile_model:  # inductor fuses the model's elementwise work; QuantLinear is one op
        torch._dynamo.reset()
        # a decoder layer compiled on its own (after a graph break) is specialised per layer
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        forward = torch.compile(model, dynamic=False)

    length = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + new_tokens + 8)
    positions = torch.arange(length, device=device)
    logits = model(input_ids=prompt, past_key_values=cache, cache_position=positions).logits
    first = logits[:, -1:].argmax(-1)
    token = first.clone()
    position = torch.tensor([length], device=device)

    def step() -> None:
        out = forward(
            input_ids=token,
            past_key_values=cache,
            cache_position=position,
            position_ids=position.unsqueeze(0),
        ).logits
        token.copy_(out[:, -1:].argmax(-1))
        position.add_(1)

    def restart() -> None:
        token.copy_(first)
        position.fill_(length)
        # transformers >= 5.2x: each static layer counts its own length in a device tensor
        for layer in getattr(cache, "layers", ()):
            counted = getattr(layer, "cumulative_length", None)
            if isinstance(counted, torch.Tensor):
                counted.fill_(length)

    def run(steps: int, replay) -> float:
        restart()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            replay()
        sync(device)
        return time.perf_counter() - start

    def step_ms(steps: int, replay) -> list[float]:
        """Each step's wall time, synchronised (its median resists the host's hiccups, which
        moved eager totals of the same model by 20-30% between runs on the H100 machine)."""
        restart()
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            replay()
            sync(device)
            times.append(1e3 * (time.perf_counter() - begin))
        return sorted(times)

    def tokens(steps: int, replay) -> list[int]:
        restart()
        picked = []
        for _ in range(steps):
            replay()
            picked.append(int(token[0, 0]))  # the first sequence's
        return picked

    # warm-up: compiles the kernels (and, on CUDA, runs outside any graph first)
    stream = torch.cuda.Stream() if device.startswith("cuda") else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
    else:
        step()
    check = min(16, new_tokens)
    eager_seconds = run(check, step)
    eager_steps = step_ms(2 * check, step)
    eager_tokens = tokens(check, step)
    mode = "eager"
    replay = step
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
            replay = graph.replay
            mode = "cuda-graph"
        except Exception as exc:  # report, and time eagerly
            print(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); timing eagerly")
    seconds = run(new_tokens, replay)
    picked = tokens(check, replay)
    kernels = kernel_times(step, device) if profile else None
    return {
        "mode": mode,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 4),
        "batch": prompt.shape[0],
        "tokens_per_s": round(prompt.shape[0] * new_tokens / seconds, 1),  # all sequences'
        "ms_per_token": round(1e3 * seconds / new_tokens, 3),  # per decode step
        "first_tokens": picked[:8],
        "same_tokens_as_eager": picked == eager_tokens,
        "eager_ms_per_token": round(1e3 * eager_seconds / check, 3),
        # median of 2 x 16 eager steps, each timed alone (synchronised)
        "eager_step_ms_median": round(eager_steps[len(eager_steps) // 2], 3),
        **({"kernels_us_per_token": kernels} if kernels else {}),
    }


def kernel_times(step, device: str, steps: int = 8, top: int = 12) -> dict[str, float]:
    """GPU microseconds per token of each kernel (by name; the rest summed as "other"), from
    torch.profiler over eager steps: the same kernels a CUDA graph replays, without launch gaps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    totals: dict[str, float] = {}
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.device_time
        elif not cuda and event.device_type == torch.autograd.DeviceType.CPU:
            us = event.self_cpu_time_total  # CPU smoke test: host ops instead of kernels
        else:
            continue
        totals[event.name[:60]] = totals.get(event.name[:60], 0.0) + us / steps
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    out = {name: round(us, 1) for name, us in ranked[:top]}
    out["other"] = round(sum(us for _, us in ranked[top:]), 1)
    out["total"] = round(sum(totals.values()), 1)
    return out


@torch.no_grad()
def prefill_ms(model: nn.Module, tokens: int, vocab: int, device: str, graph: bool) -> float:
    """Median of 10 prefills of ``tokens`` tokens. With ``graph`` the forward is captured in a
    CUDA graph and replayed, timed by CUDA events: GPU time, as the kernel benchmarks take it
    (host-timed eager forwards varied 32-53 ms for the same fp16 model, stop 14)."""
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    model(input_ids=ids, use_cache=False)  # warm-up (and Triton's compiles)
    sync(device)
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            model(input_ids=ids, use_cache=False)
        captured.replay()
        sync(device)
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            captured.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        del captured
        torch.cuda.empty_cache()
        return sorted(times)[len(times) // 2]
    times = []
    for _ in range(10):
        begin = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        sync(device)
        times.append(1e3 * (time.perf_counter() - begin))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="a small config, for smoke tests")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=1024, help="0: skip the prefill timing")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--kv-bits", type=int, help="k_proj and v_proj at this width")
    parser.add_argument("--outliers", type=float, default=0.005)
    parser.add_argument("--no-graph", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each model's step (both models)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also GPU time per kernel per token (profiler)"
    )
    parser.add_argument("--no-fuse", action="store_true", help="skip the fused q/k/v, gate/up run")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or RESULTS))
    args = parser.parse_args()
    device = args.device
    use_graph = device.startswith("cuda") and not args.no_graph

    config = llama_config(args.tiny, args.layers)
    model = build_model(config, device)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt), device=device)
    rows = []
    fp16 = decode_speed(
        model, prompt, args.new_tokens, use_graph, device, args.profile, args.compile
    )
    fp16_prefill = (
        prefill_ms(model, args.prefill, config.vocab_size, device, use_graph) if args.prefill else 0
    )
    rows.append({"model": "fp16", **fp16, "prefill_ms": round(fp16_prefill, 2)})
    print_table(rows[-1:], list(rows[-1]))

    # n such that a Gaussian weight is an outlier with probability args.outliers (two-sided)
    sigma = float(torch.special.ndtri(torch.tensor(1.0 - args.outliers / 2, dtype=torch.float64)))
    qconfig = QuantConfig(bits=args.bits, method="rtn", outlier_sigma=sigma)
    start = time.perf_counter()
    layers, outliers, weights = quantize_blocks(model, qconfig, args.kv_bits)
    sync(device)
    quantize_s = time.perf_counter() - start
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    quant = decode_speed(
        model, prompt, args.new_tokens, use_graph, device, args.profile, args.compile
    )
    q_prefill = (
        prefill_ms(model, args.prefill, config.vocab_size, device, use_graph) if args.prefill else 0
    )
    label = f"easyquant-{args.bits}bit" + (f"-kv{args.kv_bits}" if args.kv_bits else "")
    rows.append({"model": label, **quant, "prefill_ms": round(q_prefill, 2)})
    speedup = quant["tokens_per_s"] / fp16["tokens_per_s"]
    fused_speedup = None
    if not args.no_fuse:
        groups = fuse_projections(model)
        torch.cuda.empty_cache() if device.startswith("cuda") else None
        fused = decode_speed(
            model, prompt, args.new_tokens, use_graph, device, args.profile, args.compile
        )
        f_prefill = (
            prefill_ms(model, args.prefill, config.vocab_size, device, use_graph)
            if args.prefill
            else 0
        )
        name = f"{label}-fused-qkv-gateup"
        rows.append({"model": name, **fused, "prefill_ms": round(f_prefill, 2), "groups": groups})
        fused_speedup = fused["tokens_per_s"] / fp16["tokens_per_s"]
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    print()
    print_table(rows, ["model", "mode", "tokens_per_s", "ms_per_token", "prefill_ms"])
    print(
        f"\ndecode speedup {speedup:.2f}x"
        + (f" ({fused_speedup:.2f}x fused)" if fused_speedup else "")
        + f"; {layers} QuantLinear layers, outliers "
        f"{outliers / weights:.3%} (n-sigma {sigma:.3f}), quantized in {quantize_s:.1f} s"
    )
    payload = {
        "compiled": args.compile,
        "config": {
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "layers": config.num_hidden_layers,
            "vocab": config.vocab_size,
            "prompt": args.prompt,
            "batch": args.batch,
            "prefill": args.prefill,
        },
        "quant": {
            **qconfig.to_dict(),
            "kv_bits": args.kv_bits,
            "outlier_fraction": outliers / weights,
            "layers": layers,
        },
        "rows": rows,
        "decode_speedup": round(speedup, 3),
        "decode_speedup_fused": round(fused_speedup, 3) if fused_speedup else None,
        "max_memory_GiB": memory,
    }
    for row in rows if args.profile else ():
        print(f"\n{row['model']}: GPU time per token by kernel (us)")
        for name, us in row["kernels_us_per_token"].items():
            print(f"  {us:9.1f}  {name}")
    kind = "decode-compiled" if args.compile else "decode"
    kind += f"-batch{args.batch}" if args.batch > 1 else ""
    kind += f"-kv{args.kv_bits}" if args.kv_bits else ""
    path = write_result(kind, device, payload, out_dir=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
