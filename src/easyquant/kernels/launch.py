"""Launch a Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` binds, specialises and hashes every argument on every call,
then builds launch metadata: on the H100 that was about 40% of an eager ``QuantLinear`` call's
123 us of host time (stop 15, results/…-host-time-layer.json). A :class:`KernelLaunch` fixes all of
a launch's arguments but a few tensors (its :class:`Slot` s). Its first call goes through Triton,
which compiles or finds the kernel for exactly these arguments; later calls hand the same
arguments, slots refilled, straight to the compiled kernel's launcher.

That is valid while the refilled tensors specialise as the first ones did: the same dtypes and the
same 16-byte alignment (Triton's pointer specialisation). Callers make sure of it: they key their
launches on the dtype and alignment of the tensors they pass in, and the buffers they allocate
themselves are always aligned. A call on another CUDA device than the first one, under
``TRITON_INTERPRET=1``, or with a Triton whose compiled kernels lack the launcher this relies on
(written against Triton 3.6), goes through Triton every time.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
from triton import knobs


@dataclass(frozen=True)
class Slot:
    """A placeholder argument: the ``index``-th tensor handed to each call."""

    index: int


def _direct_launch_enabled() -> bool:
    # EASYQUANT_DIRECT_LAUNCH=0 turns the direct path off (every call through Triton)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return not interpreting and os.environ.get("EASYQUANT_DIRECT_LAUNCH", "1") != "0"


def _launchable(compiled: Any) -> bool:
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata"))


@functools.cache
def _parameters(fn: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((p.name, p.default) for p in inspect.signature(fn.fn).parameters.values())


def _ordered_args(fn: Any, args: tuple, kwargs: dict) -> list:
    """All of ``fn``'s parameters in order (constexprs included, defaults filled in), as the
    compiled kernel's launcher takes them; launch options such as ``num_warps`` left out."""
    ordered = list(args)
    for name, default in _parameters(fn)[len(args) :]:
        ordered.append(kwargs.get(name, default))
    return ordered


class KernelLaunch:
    """One kernel launch with everything but its slots bound; call it with the slots' tensors."""

    __slots__ = ("args", "bound", "compiled", "device", "fn", "grid", "kwargs", "slots")

    def __init__(self, fn: Any, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        self.fn = fn
        self.grid = (*grid, *(1,) * (3 - len(grid)))
        self.args = args
        self.kwargs = kwargs
        self.slots = tuple((pos, a.index) for pos, a in enumerate(args) if isinstance(a, Slot))
        self.compiled: Any = None
        self.device = -1
        self.bound: list = []

    def _filled(self, base: list | tuple, tensors: tuple) -> list:
        filled = list(base)
        for pos, index in self.slots:
            filled[pos] = tensors[index]
        return filled

    def __call__(self, *tensors: torch.Tensor) -> None:
        compiled = self.compiled
        if compiled is not None:
            device = torch.cuda.current_device()
            if device == self.device:
                if not self.bound:  # (second call: a launch called once never pays for this)
                    self.bound = _ordered_args(self.fn, self.args, self.kwargs)
                self._direct(compiled, device, self._filled(self.bound, tensors))
                return
        compiled = self.fn[self.grid](*self._filled(self.args, tensors), **self.kwargs)
        if self.compiled is None and _launchable(compiled) and _direct_launch_enabled():
            self.device = torch.cuda.current_device()
            self.compiled = compiled

    def _direct(self, compiled: Any, device: int, bound: list) -> None:
        stream = torch._C._cuda_getCurrentRawStream(device)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        # launch metadata only for a profiler's hooks, as Triton builds it (else it costs host
        # time for nothing)
        hooked = getattr(enter, "calls", True) or getattr(leave, "calls", True)
        metadata = compiled.launch_metadata(self.grid, stream, *bound) if hooked else None
        g0, g1, g2 = self.grid
        compiled.run(
            g0, g1, g2, stream, compiled.function, compiled.packed_metadata, metadata,
            enter, leave, *bound,
        )  # fmt: skip
