"""One process against N (torchrun) quantizing the same safetensors checkpoint.

    python benchmarks/bench_distributed.py [--device cuda] [--nproc 2] [--layers 8] [--steps 500]
    python benchmarks/bench_distributed.py --device cpu --nproc 2 --layers 2 --steps 5 \\
        --hidden 256 --intermediate 688 --vocab 1024 --out-dir /tmp   # a quick check

Writes the synthetic Llama-7B-shaped checkpoint of bench_memory.py (``--layers`` decoder layers;
``--hidden/--intermediate/--vocab`` shrink it), then times ``easyquant quantize`` in one process
and under ``torchrun --standalone --nproc-per-node N`` (GPU: one GPU per process, cuda:LOCAL_RANK;
CPU: the cores split between the processes), each from the command line to the finished
directory, and checks that every output holds the same tensors bit for bit. ``--runs`` picks
the runs (default ``1 N``), e.g. ``1 1:no-overlap N N:nccl N:no-overlap``; speedups are
against the first. The checkpoint is read from the page cache in every run (just written).
``in-run s`` is rank 0's ``wall_seconds`` (quant_report.json: from opening the input, which
imports transformers, to writing the report; no interpreter start-up), ``open s`` and ``pass s``
rank 0's time to open and plan and its pass over its tensors; ``read s`` and ``write s`` are the
time spent reading the input and writing shards, summed over ranks.
With a fast quantizer (GPU) the run is mostly reading and writing the checkpoint, so the
speedup depends on the disk as much as on the GPUs. Prints a table and writes
benchmarks/results/<device>-<date>-distributed.json.
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
from safetensors import safe_open

from bench_memory import LLAMA_7B, write_checkpoint
from benchlib import RESULTS, print_table, write_result

SRC = Path(__file__).resolve().parents[1] / "src"


def child_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NCCL_NVLS_ENABLE": "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def quantize(
    src: Path, out: Path, run: str, args: argparse.Namespace, threads: int
) -> tuple[float, dict]:
    """Seconds of the whole command, and the run's quant_report totals. ``run``: processes,
    then ``:`` options (``no-overlap``, ``gloo``/``nccl``), as in ``--runs``."""
    nproc, *flags = run.split(":")
    nproc = int(nproc)
    options = ["--steps", str(args.steps), "--device", args.device, "--backend", args.backend]
    for flag in flags:
        options += ["--no-overlap"] if flag == "no-overlap" else ["--dist-backend", flag]
    command = [str(src), "--out", str(out), *options, "--quiet"]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    start = time.perf_counter()
    done = subprocess.run(
        [*launcher, "-m", "easyquant", "quantize", *command],
        capture_output=True,
        text=True,
        env=child_env(threads),
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"quantize with {nproc} process(es) failed:\n{done.stderr[-4000:]}")
    return seconds, json.loads((out / "quant_report.json").read_text())["totals"]


def rank0(totals: dict, key: str) -> float:
    """Rank 0's own figure (a run's totals sum some over ranks); NaN if not reported."""
    own = totals.get("rank_times", [totals])[0]
    return own.get(key, float("nan"))


def tensor_files(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        path = directory / "model.safetensors"
        with safe_open(str(path), framework="pt") as f:
            return dict.fromkeys(f.keys(), path)
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: directory / file for name, file in weight_map.items()}


def same_tensors(a: Path, b: Path) -> bool:
    """Both directories hold the same tensors, bit for bit (read one at a time)."""
    files_a, files_b = tensor_files(a), tensor_files(b)
    if files_a.keys() != files_b.keys():
        return False
    for name in files_a:
        with safe_open(str(files_a[name]), "pt") as fa, safe_open(str(files_b[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or not torch.equal(x, y):
            print(f"differs: {name}")
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nproc", type=int, help="processes (default: the GPUs, or 2 on CPU)")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["1", "N"],
        help="runs to time, the first is the reference: processes (N: --nproc) and options after "
        "':', e.g. 1 1:no-overlap N N:nccl N:no-overlap",
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--hidden", type=int, default=LLAMA_7B["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=LLAMA_7B["intermediate_size"])
    parser.add_argument("--vocab", type=int, default=LLAMA_7B["vocab_size"])
    parser.add_argument(
        "--warmup", action="store_true", help="run the first run once, untimed, before timing"
    )
    parser.add_argument("--workdir", help="where the checkpoint is written (default: a temp dir)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument(
        "--name", default="distributed", help="the JSON's name: <device>-<date>-NAME"
    )
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    nproc = args.nproc or (torch.cuda.device_count() if gpu else 2)
    if nproc < 2 and any(run.startswith("N") for run in args.runs):
        raise SystemExit(f"needs at least 2 processes (GPUs visible: {torch.cuda.device_count()})")
    # CPU threads in all: the one process gets them all, each of N processes its share
    cores = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    heads = max(1, args.hidden // 128)
    config = {
        **LLAMA_7B,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "vocab_size": args.vocab,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_hidden_layers": args.layers,
    }
    work = Path(tempfile.mkdtemp(prefix="easyquant-dist-", dir=args.workdir))
    try:
        print(f"writing a {args.layers}-layer {args.dtype} checkpoint in {work} ...")
        draw = "cuda" if gpu else "cpu"
        layout = write_checkpoint(work / "src", config, getattr(torch, args.dtype), draw)
        print(f"  {layout['checkpoint_bytes'] / 1e9:.2f} GB")
        runs = [
            run.replace("N", str(nproc), 1) if run.startswith("N") else run for run in args.runs
        ]
        if args.warmup:  # Triton compiles the range-search kernels on a machine's first run
            quantize(work / "src", work / "warmup", runs[0], args, cores)
            shutil.rmtree(work / "warmup")
        timed: list[tuple[str, float, dict]] = []
        identical = True
        for i, run in enumerate(runs):
            n = int(run.split(":")[0])
            out = work / f"q{i}"
            seconds, totals = quantize(work / "src", out, run, args, max(1, cores // n))
            timed.append((run, seconds, totals))
            print(f"  {run}: {seconds:.2f} s", flush=True)
            if i:
                identical &= same_tensors(work / "q0", out)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _, ref_s, ref = timed[0]
    rows = [
        {
            "run": run,
            "command s": round(s, 2),
            "in-run s": round(t["wall_seconds"], 2),
            "quantize s (sum)": round(t["quantize_seconds"], 2),
            "open s": round(rank0(t, "open_seconds"), 2),
            "pass s": round(rank0(t, "pass_seconds"), 2),
            "read s (sum)": round(t.get("read_seconds", float("nan")), 2),
            "write s (sum)": round(t.get("write_seconds", float("nan")), 2),
            "speedup (command)": round(ref_s / s, 2),
            "speedup (in-run)": round(ref["wall_seconds"] / t["wall_seconds"], 2),
        }
        for run, s, t in timed
    ]
    print()
    print_table(rows, list(rows[0]))
    print(
        f"\n{args.steps} Adam steps, {args.device}, {ref['quantized_parameters']:,} parameters "
        f"quantized; every output bit-identical to the first run's: {identical}"
    )
    payload = {
        "layers": args.layers,
        "steps": args.steps,
        "dtype": args.dtype,
        "backend": args.backend,
        "nproc": nproc,
        "warmup": args.warmup,
        "config": {k: config[k] for k in ("hidden_size", "intermediate_size", "vocab_size")},
        **layout,
        "bit_identical": identical,
        "rows": rows,
        "totals": {run: t for run, _, t in timed},
    }
    path = write_result(args.name, args.device, payload, out_dir=args.out_dir)
    print(f"wrote {path}")
    if not identical:
        raise SystemExit("the outputs differ")


if __name__ == "__main__":
    main()
