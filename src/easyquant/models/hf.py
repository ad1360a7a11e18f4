"""What we ask of transformers: a config from a dict, and a model skeleton without weights.

transformers is imported here lazily, so ``import easyquant`` stays light.
"""

from __future__ import annotations

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
