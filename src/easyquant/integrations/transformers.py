"""easyquant as a transformers quantization method: ``quant_method: "easyquant"``.

Two ways in, both through ``from_pretrained`` once :func:`register` has run (``import easyquant``
arranges that, see :mod:`easyquant.integrations`):

* **A quantized directory** (written by :func:`easyquant.models.quantize_model` or by
  ``save_pretrained`` of a model loaded this way): its config.json holds the
  ``quantization_config``. Before loading, every listed module becomes a placeholder whose buffers
  have the exact shapes and dtypes of the checkpoint's tensors (read from the safetensors
  headers: the number of outliers differs per layer), so transformers loads ``<module>.qweight``,
  ``.scales``, ``.outlier_*``, ``.meta`` straight into them; after loading each placeholder becomes
  a validated :class:`~easyquant.nn.quant_linear.QuantLinear`.
* **A full-precision directory with** ``quantization_config=EasyQuantConfig(bits=4, ...)``: the
  selected Linear layers become placeholders; transformers hands each weight, as it reads it (on
  the device the ``device_map`` gives it), to easyquant's quantize op, which quantizes it
  (data-free) and drops it. transformers loads tensors one at a time when a quantizer works on
  the fly, so the full-precision model is never in memory as a whole.

``save_pretrained`` writes the QuantLinear tensors under the same names and the same
``quantization_config``, so the result loads again here and with :func:`load_quantized`.

Supported: transformers >= 5.17, < 6 (the v5 loader: ``get_quantize_ops``, meta-device skeletons,
``checkpoint_files`` passed to the quantizer). Tested with 5.17.0 and 5.23.0.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from easyquant import __version__ as EASYQUANT_VERSION
from easyquant.config import QuantConfig
from easyquant.format.qweight import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    QuantizedWeight,
    state_keys,
)
from easyquant.models.errors import one_line
from easyquant.models.pipeline import QUANT_METHOD
from easyquant.models.select import Selection, TensorReport, quantize_with_report
from easyquant.nn.quant_linear import QuantLinear

MIN_VERSION = Version("5.17")
MAX_VERSION = Version("6")  # exclusive
TESTED_VERSIONS = ("5.17.0", "5.23.0")


def quant_field_names() -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(QuantConfig))


class UnsupportedTransformersError(ImportError):
    """The installed transformers has a loader easyquant does not plug into."""


def check_transformers_version(version: str | None = None) -> None:
    version = version or transformers.__version__
    if not MIN_VERSION <= Version(version) < MAX_VERSION:
        raise UnsupportedTransformersError(
            f"easyquant's transformers integration needs transformers >= {MIN_VERSION}, "
            f"< {MAX_VERSION} (tested: {', '.join(TESTED_VERSIONS)}); found {version}. "
            f"Install one with: pip install 'transformers>={MIN_VERSION},<{MAX_VERSION}'"
        )


# ---- the config ------------------------------------------------------------------------------
class EasyQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an easyquant model: every :class:`QuantConfig` field, the
    :class:`Selection` (``include``/``exclude`` globs, per-module ``overrides``) and, for a
    quantized checkpoint, ``quantized_modules``, ``format_version`` and ``easyquant_version``.

    ``to_dict()`` is exactly the ``quantization_config`` that :func:`quantize_model` writes.
    Everything is validated here: a bad field is a one-line ``ValueError``.
    """

    def __init__(
        self,
        include: list[str] | tuple[str, ...] | None = None,
        exclude: list[str] | tuple[str, ...] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        quantized_modules: list[str] | None = None,
        format_version: int = FORMAT_VERSION,
        easyquant_version: str | None = None,
        quant_method: str = QUANT_METHOD,
        **quant_fields: Any,
    ) -> None:
        """``quant_fields``: any :class:`QuantConfig` field (bits=4, group_size=None, ...); those
        not given take QuantConfig's defaults."""
        register()  # a config in hand means from_pretrained is next: transformers must know us
        known = quant_field_names()
        unknown = sorted(set(quant_fields) - set(known))
        if unknown:
            raise ValueError(
                f"unknown easyquant quantization_config field(s) {unknown}; this easyquant "
                f"knows {sorted([*known, 'include', 'exclude', 'overrides'])}"
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if format_version not in READABLE_VERSIONS:
            raise ValueError(
                f"the model uses easyquant format version {format_version}; this easyquant "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        if quantized_modules is not None and (
            not isinstance(quantized_modules, (list, tuple))
            or not all(isinstance(m, str) for m in quantized_modules)
        ):
            raise ValueError("quantized_modules must be a list of module names")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.easyquant_version = easyquant_version or EASYQUANT_VERSION
        defaults = QuantConfig().to_dict()
        for name in known:
            setattr(self, name, quant_fields.get(name, defaults[name]))
        self.include = list(include or ())
        self.exclude = list(exclude or ())
        self.overrides = {p: dict(c) for p, c in (overrides or {}).items()}
        self.quantized_modules = None if quantized_modules is None else list(quantized_modules)
        self.selection.check(self.quant_config)  # validates the fields and the overrides

    @classmethod
    def from_quant_config(
        cls, config: QuantConfig, selection: Selection | None = None, **fields: Any
    ) -> EasyQuantConfig:
        selection_fields = (selection or Selection()).to_dict()
        return cls(**config.to_dict(), **selection_fields, **fields)

    @property
    def quant_config(self) -> QuantConfig:
        return QuantConfig(**{name: getattr(self, name) for name in quant_field_names()})

    @property
    def selection(self) -> Selection:
        return Selection.build(self.include, self.exclude, self.overrides)

    def to_dict(self) -> dict[str, Any]:
        # The layout of easyquant.models.pipeline.quantization_config, key for key.
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "easyquant_version": self.easyquant_version,
            **self.quant_config.to_dict(),
            **self.selection.to_dict(),
            "quantized_modules": copy.copy(self.quantized_modules),
        }

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        yield from self.to_dict().items()


# ---- placeholders while transformers loads -----------------------------------------------------
class PendingQuantLinear(nn.Module):
    """Where a :class:`QuantLinear` goes, while transformers loads the weights.

    It holds the Linear's bias slot and either the full-precision ``weight`` slot (quantize on
    load: easyquant's quantize op fills it) or, for a quantized checkpoint, meta-device buffers
    shaped like the stored tensors (transformers fills them). :meth:`finish` then builds the
    validated QuantLinear. It cannot run a forward pass.
    """

    def __init__(self, linear: nn.Linear, config: QuantConfig | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.config = config
        self.error: str | None = None
        self.stored_keys = state_keys(FORMAT_VERSION)
        self.bias = linear.bias
        if config is not None:
            self.weight = linear.weight

    @classmethod
    def for_checkpoint(
        cls, linear: nn.Linear, stored: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    ) -> PendingQuantLinear:
        """Placeholders for the tensors in ``stored`` (one format version's keys)."""
        pending = cls(linear)
        pending.stored_keys = tuple(stored)
        for key, (shape, dtype) in stored.items():
            pending.register_buffer(key, torch.empty(shape, dtype=dtype, device="meta"))
        return pending

    @property
    def awaits_weight(self) -> bool:
        """Quantize on load, weight not quantized yet."""
        return self.config is not None and "weight" in self._parameters

    def store(self, qweight: QuantizedWeight) -> None:
        """Keep the quantized weight; the full-precision slot goes."""
        del self.weight
        for key, tensor in qweight.state_dict().items():
            self.register_buffer(key, tensor.to(qweight.device))

    def finish(self, name: str) -> QuantLinear:
        keys = self.stored_keys
        missing = [k for k in keys if k not in self._buffers or self._buffers[k].is_meta]
        if missing:
            why = self.error or f"tensor(s) {missing} were not loaded"
            raise ValueError(f"easyquant could not build {name}: {why}")
        if self.bias is not None and self.bias.is_meta:
            raise ValueError(f"easyquant could not build {name}: its bias was not loaded")
        try:
            qweight = QuantizedWeight.from_state_dict({k: self._buffers[k] for k in keys})
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        if qweight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"{name} is stored as {list(qweight.shape)} but the model expects "
                f"{[self.out_features, self.in_features]}"
            )
        bias = None if self.bias is None else self.bias.detach()
        return QuantLinear(qweight, bias).to(qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this easyquant layer was never loaded (from_pretrained did not finish)")

    def extra_repr(self) -> str:
        state = "quantize on load" if self.config is not None else "quantized checkpoint"
        return f"in_features={self.in_features}, out_features={self.out_features}, {state}"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def checkpoint_tensors(files: list[str] | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in the checkpoint's safetensors files."""
    from pathlib import Path

    from easyquant.models.safetensors_io import read_header

    if not files:
        raise ValueError("an easyquant checkpoint needs its safetensors files; none were found")
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for file in files:
        path = Path(file)
        if path.suffix != ".safetensors":
            raise ValueError(f"easyquant checkpoints are safetensors files; got {path.name}")
        tensors.update((e.name, (e.shape, e.dtype)) for e in read_header(path)[0])
    return tensors


# ---- the quantizer -----------------------------------------------------------------------------
class EasyQuantHfQuantizer(HfQuantizer):
    """Loads easyquant checkpoints and quantizes full-precision ones on load (no data needed)."""

    requires_calibration = False
    quantization_config: EasyQuantConfig

    def __init__(self, quantization_config: EasyQuantConfig, **kwargs: Any) -> None:
        pre_quantized = kwargs.get("pre_quantized", True)
        if not pre_quantized:
            if quantization_config.quantized_modules is not None:
                raise ValueError(
                    "quantized_modules lists the layers of an already quantized checkpoint; to "
                    "choose the layers to quantize, give include/exclude patterns"
                )
            # Ours to complete after loading (quantized_modules): the caller's object stays as is.
            quantization_config = copy.deepcopy(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self.reports: list[TensorReport] = []

    # -- checks and settings
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_transformers_version()
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "easyquant models cannot be offloaded to disk; drop 'disk' from device_map"
            )

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        if self.pre_quantized or tensor_name != "weight":
            return False
        module = model.get_submodule(module_name) if module_name else model
        return isinstance(module, PendingQuantLinear) and module.awaits_weight

    def param_element_size(self, model: nn.Module, param_name: str, param: torch.Tensor) -> float:
        """About what a quantized weight costs (for device maps): bits / 8 bytes per element."""
        if self.param_needs_quantization(model, param_name):
            module = model.get_submodule(param_name.rpartition(".")[0])
            return module.config.bits / 8
        return param.element_size()

    def get_quantize_ops(self) -> Any:
        return quantize_op_class()(self)

    # -- before loading: placeholders
    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        if self.pre_quantized:
            self._expect_checkpoint(model, checkpoint_files)
        else:
            self._expect_full_precision(model)

    def _expect_checkpoint(self, model: nn.Module, checkpoint_files: list[str] | None) -> None:
        modules = self.quantization_config.quantized_modules
        if modules is None:
            raise ValueError("the easyquant quantization_config lacks its quantized_modules list")
        stored = checkpoint_tensors(checkpoint_files)
        keys = state_keys(self.quantization_config.format_version)
        for name in modules:
            linear = self._linear(model, name)
            missing = [f"{name}.{k}" for k in keys if f"{name}.{k}" not in stored]
            if missing:
                raise ValueError(f"the checkpoint lacks tensor(s) {missing}")
            shapes = {k: stored[f"{name}.{k}"] for k in keys}
            replace_module(model, name, PendingQuantLinear.for_checkpoint(linear, shapes))

    def _expect_full_precision(self, model: nn.Module) -> None:
        base, selection = self.quantization_config.quant_config, self.quantization_config.selection
        # A weight tied to another (lm_head to the embeddings) is not read from the checkpoint.
        tied = {
            k.removesuffix(".weight") for k in getattr(model, "all_tied_weights_keys", {}) or {}
        }
        targets: dict[str, QuantConfig] = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or name in tied:
                continue
            if not selection.wants(name, (module.out_features, module.in_features)):
                continue
            targets[name] = selection.config_for(name, base)
        if not targets:
            raise ValueError("nothing to quantize: no Linear layer matches the easyquant selection")
        for name, config in targets.items():
            replace_module(model, name, PendingQuantLinear(model.get_submodule(name), config))

    @staticmethod
    def _linear(model: nn.Module, name: str) -> nn.Linear:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the model has no module {name!r}: load the checkpoint with the class it was "
                "saved from (for example AutoModelForCausalLM)"
            ) from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is a {type(module).__name__}, not a Linear")
        return module

    # -- after loading: the real layers
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        names = []
        for name, module in list(model.named_modules()):
            if isinstance(module, PendingQuantLinear):
                replace_module(model, name, module.finish(name))
                names.append(name)
        if not self.pre_quantized:
            self.quantization_config.quantized_modules = names
            self.quantization_config.easyquant_version = EASYQUANT_VERSION
        # The layers hold (and save_pretrained writes) this version's tensors, whichever was read.
        self.quantization_config.format_version = FORMAT_VERSION
        return model


@functools.cache
def quantize_op_class() -> type:
    """The ConversionOps subclass that quantizes one weight as transformers reads it. Built on
    first use: transformers.core_model_loading must not load while transformers is importing its
    quantizers (the import hook registers at that moment)."""
    from transformers.core_model_loading import ConversionOps

    class EasyQuantQuantize(ConversionOps):
        def __init__(self, hf_quantizer: EasyQuantHfQuantizer) -> None:
            self.hf_quantizer = hf_quantizer

        @torch.no_grad()
        def convert(
            self,
            input_dict: dict[str, Any],
            model: nn.Module | None = None,
            full_layer_name: str | None = None,
            missing_keys: set[str] | None = None,
            **kwargs: Any,
        ) -> dict[str, torch.Tensor]:
            assert model is not None and full_layer_name is not None
            value = next(iter(input_dict.values()))
            weight = value[0] if isinstance(value, list) else value
            module_name = full_layer_name.rpartition(".")[0]
            pending = model.get_submodule(module_name)
            assert isinstance(pending, PendingQuantLinear) and pending.config is not None
            try:
                qweight, report = quantize_with_report(full_layer_name, weight, pending.config)
            except Exception as exc:
                # transformers logs conversion errors and goes on; finish() raises with this.
                pending.error = one_line(exc)
                raise
            pending.store(qweight)
            self.hf_quantizer.reports.append(report)
            if missing_keys is not None:
                missing_keys.discard(full_layer_name)
            return {}

    return EasyQuantQuantize


# ---- registration ------------------------------------------------------------------------------
def is_registered() -> bool:
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    return (
        AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is EasyQuantConfig
        and AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is EasyQuantHfQuantizer
    )


def register() -> None:
    """Add ``quant_method: "easyquant"`` to transformers (idempotent)."""
    check_transformers_version()
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    for mapping, cls in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, EasyQuantConfig),
        (AUTO_QUANTIZER_MAPPING, EasyQuantHfQuantizer),
    ):
        if mapping.get(QUANT_METHOD) not in (None, cls):
            raise ImportError(
                f"another {cls.__bases__[0].__name__} is already registered with transformers "
                f"as {QUANT_METHOD!r}: {mapping[QUANT_METHOD].__module__}"
            )
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(EasyQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(EasyQuantHfQuantizer)
