"""The paper's analyses (Sections 3 and 5) on SmolLM2-135M, as PNG figures and markdown tables.

Weight-only analyses (seconds, no text):
- ``outliers``: fraction of weights beyond 3 sigma (per tensor) per module type and per layer
  (the paper's Tables 7-8);
- ``range``: one module's quantization range (mean over channels) and reconstruction error over
  the Adam steps (Table 9).
Perplexity analyses (``--ppl``; WikiText-2 test, the first ``--windows`` 2048-token windows):
- ``sigma``: perplexity and bits per weight vs the n-sigma threshold, 4-bit per channel (Table 1);
- ``zeroing``: perplexity after zeroing 1% of the weights of each decoder Linear, chosen by
  magnitude band (the largest 1%, then the next bands; Table 6);
- ``steps``: reconstruction error and perplexity over optimisation steps, with and without
  outlier isolation (Fig. 2 / Table 5).

Full precision is the float32 weights transformers dequantizes from the Q4_1 GGUF.
Outputs: ``benchmarks/results/analysis-*.png`` and ``benchmarks/results/analyses.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RESULTS, environment
from easyquant import QuantConfig, quantize_tensor
from easyquant.algorithm.outliers import outlier_mask
from easyquant.evaluation.loader import load_model
from easyquant.evaluation.perplexity import perplexity, read_text, tokenize
from easyquant.models.select import Selection

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
MODULE = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    selection = Selection()
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and selection.wants(name, tuple(m.weight.shape))
    ]


def outlier_tables(linears: list[tuple[str, nn.Linear]], sigma: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_type: dict[str, list[float]] = {}
    per_layer: dict[int, list[float]] = {}
    for name, linear in linears:
        match = MODULE.search(name)
        if not match:
            continue
        layer, kind = int(match.group(1)), match.group(3)
        fraction = float(outlier_mask(linear.weight.detach(), sigma).float().mean())
        per_type.setdefault(kind, []).append(fraction)
        per_layer.setdefault(layer, []).append(fraction)
    lines = [
        f"## Outlier fraction at {sigma:g} sigma (per tensor), by module type (Table 7)",
        "",
        "| module | mean % | min % | max % |",
        "| --- | --- | --- | --- |",
    ]
    for kind, values in per_type.items():
        mean = 100 * sum(values) / len(values)
        lines.append(f"| {kind} | {mean:.3f} | {100 * min(values):.3f} | {100 * max(values):.3f} |")
    lines += [
        "",
        "## Outlier fraction by layer (Table 8)",
        "",
        "| layer | mean % |",
        "| --- | --- |",
    ]
    for layer, values in sorted(per_layer.items()):
        lines.append(f"| {layer} | {100 * sum(values) / len(values):.3f} |")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    axes[0].bar(list(per_type), [100 * sum(v) / len(v) for v in per_type.values()])
    axes[0].set_ylabel("outliers (%)")
    axes[0].set_title(f"by module type ({sigma:g} sigma)")
    layers = sorted(per_layer)
    axes[1].plot(layers, [100 * sum(per_layer[i]) / len(per_layer[i]) for i in layers], "o-")
    axes[1].set_xlabel("layer")
    axes[1].set_title("by layer")
    fig.tight_layout()
    fig.savefig(RESULTS / "analysis-outliers.png", dpi=120)
    plt.close(fig)
    return lines


def range_over_steps(name: str, weight: torch.Tensor, steps: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: list[tuple[int, float, float]] = []

    def trace(step: int, scale: torch.Tensor, loss: torch.Tensor) -> None:
        series.append((step, float(scale.mean()) * 7, float(loss.sum())))

    quantize_tensor(weight, QuantConfig.paper(steps=steps), backend="torch", trace=trace)
    norm = float(weight.float().pow(2).sum())
    lines = [
        f"## Range of `{name}` over Adam steps (Table 9; 4-bit, 3 sigma, per channel)",
        "",
        "Range = 7 x scale, mean over channels; error = ||Q(W) - W||^2 / ||W||^2 (non-outliers).",
        "",
        "| step | mean range | relative error |",
        "| --- | --- | --- |",
    ]
    marks = {0, 1, 5, 10, 20, 50, 100, 200, steps}
    for step, rng, loss in series:
        if step in marks:
            lines.append(f"| {step} | {rng:.5f} | {loss / norm:.6f} |")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _, _ in series], [r for _, r, _ in series], label="mean range")
    ax2 = ax.twinx()
    ax2.plot([s for s, _, _ in series], [e / norm for _, _, e in series], "r", label="error")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("mean range")
    ax2.set_ylabel("relative error", color="r")
    ax.set_title(name)
    fig.tight_layout()
    fig.savefig(RESULTS / "analysis-range.png", dpi=120)
    plt.close(fig)
    return lines


def replace_weights(linears, weights) -> None:  # type: ignore[no-untyped-def]
    for (_, linear), w in zip(linears, weights, strict=True):
        linear.weight.data.copy_(w)


def ppl_analyses(model, linears, ids, windows: int, which: set[str]) -> list[str]:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original = [linear.weight.detach().clone() for _, linear in linears]
    total = sum(w.numel() for w in original)

    def ppl() -> float:
        return perplexity(model, ids, 2048, windows).ppl

    lines: list[str] = []
    if "sigma" in which:
        rows = []
        for sigma in (None, 4.0, 3.5, 3.0, 2.5, 2.0):
            qs = [quantize_tensor(w, QuantConfig.paper(outlier_sigma=sigma)) for w in original]
            replace_weights(linears, [q.dequantize() for q in qs])
            bpw = sum(q.bits_per_weight * w.numel() for q, w in zip(qs, original, strict=True))
            rows.append((sigma, ppl(), bpw / total))
            replace_weights(linears, original)
        lines += ["## Perplexity vs sigma (Table 1; 4-bit per channel, Adam 500)", ""]
        lines += ["| sigma | ppl | bits/weight |", "| --- | --- | --- |"]
        lines += [f"| {s or 'none'} | {p:.2f} | {b:.3f} |" for s, p, b in rows]
        lines.append("")
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([b for _, _, b in rows], [p for _, p, _ in rows], "o-")
        for s, p, b in rows:
            ax.annotate(str(s or "none"), (b, p))
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("ppl")
        fig.tight_layout()
        fig.savefig(RESULTS / "analysis-sigma.png", dpi=120)
        plt.close(fig)
    if "zeroing" in which:
        rows = []
        for band in range(0, 5):
            zeroed = []
            for w in original:
                flat = w.abs().flatten()
                count = max(1, flat.numel() // 100)
                order = torch.argsort(flat, descending=True)[band * count : (band + 1) * count]
                z = w.clone().flatten()
                z[order] = 0
                zeroed.append(z.reshape(w.shape))
            replace_weights(linears, zeroed)
            rows.append((band, ppl()))
            replace_weights(linears, original)
        lines += ["## Zeroing 1% of each weight by magnitude band (Table 6)", ""]
        lines += ["| band (largest first) | ppl |", "| --- | --- |"]
        lines += [f"| top {b}-{b + 1}% | {p:.2f} |" for b, p in rows]
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sigma", type=float, default=3.0)
    parser.add_argument("--module", default="model.layers.0.mlp.down_proj")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--ppl", nargs="*", default=[], choices=("sigma", "zeroing"))
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from easyquant.models.gguf_source import default_model_path

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    loaded = load_model(default_model_path())
    linears = decoder_linears(loaded.model)
    env = environment("cpu")
    lines = [
        "# The paper's analyses on SmolLM2-135M-Instruct",
        "",
        f"Device: {env['device']}; commit {env['commit']}; {env['date']}; `{env['command']}`. "
        "Full precision = the float32 weights dequantized from the Q4_1 GGUF.",
        "",
    ]
    lines += [*outlier_tables(linears, args.sigma), ""]
    weight = dict(linears)[args.module].weight.detach()
    lines += [*range_over_steps(args.module, weight, args.steps), ""]
    if args.ppl:
        ids = tokenize(loaded.tokenizer, read_text(WIKITEXT))
        lines += [f"Perplexity: WikiText-2 test, first {args.windows} windows of 2048 tokens.", ""]
        lines += ppl_analyses(loaded.model, linears, ids, args.windows, set(args.ppl))
    (RESULTS / "analyses.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
