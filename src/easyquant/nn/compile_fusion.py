"""Fused siblings under ``torch.compile``: one call of the concatenated layer per input.

In eager mode and CUDA graphs a :class:`~easyquant.nn.quant_linear.FusedSlice` serves its
siblings from the output of the last input it ran on (identity and version of the tensor). That
cache is Python state that ``torch.compile`` cannot trace, so when compiling each slice calls the
concatenated layer itself; the ``easyquant::quant_linear`` op is pure (a function of its
arguments; the split-K counters it writes are zero again when it returns), so the identical calls
are merged again here, by a post-grad pass of Inductor
(``torch._inductor.config.post_grad_custom_post_pass``), leaving one kernel launch per group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class MergeQuantLinearCalls(CustomGraphPass):
    """Replace every ``easyquant::quant_linear`` call that repeats an earlier one (same
    arguments: the same input node and buffers) by the earlier one's result."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        target = torch.ops.easyquant.quant_linear.default
        seen: dict[tuple[Any, ...], torch.fx.Node] = {}
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not target:
                continue
            key = (node.args, tuple(sorted(node.kwargs.items())))
            first = seen.setdefault(key, node)
            if first is not node:
                node.replace_all_uses_with(first)
                graph.erase_node(node)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def install_merge_pass() -> bool:
    """Install :class:`MergeQuantLinearCalls` as Inductor's post-grad custom pass; False (and
    nothing changed) where another pass is installed already: then the fused groups still
    compute the right values under torch.compile, once per slice."""
    try:  # the op must exist before the pass names it (and triton for the op)
        import torch._inductor.config as inductor_config

        import easyquant.kernels.triton_matmul  # noqa: F401
    except ImportError:
        return False

    current = inductor_config.post_grad_custom_post_pass
    if isinstance(current, MergeQuantLinearCalls):
        return True
    if current is not None:
        return False
    inductor_config.post_grad_custom_post_pass = MergeQuantLinearCalls()
    return True
