"""The L2 weight prefetch plan (engine/kernels/prefetch.py): which bytes each decode-path kernel asks for.

The prefetch itself is a PTX instruction that only a GPU runs (bench/engine_gpu_check.py compares greedy
tokens with it on and off); the plan is plain Python and decides whether it helps at all: each range
must lie inside one weight, never re-ask for what an earlier kernel asked for, stay within the lookahead,
and follow the weights across the end of one step into the next.
"""
from __future__ import annotations

import torch

from engine.kernels.prefetch import WeightStream, activate, take


def where(stream: WeightStream, got: tuple[int, int]) -> tuple[int, int, int] | None:
    """(weight index, byte offset in it, bytes) of a prefetch range; None for no range."""
    addr, size = got
    if size == 0:
        return None
    for i, (start, length) in enumerate(zip(stream.addrs, stream.sizes)):
        if start <= addr < start + length:
            assert addr + size <= start + length, "a range crosses the end of its weight"
            return i, addr - start, size
    raise AssertionError("a range outside every weight")


def test_stream_follows_the_decode_chain_and_wraps_into_the_next_step():
    weights = [torch.empty(n, dtype=torch.bfloat16) for n in (100, 50, 200, 80)]  # 192, 96, 400, 160 usable bytes
    stream = WeightStream(weights + [weights[0]], lookahead_bytes=300)  # a tied head (the same storage) counts once
    assert stream.sizes == [192, 96, 400, 160] and stream.total == 848
    s = stream
    # the first kernel (a norm) asks for the lookahead from the start, one weight per range
    assert where(s, s.take()) == (0, 0, 192)
    # a GEMV looks ahead of its own start: the next weight
    assert where(s, s.take(weights[0])) == (1, 0, 96)
    # a kernel after it looks ahead of the GEMV's end (192 + 300): the next 204 bytes of weight 2
    assert where(s, s.take()) == (2, 0, 204)
    assert s.take() == (0, 0)  # already asked for
    assert s.take(weights[1]) == (0, 0)
    assert where(s, s.take()) == (2, 204, 96)
    assert s.take(weights[2]) == (0, 0)  # a weight longer than the lookahead: its own stream covers it
    assert where(s, s.take()) == (3, 0, 160)
    # the last weight's GEMV reaches past the end: the next step's first weight
    assert where(s, s.take(weights[3])) == (0, 0, 140)
    assert where(s, s.take()) == (0, 140, 52)
    assert where(s, s.take()) == (1, 0, 96)
    # the next step's first GEMV is placed after this step's last one, never re-asking for prefetched bytes
    assert where(s, s.take(weights[0])) == (2, 0, 12) and s.start == 848


def test_unknown_weights_and_inactive_stream_prefetch_nothing():
    weights = [torch.empty(64, dtype=torch.bfloat16) for _ in range(3)]
    stream = WeightStream(weights[:2], lookahead_bytes=1 << 20)
    assert take() == (0, 0)  # no stream active: kernels launch without a prefetch
    with activate(stream):
        first = take()
        assert where(stream, first) == (0, 0, 128)
        assert take(weights[2]) == (0, 0)  # a weight outside the stream (an adapter's, cuBLAS's) moves nothing
    assert take() == (0, 0)
    with activate(stream):  # each activation is a new step: the plan starts over (graphs bake the same ranges)
        assert take() == first
