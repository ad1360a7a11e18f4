"""Fake-quantization experiments beyond the library's options, on SmolLM2 (CPU is enough).

    python benchmarks/grid_experiments.py '[{"bits": 4, "sigma": 3.0, "grid": "nf0"}]' \\
        [--windows 8] [--first 100] [--out benchmarks/results/grid-experiments.jsonl]

Each setting (a JSON list of dicts) quantizes every decoder Linear weight of SmolLM2-135M-Instruct
in plain torch (outliers kept exactly, fp16; one Adam search per range over the non-outliers,
as the library does), writes the dequantized weights back and measures WikiText-2 perplexity on
``--windows`` 2048-token windows from window ``--first`` (default: the dev windows 100-107 of
benchmarks/quality_sweep.py). It appends one JSON line per setting to ``--out``. Keys:

- ``bits``, ``sigma`` (n-sigma per tensor), ``steps`` (50), ``lr`` (3e-3, relative), ``group``
  (ranges per group of that many columns; a short last group per row, as the library has);
- ``grid``: ``int`` (the library's signed integers), ``half`` (16 symmetric levels at
  +-0.5..7.5, no zero), ``nf0`` (normal quantiles with an exact zero, NF4-like), ``powP``
  (integers companded as sign(u)|u|^P); ``asym``: a per-range offset as well as the scale;
- ``wloss``: weight each column's error by a data-free estimate of its input's size, to this
  power (RMSNorm gamma^2 for q/k/v and gate/up; the value rows' norms for o_proj; E[silu(g)^2]
  times the up rows' norms for down_proj, for isotropic normalised inputs);
  ``wsel``: pick the same number of outliers by that weighted deviation instead;
- ``statblock``: n-sigma statistics per block of that many columns (ranges stay per channel);
- ``rotate``: quantize ``W R`` instead of ``W`` and use ``Q(W R) R^T``, ``R`` an orthogonal
  rotation of the input columns (random signs, then a normalised Hadamard transform in blocks of
  that many columns, a power of two; ``"max"``: the largest power of two dividing the width;
  ``"dense"``: a random orthogonal matrix as wide as the input, the unattainable ideal). Serving
  it would rotate each input the same way (x R), as QuaRot/QuIP# do; no data is used.

- ``grid: "lloyd"``: each tensor's own 16 levels, Lloyd's 1-D k-means of its non-outlier
  weights in units of each row's absmax scale, from the ``nf0`` levels (``lloyd_iters``, 30);
  then the range search as for the other grids.
- ``lpow``: the range search minimises the sum of |error|^lpow (2: the paper's squared
  error; larger penalises the clipped weights' large errors more, so ranges shrink less).

- ``downstream``: a list of ``"v"``, ``"up"``, ``"gate"``: those weights are rounded by GPTQ over
  their output rows, with the next layer's Gram matrix as the Hessian (o_proj for v_proj,
  down_proj for up/gate, scaled by data-free estimates of the gate's effect); ``damp`` (0.01).
  A data-free "the next layer cancels my error" scheme; per-channel ranges only.

Bits per weight are counted as the library stores them (codes, fp16 scales (and offsets),
16-bit index + 16-bit value per outlier, int32 row pointers). The library's own settings are
swept by benchmarks/quality_sweep.py; this script is for ideas that would need a new format or
kernel first, so that they are measured before they are built.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchlib import environment
from easyquant.evaluation.loader import load_model
from easyquant.evaluation.perplexity import perplexity, read_text, tokenize
from easyquant.models.gguf_source import default_model_path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
ADAM_BETAS = (0.9, 0.999)


def silu_square_mean(spread: torch.Tensor) -> torch.Tensor:
    """E[silu(g)^2] for g ~ N(0, spread^2), per entry (Gauss-Hermite, 64 points)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    g = spread.double()[:, None] * torch.tensor(nodes, dtype=torch.float64)[None, :]
    w = torch.tensor(weights, dtype=torch.float64) / math.sqrt(2 * math.pi)
    return ((g * torch.sigmoid(g)) ** 2 * w).sum(1).float()


def column_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Data-free size estimate of each decoder Linear's input columns (isotropic x / rms(x))."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    repeat = cfg.num_attention_heads // cfg.num_key_value_heads
    out = {}
    for i, layer in enumerate(model.model.layers):
        attn_gamma = layer.input_layernorm.weight.detach().float()
        mlp_gamma = layer.post_attention_layernorm.weight.detach().float()
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            out[f"model.layers.{i}.self_attn.{name}"] = attn_gamma**2
        for name in ("gate_proj", "up_proj"):
            out[f"model.layers.{i}.mlp.{name}"] = mlp_gamma**2
        value = (attn.v_proj.weight.detach().float() * attn_gamma).pow(2).sum(1)
        per_head = value.reshape(-1, head_dim).repeat_interleave(repeat, dim=0).reshape(-1)
        out[f"model.layers.{i}.self_attn.o_proj"] = per_head
        gate = (mlp.gate_proj.weight.detach().float() * mlp_gamma).pow(2).sum(1).sqrt()
        up = (mlp.up_proj.weight.detach().float() * mlp_gamma).pow(2).sum(1)
        out[f"model.layers.{i}.mlp.down_proj"] = silu_square_mean(gate) * up
    return out


def grid_levels(kind: str, bits: int) -> torch.Tensor:
    """The grid's levels in units of the scale, ascending."""
    n = 1 << bits
    ints = torch.arange(-(n // 2), n // 2, dtype=torch.float64)
    if kind == "int":
        levels = ints
    elif kind == "half":
        levels = ints + 0.5
    elif kind == "nf0":  # NF4's construction: normal quantiles, 8 positive, 7 negative, zero
        top = torch.special.ndtri(torch.tensor(0.9677, dtype=torch.float64))
        pos = torch.special.ndtri(torch.linspace(0.5, 0.9677, n // 2 + 1, dtype=torch.float64))
        neg = -torch.special.ndtri(torch.linspace(0.5, 0.9677, n // 2, dtype=torch.float64))
        levels = torch.cat([neg[1:].flip(0), torch.zeros(1, dtype=torch.float64), pos[1:]])
        levels = levels / top * (n // 2 - 1)
    elif kind.startswith("pow"):
        u = ints / (n // 2 - 1)
        levels = u.sign() * u.abs() ** float(kind[3:]) * (n // 2 - 1)
    else:
        raise ValueError(f"unknown grid {kind!r}")
    return levels.float()


def nearest(x: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, kind: str):
    """(value, level) of the nearest grid point to each ``x`` for per-row ``scale``."""
    t = x / scale
    if kind == "int":  # as the library rounds: floor(t + 1/2), clamped
        level = torch.clamp(torch.floor(t + 0.5), levels[0].item(), levels[-1].item())
    elif kind == "half":
        level = torch.clamp(torch.floor(t), levels[0].item() - 0.5, levels[-1].item() - 0.5) + 0.5
    else:
        level = levels[torch.bucketize(t.contiguous(), (levels[1:] + levels[:-1]) / 2)]
    return level * scale, level


def lloyd_levels(rows: torch.Tensor, start: torch.Tensor, iters: int) -> torch.Tensor:
    """The MSE-optimal levels (Lloyd's algorithm from ``start``) of the nonzero weights of
    ``rows``, each row in units of its absmax-based scale (the ``int`` grid's start): one grid
    per tensor (16 fp16 numbers, ~0 bits per weight), fitted without data."""
    scale = (rows.abs().amax(1, keepdim=True) / start.max()).clamp_min(1e-12)
    t = (rows / scale)[rows != 0]  # (zeros: the outliers' holes and the padding)
    levels = start.clone()
    for _ in range(iters):
        cell = torch.bucketize(t, (levels[1:] + levels[:-1]) / 2)
        sums = torch.zeros_like(levels).index_add_(0, cell, t)
        counts = torch.zeros_like(levels).index_add_(0, cell, torch.ones_like(t))
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels).sort().values
    return levels.half().float()


def search_ranges(
    x: torch.Tensor,
    col_weight: torch.Tensor | None,
    levels: torch.Tensor,
    kind: str,
    steps: int,
    lr: float,
    asym: bool,
    power: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on each row's scale (and offset) for the least weighted error to this ``power`` (2:
    squared, the paper's); returns the per-row (scale, offset), rounded to fp16. ``x``: rows,
    outliers zeroed."""
    rows, cols = x.shape
    w = torch.ones_like(x) if col_weight is None else col_weight[None, :].expand(rows, cols)
    if asym:
        low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        s0 = ((high - low) / (levels[-1] - levels[0])).clamp_min(1e-12)
        m0 = low - levels[0] * s0
    else:
        s0 = (x.abs().amax(1, keepdim=True) / levels.max()).clamp_min(1e-12)
        m0 = torch.zeros_like(s0)
    ratio, shift = torch.ones_like(s0), torch.zeros_like(s0)
    params = [ratio, shift] if asym else [ratio]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    best_loss = torch.full((rows,), float("inf"))
    best_s, best_m = s0.clone(), m0.clone()
    w_sum = w.sum(1, keepdim=True)
    b1, b2 = ADAM_BETAS
    for step in range(steps + 1):
        s, m = s0 * ratio, m0 + shift * s0
        value, level = nearest(x - m, s, levels, kind)
        err = value + m - x
        loss = (w * err.abs() ** power).sum(1)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_s = torch.where(better[:, None], s, best_s)
        best_m = torch.where(better[:, None], m, best_m)
        if step == steps:
            break
        slope = w * err.abs() ** (power - 1) * err.sign() * power / w_sum  # d loss / d err
        grads = [(slope * level).sum(1, keepdim=True)]
        if asym:
            grads.append(slope.sum(1, keepdim=True))
        for p, g, (mom, vel) in zip(params, grads, moments, strict=True):
            mom.mul_(b1).add_(g, alpha=1 - b1)
            vel.mul_(b2).addcmul_(g, g, value=1 - b2)
            p -= (
                lr * (mom / (1 - b1 ** (step + 1))) / ((vel / (1 - b2 ** (step + 1))).sqrt() + 1e-8)
            )
        ratio.clamp_(min=1e-3)
    return best_s.half().float(), best_m.half().float()


def hadamard(size: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of a power-of-two ``size``, normalised to be orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


def rotation(width: int, kind: int | str) -> torch.Tensor:
    """The orthogonal ``width`` x ``width`` rotation of setting ``rotate`` (seeded by width)."""
    gen = torch.Generator().manual_seed(width)
    if kind == "dense":
        q, r = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
        return (q * r.diagonal().sign()).float()
    block = width & -width if kind == "max" else int(kind)
    if width % block:
        raise ValueError(f"rotation block {block} does not divide {width}")
    signs = torch.randint(0, 2, (width,), generator=gen).double() * 2 - 1
    return (signs[:, None] * torch.block_diag(*[hadamard(block)] * (width // block))).float()


def outlier_mask(weight: torch.Tensor, col_weight: torch.Tensor | None, st: dict) -> torch.Tensor:
    out_f, in_f = weight.shape
    sigma = st.get("sigma")
    if not sigma:
        return torch.zeros_like(weight, dtype=torch.bool)
    block = st.get("statblock")
    if block:  # statistics per block of columns (NaN padding for a short last block)
        padded = torch.nn.functional.pad(weight, (0, -in_f % block), value=float("nan"))
        rows = padded.reshape(-1, block)
        mean = rows.nanmean(1, keepdim=True)
        std = (rows - mean).pow(2).nanmean(1, keepdim=True).sqrt()
        return ((rows - mean).abs() >= sigma * std).reshape(out_f, -1)[:, :in_f]
    deviation = (weight - weight.mean()).abs()
    mask = deviation >= sigma * weight.std(correction=0)
    count = int(mask.sum())
    if st.get("wsel") and col_weight is not None and count:
        score = deviation * (col_weight / col_weight.mean()).sqrt()[None, :] ** st["wsel"]
        cut = score.flatten().kthvalue(score.numel() - count + 1).values
        mask = score >= cut
    return mask


def fake_quant(weight: torch.Tensor, col_weight: torch.Tensor | None, st: dict):
    """(dequantized weight, stored bits, outliers) of one weight for setting ``st``."""
    bits, group = st["bits"], st.get("group")
    out_f, in_f = weight.shape
    weight = weight.float()
    rotate = st.get("rotate")
    if rotate:
        r = rotation(in_f, rotate)
        quantized, stored, outliers = fake_quant(weight @ r, None, {**st, "rotate": None})
        return quantized @ r.T, stored, outliers
    mask = outlier_mask(weight, col_weight, st)
    size = group or in_f
    pad = -in_f % size  # a short last group per row: zero-padded (exact on grids with a zero)
    rows = torch.nn.functional.pad(weight.masked_fill(mask, 0.0), (0, pad)).reshape(-1, size)
    weighting = None
    if col_weight is not None and st.get("wloss") and not group:
        weighting = (col_weight / col_weight.mean()) ** st["wloss"]
    kind = st.get("grid", "int")
    if kind == "lloyd":  # this tensor's own levels: 1-D k-means of its rows in units of the scale
        levels = lloyd_levels(rows, grid_levels("nf0", bits), st.get("lloyd_iters", 30))
    else:
        levels = grid_levels(kind, bits)
    scale, offset = search_ranges(
        rows, weighting, levels, kind, st.get("steps", 50), st.get("lr", 3e-3),
        st.get("asym", False), st.get("lpow", 2.0),
    )  # fmt: skip
    quantized = nearest(rows - offset, scale, levels, kind)[0] + offset
    quantized = quantized.reshape(out_f, in_f + pad)[:, :in_f]
    quantized = torch.where(mask, weight.half().float(), quantized)
    outliers = int(mask.sum())
    scale_bits = 16 * (2 if st.get("asym") else 1) * out_f * -(-in_f // size)
    level_bits = 16 * len(levels) if kind == "lloyd" else 0  # (the others' are constants)
    stored = bits * weight.numel() + scale_bits + 32 * outliers + 32 * (out_f + 1) + level_bits
    return quantized, stored, outliers


def downstream_grams(model: torch.nn.Module, kinds: list[str]) -> dict[str, torch.Tensor]:
    """Data-free output-side Hessians ``G`` (out x out) for ``||G^1/2 (W - Q)||^2``: the error
    of v_proj as o_proj sees it (``R^T Wo^T Wo R``, R repeating each kv head for its q heads),
    of up_proj / gate_proj as down_proj sees it (``D Wd^T Wd D``, D the rms of silu(g), resp.
    silu'(g) times the rms of u, for isotropic normalised inputs: the gamma-scaled row norms)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    repeat = cfg.num_attention_heads // cfg.num_key_value_heads
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    nodes_t = torch.tensor(nodes, dtype=torch.float64)
    weights_t = torch.tensor(weights, dtype=torch.float64) / math.sqrt(2 * math.pi)

    def gauss_mean(fn, spread: torch.Tensor) -> torch.Tensor:
        return (fn(spread.double()[:, None] * nodes_t[None, :]) * weights_t).sum(1).float()

    def dsilu_sq(g: torch.Tensor) -> torch.Tensor:
        sig = torch.sigmoid(g)
        return (sig * (1 + g * (1 - sig))) ** 2

    out = {}
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if "v" in kinds:
            w_o = attn.o_proj.weight.detach().float()
            kv_of_slot = torch.arange(cfg.num_attention_heads * head_dim)
            kv_of_slot = (kv_of_slot // head_dim // repeat) * head_dim + kv_of_slot % head_dim
            seen = torch.zeros(w_o.shape[0], cfg.num_key_value_heads * head_dim)
            seen.index_add_(1, kv_of_slot, w_o)  # Wo R
            out[f"model.layers.{i}.self_attn.v_proj"] = seen.T @ seen
        gamma = layer.post_attention_layernorm.weight.detach().float()
        w_g, w_u, w_d = (
            m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        )
        gram = w_d.T @ w_d
        g_spread, u_spread = (w_g * gamma).norm(dim=1), (w_u * gamma).norm(dim=1)
        if "up" in kinds:
            d = gauss_mean(lambda g: (g * torch.sigmoid(g)) ** 2, g_spread).sqrt()
            out[f"model.layers.{i}.mlp.up_proj"] = d[:, None] * gram * d[None, :]
        if "gate" in kinds:
            d = gauss_mean(dsilu_sq, g_spread).sqrt() * u_spread
            out[f"model.layers.{i}.mlp.gate_proj"] = d[:, None] * gram * d[None, :]
    return out


def downstream_gptq(weight: torch.Tensor, gram: torch.Tensor, st: dict):
    """GPTQ over the output rows with ``gram`` as the Hessian: row r is rounded with its own
    range (the plain search's, on the unchanged weight), and its error is spread over the rows
    after it so that the downstream layer sees less of it. Outliers keep their (updated) values
    exactly. Returns what :func:`fake_quant` returns (per-channel ranges only)."""
    out_f, in_f = weight.shape
    weight = weight.float().clone()
    mask = outlier_mask(weight, None, st)
    levels = grid_levels("int", st["bits"])
    scale, _ = search_ranges(
        weight.masked_fill(mask, 0.0), None, levels, "int", st.get("steps", 50),
        st.get("lr", 3e-3), False,
    )  # fmt: skip
    lo, hi = levels[0].item(), levels[-1].item()
    h = gram.double() + st.get("damp", 0.01) * gram.diagonal().mean() * torch.eye(out_f)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    u = u.float()
    quantized = torch.empty_like(weight)
    block = 128
    for b0 in range(0, out_f, block):  # GPTQ's lazy batch updates: a block of rows at a time
        b1 = min(b0 + block, out_f)
        rows, errors = weight[b0:b1].clone(), torch.zeros(b1 - b0, in_f)
        for r in range(b1 - b0):
            i = b0 + r
            q = torch.clamp(torch.floor(rows[r] / scale[i] + 0.5), lo, hi) * scale[i]
            q = torch.where(mask[i], rows[r].half().float(), q)
            quantized[i] = q
            errors[r] = (rows[r] - q) / u[i, i]
            rows[r + 1 :] -= u[i, i + 1 : b1, None] * errors[r][None, :]
        weight[b1:] -= u[b0:b1, b1:].T @ errors
    outliers = int(mask.sum())
    stored = st["bits"] * weight.numel() + 16 * out_f + 32 * outliers + 32 * (out_f + 1)
    return quantized, stored, outliers


def run(model, ids, col_weights, st: dict, windows: int, first: int) -> dict[str, Any]:
    grams = downstream_grams(model, st.get("downstream", []))
    model = copy.deepcopy(model)
    stored = weights = outliers = 0
    start = time.perf_counter()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name in grams:
            quantized, b, n = downstream_gptq(module.weight.data, grams[name], st)
            module.weight.data = quantized
            stored, weights, outliers = stored + b, weights + module.weight.numel(), outliers + n
        elif isinstance(module, torch.nn.Linear) and ".layers." in name:
            quantized, b, n = fake_quant(module.weight.data, col_weights.get(name), st)
            module.weight.data = quantized
            stored, weights, outliers = stored + b, weights + module.weight.numel(), outliers + n
    seconds = time.perf_counter() - start
    ppl = perplexity(model, ids, 2048, windows, first_window=first).ppl
    return {"ppl": ppl, "bpw": stored / weights, "frac": outliers / weights, "qs": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", help="JSON list of settings")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--first", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("grid-experiments.jsonl"))
    args = parser.parse_args()
    loaded = load_model(default_model_path())
    ids = tokenize(loaded.tokenizer, read_text(WIKITEXT))
    col_weights = column_weights(loaded.model)
    with args.out.open("a") as f:
        f.write(json.dumps({"header": environment("cpu")}) + "\n")
    for st in json.loads(args.settings):
        row = {"st": st, **run(loaded.model, ids, col_weights, st, args.windows, args.first)}
        row.update(first=args.first, windows=args.windows)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
