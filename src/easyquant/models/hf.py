"""What we ask of transformers: a config from a dict, and a model skeleton without weights.

transformers is imported here lazily, so ``import easyquant`` stays light.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from easyquant.models.errors import ModelInputError, one_line


def hf_config_from_dict(data: dict[str, Any]) -> Any:
    """A transformers ``PretrainedConfig`` from config.json contents (without our own fields)."""
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if k != "quantization_config"}
    model_type = data.get("model_type")
    if not model_type:
        raise ModelInputError("config.json has no 'model_type': not a transformers model")
    rest = {k: v for k, v in data.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **rest)
    except (ValueError, KeyError) as exc:
        raise ModelInputError(
            f"unsupported architecture: transformers does not know model_type {model_type!r} "
            f"({one_line(exc)[:120]})"
        ) from exc


def model_class(config: Any) -> Any:
    """The class named by ``config.architectures`` when transformers has it, else the causal-LM
    auto class (easyquant quantizes language models)."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as exc:
        raise ModelInputError(
            f"unsupported architecture: {type(config).__name__} has no causal-LM model in "
            f"transformers {transformers.__version__}"
        ) from exc


def build_skeleton(config: Any) -> nn.Module:
    """The model with every parameter on the meta device (no memory, no init); buffers (such as
    rotary frequencies, which checkpoints do not hold) are computed for real on the CPU."""
    from accelerate import init_empty_weights

    cls = model_class(config)
    try:
        with init_empty_weights(include_buffers=False):
            return cls(config)
    except Exception as exc:  # a config transformers cannot build: one line, not a traceback
        raise ModelInputError(
            f"unsupported architecture: cannot build {cls.__name__} from config.json "
            f"({one_line(exc)[:160]})"
        ) from exc


def linear_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Names of the ``nn.Linear`` modules of ``model`` and their weight shapes ``(out, in)``."""
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


# Decoder architectures whose nn.Linear modules are exactly the 2-D weights named
# ``model.layers.<i>.<part>.<proj>.weight`` below, plus ``lm_head``. For them the layout is read
# from the checkpoint's names, as llm-compressor's model-free path does: importing transformers
# and building the skeleton costs seconds per process, most of a 7B run's fixed cost on a GPU.
# tests/models/test_hf.py checks each against the skeleton of the installed transformers.
LLAMA_LIKE_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LAYOUT_BY_NAME: dict[str, tuple[str, ...]] = dict.fromkeys(
    ("llama", "mistral", "qwen2", "qwen3"), LLAMA_LIKE_PROJECTIONS
)
_LAYER_MODULE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def linears_from_names(
    model_type: str | None, weights: Iterable[tuple[str, tuple[int, ...]]]
) -> dict[str, tuple[int, int]] | None:
    """The Linear modules among ``weights`` (name, shape) in the skeleton's order, for the
    architectures of :data:`LAYOUT_BY_NAME`; None for any other, or for a checkpoint with a 2-D
    weight that the table does not account for (then the skeleton decides)."""
    projections = LAYOUT_BY_NAME.get(model_type or "")
    if projections is None:
        return None
    position = {p: i for i, p in enumerate(projections)}
    found: dict[tuple[int, int], tuple[str, tuple[int, int]]] = {}
    head: dict[str, tuple[int, int]] = {}
    for name, shape in weights:
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        match = _LAYER_MODULE.fullmatch(module)
        if match is not None and match.group(2) in position:
            key = (int(match.group(1)), position[match.group(2)])
            found[key] = (module, (shape[0], shape[1]))
        elif module == "lm_head":
            head[module] = (shape[0], shape[1])
        elif module != "model.embed_tokens":
            return None  # a 2-D weight this table does not know: ask the skeleton
    return {**dict(found[k] for k in sorted(found)), **head}
