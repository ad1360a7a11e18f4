"""Peak host memory of `easyquant quantize` on a multi-GB safetensors checkpoint.

    python benchmarks/bench_memory.py [--layers 8] [--steps 5] [--dtype bfloat16] [--workdir DIR]

Writes a synthetic Llama-7B-shaped checkpoint (hidden 4096, MLP 11008, vocab 32000; ``--layers``
decoder layers, heavy-tailed random weights, sharded), then quantizes it with the CLI in a child
process and reads that process's peak RSS (``VmHWM``: kept by the kernel, no sampling; Linux).
The same is measured on a tiny checkpoint: the fixed cost of Python, torch and transformers.
Prints a table and writes benchmarks/results/<device>-<date>-memory.json. The claim under test:
peak memory stays near the largest tensor (plus quantization temporaries), not the checkpoint size.
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
from easyquant.models.safetensors_io import ShardWriter

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
# Runs the CLI and reports the child's own peak RSS on its last stderr line: VmHWM of
# /proc/self/status (ru_maxrss would not do: Linux carries it over fork and exec from the parent,
# which generated the checkpoint).
CHILD = (
    "import sys\n"
    "from easyquant.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "status = open('/proc/self/status').read().split('VmHWM:')[1].split()\n"
    "print('VmHWM_kib', status[0], file=sys.stderr)\n"
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


def synthetic_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    # Student-t-like (normal / sqrt(chi-square(4)/4)), scale 0.02: heavy tails, like LLM weights.
    chi = torch.randn((4, *shape), generator=gen).pow_(2).mean(0)
    return torch.randn(shape, generator=gen).div_(chi.sqrt_()).mul_(0.02).to(dtype)


def write_checkpoint(directory: Path, config: dict, dtype: torch.dtype) -> dict:
    """Write config.json and shards one tensor at a time; return the layout facts."""
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
        writer = ShardWriter(directory / file)
        for name, shape in shard:
            writer.add(name, synthetic_tensor(shape, dtype, seed=len(weight_map)))
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


def quantize_peak(src: Path, out: Path, steps: int) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of `easyquant quantize src --out out` in a child process."""
    args = [str(src), "--out", str(out), "--steps", str(steps), "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "quantize", *args], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"quantize failed:\n{done.stderr}")
    kib = int(done.stderr.strip().splitlines()[-1].split()[1])
    return kib * 1024, seconds


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--workdir", help="where the checkpoint is written (default: a temp dir)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="easyquant-mem-", dir=args.workdir))
    try:
        config = {**LLAMA_7B, "num_hidden_layers": args.layers}
        print(
            f"writing a {args.layers}-layer Llama-7B-shaped {args.dtype} checkpoint in {work} ..."
        )
        start = time.perf_counter()
        layout = write_checkpoint(work / "src", config, dtype)
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
        baseline, _ = quantize_peak(work / "tiny", work / "tiny-q", args.steps)
        peak, seconds = quantize_peak(work / "src", work / "q", args.steps)
        out_bytes = dir_bytes(work / "q")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = 1e9
    rows = [
        {"what": "checkpoint on disk", "GB": round(layout["checkpoint_bytes"] / gb, 3)},
        {
            "what": f"largest tensor ({layout['largest_tensor']})",
            "GB": round(layout["largest_tensor_bytes"] / gb, 3),
        },
        {
            "what": f"largest quantized weight {layout['largest_quantized_shape']}",
            "GB": round(layout["largest_quantized_bytes"] / gb, 3),
        },
        {"what": "peak RSS, quantizing the checkpoint", "GB": round(peak / gb, 3)},
        {"what": "peak RSS, same command on a tiny checkpoint", "GB": round(baseline / gb, 3)},
        {"what": "peak RSS above that baseline", "GB": round((peak - baseline) / gb, 3)},
        {"what": "quantized output on disk", "GB": round(out_bytes / gb, 3)},
    ]
    print()
    print_table(rows, ["what", "GB"])
    print(f"\nquantize: {seconds:.0f} s ({args.steps} Adam steps), {os.cpu_count()} CPU(s)")
    payload = {
        "layers": args.layers,
        "steps": args.steps,
        "dtype": args.dtype,
        **layout,
        "peak_rss_bytes": peak,
        "baseline_peak_rss_bytes": baseline,
        "output_bytes": out_bytes,
        "quantize_seconds": round(seconds, 1),
        "rows": rows,
    }
    path = write_result("memory", "cpu", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
