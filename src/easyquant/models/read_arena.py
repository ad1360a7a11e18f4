"""One reusable host buffer that the quantize pass reads tensors into, ahead of their use.

Reading the next tensor while the current one is quantized needs room for both; allocating each
anew costs page faults on every read (a fresh 100 MB buffer reads at a third of the speed of a
reused one) and lets host memory grow to several tensors. The arena is a single buffer as large
as the largest tensor of the pass, lent out as a ring: spans are taken in source order and given
back in any order (a span becomes free again once every older span is back too). A span that
does not fit waits until enough older ones come back, so host memory stays at one largest tensor
while smaller consecutive tensors (every Linear weight next to an embedding-sized largest
tensor) still overlap.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch

ALIGN = 64  # span offsets: any dtype's view of a span is aligned


def _round_up(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class ArenaClosedError(RuntimeError):
    """The pass stopped (an error elsewhere): a waiting reader gives up."""


@dataclass(eq=False)
class Span:
    """``buffer``: the ``nbytes`` bytes lent out (a uint8 view of the arena)."""

    start: int
    end: int
    buffer: torch.Tensor
    returned: bool = False


class ReadArena:
    """``largest``: bytes of the largest tensor to be read. ``pin``: page-lock the arena for
    CUDA (copies to the GPU from it run at full speed; registered in place, so it costs no more
    memory, unlike pinned allocations, which round up to a power of two). Call
    :meth:`release` once nothing reads or copies from it any more."""

    def __init__(self, largest: int, pin: bool = False) -> None:
        self.capacity = _round_up(max(largest, 1))
        self.memory = torch.empty(self.capacity, dtype=torch.uint8)
        self.spans: deque[Span] = deque()  # lent out (or returned but behind an older one)
        self.changed = threading.Condition()
        self.closed = False
        self.pinned = False
        if pin:  # best effort: an unpinned arena works, its copies are only slower
            try:
                cudart = torch.cuda.cudart()
                status = cudart.cudaHostRegister(self.memory.data_ptr(), self.capacity, 0)
                self.pinned = int(status) == 0
            except (RuntimeError, AssertionError, AttributeError):
                self.pinned = False

    def release(self) -> None:
        """Undo the page-locking (the arena stays usable as plain memory)."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.memory.data_ptr())
            self.pinned = False

    def _place(self, size: int) -> int | None:
        """Offset for ``size`` bytes after the newest span, or None if there is no room yet."""
        if not self.spans:
            return 0
        oldest, newest = self.spans[0].start, self.spans[-1].end
        if newest > oldest:  # not wrapped: the spans run from oldest to newest
            if newest + size <= self.capacity:
                return newest
            return 0 if size <= oldest else None  # wrap around to the front
        return newest if newest + size <= oldest else None  # wrapped: room before the oldest

    def take(self, nbytes: int) -> Span:
        """A span of ``nbytes`` bytes; blocks until there is room. Raises
        :class:`ArenaClosedError` once :meth:`close` was called."""
        size = _round_up(nbytes)
        if size > self.capacity:
            raise ValueError(f"{nbytes} bytes do not fit an arena of {self.capacity}")
        with self.changed:
            while True:
                if self.closed:
                    raise ArenaClosedError("the quantize pass stopped")
                start = self._place(size)
                if start is not None:
                    span = Span(start, start + size, self.memory[start : start + nbytes])
                    self.spans.append(span)
                    return span
                self.changed.wait()

    def give_back(self, span: Span) -> None:
        with self.changed:
            span.returned = True
            while self.spans and self.spans[0].returned:
                self.spans.popleft()
            self.changed.notify_all()

    def close(self) -> None:
        """Wake and fail every waiting :meth:`take` (the pass is over or failed)."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
