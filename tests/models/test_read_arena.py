import threading

import pytest
import torch

from easyquant.models.read_arena import ALIGN, ArenaClosedError, ReadArena


def test_spans_are_aligned_disjoint_views_of_one_buffer():
    arena = ReadArena(1000)
    a, b = arena.take(100), arena.take(7)
    assert a.buffer.numel() == 100 and b.buffer.numel() == 7
    assert a.start == 0 and b.start % ALIGN == 0 and b.start >= a.start + 100
    a.buffer.fill_(1)
    b.buffer.fill_(2)
    assert a.buffer.untyped_storage().data_ptr() == arena.memory.untyped_storage().data_ptr()
    assert int(arena.memory[: a.buffer.numel()].sum()) == 100
    assert b.buffer.view(torch.uint8).sum() == 14


def test_a_span_waits_for_room_and_wraps_around_once_older_spans_are_back():
    arena = ReadArena(4 * ALIGN)
    first, second = arena.take(2 * ALIGN), arena.take(2 * ALIGN)  # full
    got = []
    waiter = threading.Thread(target=lambda: got.append(arena.take(ALIGN)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # no room yet
    arena.give_back(second)  # out of order: the first is still lent, nothing frees yet
    waiter.join(0.2)
    assert waiter.is_alive()
    arena.give_back(first)
    waiter.join(5)
    assert got and got[0].start == 0  # both back: the arena starts over at the front
    third = arena.take(3 * ALIGN)  # after the newest span, up to the end
    assert (third.start, third.end) == (ALIGN, 4 * ALIGN)
    arena.give_back(got[0])
    wrapped = arena.take(ALIGN)  # no room behind the newest: wraps to the front
    assert wrapped.start == 0


def test_closing_fails_a_waiting_take_and_oversized_spans_are_refused():
    arena = ReadArena(ALIGN)
    arena.take(ALIGN)
    errors = []

    def take():
        try:
            arena.take(1)
        except ArenaClosedError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=take)
    waiter.start()
    waiter.join(0.2)
    arena.close()
    waiter.join(5)
    assert len(errors) == 1
    with pytest.raises(ValueError, match="do not fit"):
        ReadArena(100).take(200)


def test_pinning_is_best_effort():
    # without CUDA (or when page-locking fails) the arena is plain memory and works the same
    arena = ReadArena(256, pin=True)
    assert arena.pinned == torch.cuda.is_available()
    span = arena.take(100)
    span.buffer.fill_(3)
    arena.give_back(span)
    arena.release()
    assert not arena.pinned
