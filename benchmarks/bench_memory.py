"""Peak memory of `easyquant quantize` on a multi-GB safetensors checkpoint, host or GPU.

    python benchmarks/bench_memory.py [--layers 8] [--steps 5] [--dtype bfloat16] [--workdir DIR]
    python benchmarks/bench_memory.py --device cuda [--layers 8] [--steps 500]

Writes a synthetic Llama-7B-shaped checkpoint (hidden 4096, MLP 11008, vocab 32000; ``--layers``
decoder layers, heavy-tailed random weights, sharded), then quantizes it with the CLI in a child
process and reads that process's peak RSS (``VmHWM``: kept by the kernel, no sampling; Linux).
The same is measured on a tiny checkpoint: the fixed cost of Python, torch and transformers.
``--device cuda`` quantizes on the GPU (``--device cuda`` of the CLI, the fused Triton pipeline)
and reports the child's ``torch.cuda.max_memory_allocated()`` as well: only the quantized weights
go to the GPU, so it is compared with the largest of them. Without CUDA, ``--device cuda`` runs
the same structure on the CPU under the Triton interpreter (no GPU numbers; use small
``--hidden/--intermediate/--vocab``, the interpreter is slow). Prints a table and writes
benchmarks/results/<device>-<date>-memory.json. The claim under test: peak memory stays near the
largest tensor (plus quantization temporaries of about its size), not the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import print_table, write_result
from easyquant.models.safetensors_io import ShardWriter, header_reserve

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
SHARD_BYTES = 2 * 10**9
# Runs the CLI and reports the child's own peak RSS on stderr: VmHWM of /proc/self/status
# (ru_maxrss would not do: Linux carries it over fork and exec from the parent, which generated
# the checkpoint), and the peak of torch's CUDA allocator when CUDA was used.
CHILD = (
    "import sys\n"
    "import torch\n"
    "from easyquant.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "status = open('/proc/self/status').read().split('VmHWM:')[1].split()\n"
    "print('VmHWM_kib', status[0], file=sys.stderr)\n"
    "if torch.cuda.is_available() and torch.cuda.is_initialized():\n"
    "    print('cuda_peak_bytes', torch.cuda.max_memory_allocated(), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def layer_shapes(hidden: int, inter: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("input_layernorm.weight", (hidden,)),
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (hidden, hidden)),
        ("self_attn.v_proj.weight", (hidden, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
    ]


def checkpoint_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], hidden))]
    for i in range(config["num_hidden_layers"]):
        shapes += [(f"model.layers.{i}.{n}", s) for n, s in layer_shapes(hidden, inter)]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (config["vocab_size"], hidden))]
    return shapes


def synthetic_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """A CPU tensor, drawn on ``device`` (a GPU draws a 7B checkpoint in seconds, not minutes;
    the values differ from the CPU's)."""
    gen = torch.Generator(device).manual_seed(seed)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    # Student-t-like (normal / sqrt(chi-square(4)/4)), scale 0.02: heavy tails, like LLM weights.
    chi = torch.randn((4, *shape), generator=gen, device=device).pow_(2).mean(0)
    x = torch.randn(shape, generator=gen, device=device).div_(chi.sqrt_()).mul_(0.02)
    return x.to(dtype).cpu()


def write_checkpoint(
    directory: Path, config: dict, dtype: torch.dtype, device: str = "cpu"
) -> dict:
    """Write config.json and shards one tensor at a time (drawn on ``device``); return the
    layout facts."""
    from transformers import LlamaConfig

    directory.mkdir(parents=True)
    LlamaConfig(**config, dtype=dtype).save_pretrained(directory)
    shapes = checkpoint_shapes(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(directory / file, header_reserve(SHARD_BYTES))
        for name, shape in shard:
            writer.add(name, synthetic_tensor(shape, dtype, len(weight_map), device))
            weight_map[name] = file
        writer.close()
    total = sum(torch.Size(s).numel() * dtype.itemsize for _, s in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    largest = max(shapes, key=lambda item: torch.Size(item[1]).numel())
    linear = [s for n, s in shapes if ".layers." in n and len(s) == 2]
    largest_linear = max(linear, key=lambda s: torch.Size(s).numel())
    return {
        "checkpoint_bytes": total,
        "tensors": len(shapes),
        "shards": len(shards),
        "largest_tensor": largest[0],
        "largest_tensor_bytes": torch.Size(largest[1]).numel() * dtype.itemsize,
        "largest_quantized_shape": list(largest_linear),
        "largest_quantized_bytes": torch.Size(largest_linear).numel() * dtype.itemsize,
    }


def quantize_peak(
    src: Path, out: Path, steps: int, device: str, overlap: bool = True
) -> tuple[dict[str, int], float]:
    """Peaks (``rss`` bytes; ``cuda`` bytes when quantized on a GPU) and seconds of
    `easyquant quantize src --out out` in a child process."""
    args = [str(src), "--out", str(out), "--steps", str(steps), "--quiet"]
    if not overlap:
        args.append("--no-overlap")
    env = dict(os.environ)
    if device == "cuda" and torch.cuda.is_available():
        args += ["--device", "cuda"]
    elif device == "cuda":  # the same structure on the CPU: the Triton pipeline, interpreted
        args += ["--device", "cpu", "--backend", "triton"]
        env["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "quantize", *args], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"quantize failed:\n{done.stderr}")
    peaks = {}
    for line in done.stderr.splitlines():
        key, _, value = line.partition(" ")
        if key == "VmHWM_kib":
            peaks["rss"] = int(value) * 1024
        elif key == "cuda_peak_bytes":
            peaks["cuda"] = int(value)
    return peaks, seconds


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--hidden", type=int, default=LLAMA_7B["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=LLAMA_7B["intermediate_size"])
    parser.add_argument("--vocab", type=int, default=LLAMA_7B["vocab_size"])
    parser.add_argument("--workdir", help="where the checkpoint is written (default: a temp dir)")
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="quantize with --no-overlap (one tensor at a time; JSON name ...-memory-no-overlap)",
    )
    args = parser.parse_args()
    overlap = not args.no_overlap
    dtype = getattr(torch, args.dtype)
    gpu = args.device == "cuda" and torch.cuda.is_available()
    if args.device == "cuda" and not gpu:
        print("no CUDA: --device cuda runs on the CPU under the Triton interpreter (no GPU peak)")
    work = Path(tempfile.mkdtemp(prefix="easyquant-mem-", dir=args.workdir))
    try:
        config = {
            **LLAMA_7B,
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "vocab_size": args.vocab,
            "num_hidden_layers": args.layers,
        }
        print(f"writing a {args.layers}-layer Llama-shaped {args.dtype} checkpoint in {work} ...")
        start = time.perf_counter()
        layout = write_checkpoint(work / "src", config, dtype, "cuda" if gpu else "cpu")
        print(f"  {layout['checkpoint_bytes'] / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
        tiny = {
            **config,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 128,
            "num_hidden_layers": 1,
        }
        write_checkpoint(work / "tiny", tiny, dtype)
        baseline, _ = quantize_peak(
            work / "tiny", work / "tiny-q", args.steps, args.device, overlap
        )
        peaks, seconds = quantize_peak(work / "src", work / "q", args.steps, args.device, overlap)
        out_bytes = dir_bytes(work / "q")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    largest, largest_q = layout["largest_tensor_bytes"], layout["largest_quantized_bytes"]
    excess = peaks["rss"] - baseline["rss"]
    ratios = {
        "rss_excess_over_largest_tensor": round(excess / largest, 2),
        "rss_excess_over_largest_quantized": round(excess / largest_q, 2),
    }
    gb = 1e9
    rows = [
        {"what": "checkpoint on disk", "GB": round(layout["checkpoint_bytes"] / gb, 3)},
        {
            "what": f"largest tensor ({layout['largest_tensor']})",
            "GB": round(largest / gb, 3),
        },
        {
            "what": f"largest quantized weight {layout['largest_quantized_shape']}",
            "GB": round(largest_q / gb, 3),
        },
        {"what": "peak RSS, quantizing the checkpoint", "GB": round(peaks["rss"] / gb, 3)},
        {
            "what": "peak RSS, same command on a tiny checkpoint",
            "GB": round(baseline["rss"] / gb, 3),
        },
        {
            "what": "peak RSS above that baseline",
            "GB": round(excess / gb, 3),
            "x largest tensor": ratios["rss_excess_over_largest_tensor"],
            "x largest quantized": ratios["rss_excess_over_largest_quantized"],
        },
    ]
    if "cuda" in peaks:
        # Only quantized weights go to the GPU: the largest of them is the reference size.
        ratios["cuda_peak_over_largest_quantized"] = round(peaks["cuda"] / largest_q, 2)
        rows.append(
            {
                "what": "peak GPU memory allocated (torch), quantizing",
                "GB": round(peaks["cuda"] / gb, 3),
                "x largest tensor": round(peaks["cuda"] / largest, 2),
                "x largest quantized": ratios["cuda_peak_over_largest_quantized"],
            }
        )
    rows.append({"what": "quantized output on disk", "GB": round(out_bytes / gb, 3)})
    print()
    print_table(rows, ["what", "GB", "x largest tensor", "x largest quantized"])
    where = "GPU" if gpu else f"{os.cpu_count()} CPU(s)"
    if args.device == "cuda" and not gpu:
        where += ", Triton interpreter"
    print(f"\nquantize: {seconds:.0f} s ({args.steps} Adam steps), {where}")
    payload = {
        "layers": args.layers,
        "steps": args.steps,
        "dtype": args.dtype,
        "overlap": overlap,
        "quantize_device": args.device if gpu or args.device == "cpu" else "cpu (interpreted)",
        **layout,
        "peak_rss_bytes": peaks["rss"],
        "baseline_peak_rss_bytes": baseline["rss"],
        "peak_cuda_bytes": peaks.get("cuda"),
        "baseline_peak_cuda_bytes": baseline.get("cuda"),
        **ratios,
        "output_bytes": out_bytes,
        "quantize_seconds": round(seconds, 1),
        "rows": rows,
    }
    # The interpreted structure check is no measurement of either device: a file of its own.
    kind = "memory" if gpu or args.device == "cpu" else "memory-interpreted"
    kind += "" if overlap else "-no-overlap"
    path = write_result(kind, "cuda" if gpu else "cpu", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
