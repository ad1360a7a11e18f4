"""Plugging easyquant into other libraries; none of them is imported until it is needed.

transformers: :func:`register` adds the ``"easyquant"`` quantization method (config + quantizer)
through transformers' public hooks, so ``AutoModelForCausalLM.from_pretrained`` loads easyquant
directories and quantizes on load with ``quantization_config=EasyQuantConfig(...)``.

:func:`install_import_hook` makes that automatic without importing transformers: when
transformers imports its quantizer registry (``transformers.quantizers.auto``, which it does
before any ``from_pretrained``), easyquant registers itself right after. ``import easyquant``
installs the hook, so after ``import easyquant`` a quantized directory loads with plain
transformers calls, whichever of the two is imported first.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

# transformers imports this module before it reads any quantization_config.
HOOK_MODULE = "transformers.quantizers.auto"
_LAZY = {"EasyQuantConfig", "EasyQuantHfQuantizer"}


def register() -> None:
    """Register easyquant with transformers (idempotent). Raises ImportError when transformers is
    missing or its version is not supported (the message says which versions are)."""
    from easyquant.integrations.transformers import register as register_transformers

    register_transformers()


def is_registered() -> bool:
    """Has easyquant been registered with transformers in this process?"""
    module = sys.modules.get("easyquant.integrations.transformers")
    return bool(module is not None and module.is_registered())


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``transformers.quantizers.auto``, then registers easyquant."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _register_quietly()


class _ImportHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that only wraps the loader of :data:`HOOK_MODULE`."""

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != HOOK_MODULE:
            return None
        remove_import_hook()  # one shot; also keeps the lookup below from finding this finder
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _register_quietly() -> None:
    """Register from inside someone else's import: a failure must not break their import of
    transformers, so it becomes a warning (an explicit :func:`register` raises instead)."""
    try:
        register()
    except Exception as exc:  # an unsupported transformers, say; reported, not raised
        warnings.warn(
            f"easyquant could not register with transformers: {exc}", RuntimeWarning, stacklevel=2
        )


def install_import_hook() -> None:
    """Register with transformers as soon as transformers loads its quantizer registry (now, if
    it already has). Importing transformers is left to the user: this costs nothing until then."""
    if HOOK_MODULE in sys.modules:
        _register_quietly()
        return
    if not any(isinstance(finder, _ImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook())


def remove_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _ImportHook)]


def __getattr__(name: str) -> Any:
    # EasyQuantConfig and the quantizer subclass transformers' classes: imported on first use.
    if name in _LAZY:
        from easyquant.integrations import transformers as hf

        return getattr(hf, name)
    raise AttributeError(f"module 'easyquant.integrations' has no attribute {name!r}")
