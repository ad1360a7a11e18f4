"""PIQA zero-shot accuracy through lm-evaluation-harness: full precision, RTN and EasyQuant 4-bit.

    cd benchmarks && ../.venv/bin/python piqa_lm_eval.py [--limit N] [--batch-size 16]
        [--models fp rtn easyquant] [--work-dir /tmp/easyquant-piqa] [--device cpu] [--reuse]

The model is the default one, SmolLM2-135M-Instruct as GGUF. Its weights were Q4_1
block-quantized upstream; loaded as float32 they are the full-precision reference here, and
both quantized models are made from those same float32 weights:
- ``fp``: the GGUF file itself (lm-eval's ``gguf_file`` model argument, float32);
- ``rtn``: ``QuantConfig(bits=4, method="rtn", outlier_sigma=None)``, per output channel;
- ``easyquant``: ``QuantConfig(bits=4)``, the paper's recipe (per channel, n = 3, 500 Adam steps).
Default selection for both: every Linear of the decoder blocks (embeddings and lm_head stay).

Each model is evaluated by ``python -m easyquant.commands.lm_eval`` (the ``easyquant lm-eval``
entry point) on the ``piqa_local`` task (../shared/data/piqa/, 1,838 validation questions;
``--limit N`` takes the first N). Quantized directories are kept in ``--work-dir`` and reused;
``--reuse`` also takes lm-eval's results from an earlier run there (each row then says so, and
keeps lm-eval's own record of that run: its config, date and evaluation time).
Writes benchmarks/results/piqa-lm-eval.json and .md (device, versions, commit, command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import RESULTS, environment, print_table
from easyquant import QuantConfig
from easyquant.models.gguf_source import default_model_path

TASK = "piqa_local"
CONFIGS = {
    "rtn": QuantConfig(bits=4, method="rtn", outlier_sigma=None),
    "easyquant": QuantConfig(bits=4),
}
QUESTIONS = 1838


def quantized_dir(name: str, work_dir: Path) -> tuple[Path, float | None]:
    """The quantized model directory for ``name`` (made now if missing) and the seconds it took."""
    from easyquant.models import quantize_model

    out = work_dir / f"smollm2-135m-{name}-4bit"
    if out.is_dir():
        return out, None
    start = time.perf_counter()
    quantize_model(default_model_path(), CONFIGS[name], out, log=None)
    return out, time.perf_counter() - start


def model_args(name: str, work_dir: Path) -> tuple[str, dict[str, Any]]:
    if name == "fp":
        gguf = default_model_path()
        return f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32", {}
    path, seconds = quantized_dir(name, work_dir)
    report = json.loads((path / "quant_report.json").read_text())
    if report["config"] != CONFIGS[name].to_dict():
        raise SystemExit(f"{path} was made with another config: remove it to remake it")
    totals = report["totals"]
    info: dict[str, Any] = {
        "bits_per_weight": round(totals["bits_per_weight"], 3),
        "outlier_fraction": round(totals["outlier_fraction"], 5),
        "weight_error": round(totals["error"], 5),  # ||W_q - W||^2 / ||W||^2, decoder Linears
        "config": CONFIGS[name].to_dict(),
        "model_dir": str(path),
        "quantize_seconds": round(totals["quantize_seconds"], 1),
    }
    if seconds is None:
        info["quantize_note"] = "directory made by an earlier run (reused)"
    return f"pretrained={path},dtype=float32", info


def latest_results(out_dir: Path) -> dict[str, Any] | None:
    files = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def run_lm_eval(
    name: str, args_string: str, args: argparse.Namespace, out_dir: Path
) -> tuple[dict[str, Any], list[str], bool]:
    """lm-eval's results for one model, its command, and whether an earlier run's were reused."""
    command = [
        sys.executable,
        "-m",
        "easyquant.commands.lm_eval",
        "--model",
        "hf",
        "--model_args",
        args_string,
        "--tasks",
        TASK,
        "--device",
        args.device,
        "--batch_size",
        str(args.batch_size),
        "--output_path",
        str(out_dir),
    ]
    if args.limit:
        command += ["--limit", str(args.limit)]
    if args.reuse and (earlier := latest_results(out_dir)) is not None:
        return earlier, command, True
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(out_dir / "log.txt", "w") as log:  # lm-eval's progress, readable while it runs
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"lm-eval failed for {name} (log: {out_dir / 'log.txt'})")
    results = latest_results(out_dir)
    if results is None:
        raise SystemExit(f"lm-eval wrote no results for {name} (log: {out_dir / 'log.txt'})")
    return results, command, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fp", "rtn", "easyquant"])
    parser.add_argument("--limit", type=int, default=None, help="first N questions (default all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/easyquant-piqa"))
    parser.add_argument("--out", type=Path, default=RESULTS / "piqa-lm-eval.json")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take lm-eval's results from an earlier run in --work-dir where there is one",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.models) - {"fp", *CONFIGS})
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from fp, {', '.join(CONFIGS)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in args.models:
        args_string, info = model_args(name, args.work_dir)
        out_dir = args.work_dir / f"lm-eval-{name}-{args.limit or 'all'}"
        out_dir.mkdir(exist_ok=True)
        results, command, reused = run_lm_eval(name, args_string, args, out_dir)
        metrics = results["results"][TASK]
        samples = results["n-samples"][TASK]["effective"]
        seconds = float(results["total_evaluation_time_seconds"])  # lm-eval's own measure
        rows.append(
            {
                "model": name,
                "acc": round(metrics["acc,none"], 4),
                "acc_stderr": round(metrics["acc_stderr,none"], 4),
                "acc_norm": round(metrics["acc_norm,none"], 4),
                "acc_norm_stderr": round(metrics["acc_norm_stderr,none"], 4),
                "questions": samples,
                "eval_seconds": round(seconds, 1),
                **info,
                "lm_eval_command": " ".join(command[1:]),
                "lm_eval_config": results["config"],  # as lm-eval recorded the run
                "lm_eval_date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results["date"])),
                "reused": reused,
            }
        )
        print(
            f"{name}: acc {metrics['acc,none']:.4f}  acc_norm {metrics['acc_norm,none']:.4f}  "
            f"({samples} questions, {seconds:.0f} s)",
            flush=True,
        )

    import lm_eval

    env = environment(args.device)
    env["versions"]["lm_eval"] = lm_eval.__version__
    payload = {
        **env,
        "task": TASK,
        "data": "../shared/data/piqa/dev.jsonl + dev-labels.lst (PIQA validation)",
        "questions": args.limit or QUESTIONS,
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 upstream, loaded as float32 = reference)",
        "note": "fp: the GGUF weights dequantized to float32, which were Q4_1 block-quantized "
        "upstream; rtn and easyquant are made from those float32 weights. Zero-shot, lm-eval's "
        "piqa prompt; stderr as lm-eval reports it.",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    columns = [
        "model",
        "acc",
        "acc_stderr",
        "acc_norm",
        "acc_norm_stderr",
        "questions",
        "bits_per_weight",
        "weight_error",
        "eval_seconds",
    ]
    print_table(rows, columns)
    table = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    table += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    args.out.with_suffix(".md").write_text(
        f"# PIQA through lm-eval: {payload['model']}\n\n"
        f"{payload['note']}\n\n"
        f"Questions: {'the first ' + str(args.limit) + ' of ' if args.limit else 'all '}"
        f"{QUESTIONS} (PIQA validation). eval_seconds: lm-eval's own measure, on whatever else "
        "the machine was running: not a speed benchmark.\n\n"
        f"Device: {env['device']}; commit {env['commit']}; {env['date']}; versions "
        f"{json.dumps(env['versions'])}.\n\nCommand: `{env['command']}`\n\n"
        + "\n".join(table)
        + "\n\nlm-eval runs (python ...):\n\n"
        + "".join(
            f"- {r['model']}: `{r['lm_eval_command']}` (run of {r['lm_eval_date']}"
            f"{', reused by --reuse' if r['reused'] else ''})\n"
            for r in rows
        )
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
