"""L2 prefetch of the weights the next kernels of a batch-1 decode step will read.

At batch 1 a decode step is a chain of short kernels, and HBM sits idle whenever the chain is not
inside a big projection: during the norm statistics, RoPE and the attention kernels, and during each
small projection's ramp-up and tail (a 0.6B model's o_proj is 1.4 us of traffic inside a ~4 us
kernel). Here every decode-path kernel also asks the L2 to fetch the next few megabytes of weights
(``cp.async.bulk.prefetch.L2``: fire and forget, no registers, nothing waits for it), so the weight
stream keeps going while the chain does latency-bound work, and the projections that follow read
their first tiles from L2. Values are untouched: a prefetch moves data into the cache, nothing else.

``WeightStream`` is the plan: the model's projection weights in decode order (each layer's qkv, o,
gate_up, down, then the LM head), and a cursor. A GEMV moves the cursor to its own weight; every
kernel then prefetches what lies between the frontier (what earlier kernels already asked for) and
``lookahead`` bytes ahead — ahead of the GEMV's start for a GEMV (its own weights are in flight
anyway), ahead of the last GEMV's end for the other kernels. Each launch gets one contiguous range
inside one weight; the rest is the next kernel's. The stream is active only while the model runner
captures the decode graphs of batch sizes the GEMV serves (``activate``); the ranges are baked into
the graphs as kernel arguments, so replays cost nothing on the host.

Kernels take ``pf_addr, pf_bytes`` and a ``PREFETCH`` constexpr and call ``prefetch_l2`` before
their ``gdc_wait`` (weights are never written during a step, so this keeps the PDL contract of
engine/kernels/__init__.py). The Triton interpreter has no inline PTX: wrappers pass ``PREFETCH``
False off CUDA.
"""
from __future__ import annotations

import bisect
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

CHUNK = tl.constexpr(32 * 1024)  # bytes per bulk prefetch instruction


@triton.jit
def prefetch_l2(addr, nbytes, LANES: tl.constexpr):
    """Ask the L2 for ``[addr, addr + nbytes)`` (16-byte multiples), split over every program of the
    grid: ``LANES`` bulk prefetches of up to ``CHUNK`` bytes per program and round."""
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    lanes = tl.arange(0, LANES)
    chunks = tl.cdiv(nbytes, CHUNK)
    rounds = tl.cdiv(chunks, programs * LANES)
    for r in range(rounds):
        chunk = (r * programs + pid) * LANES + lanes
        offset = chunk.to(tl.int64) * CHUNK
        size = tl.minimum(tl.maximum(nbytes - offset, 0), CHUNK).to(tl.int32)
        # predicated: lanes past the end issue nothing (a zero-size bulk copy is not allowed)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [addr + offset, size], dtype=tl.int32, is_pure=False, pack=1)


class WeightStream:
    """The decode-order weights and the prefetch cursor over them (positions grow across steps;
    a position ``p`` is byte ``p % total`` of the concatenated weights)."""

    def __init__(self, weights: list[torch.Tensor], lookahead_bytes: int):
        self.starts: list[int] = []
        self.addrs: list[int] = []
        self.sizes: list[int] = []
        self.index: dict[int, int] = {}  # data_ptr -> segment
        position = 0
        for w in weights:
            if w.data_ptr() in self.index:  # a tied LM head is the embedding: one segment
                continue
            self.index[w.data_ptr()] = len(self.starts)
            size = w.numel() * w.element_size() // 16 * 16
            self.starts.append(position)
            self.addrs.append(w.data_ptr())
            self.sizes.append(size)
            position += size
        self.total = position
        self.lookahead = lookahead_bytes
        self.reset()

    def reset(self) -> None:
        """A new step: the cursor at the first weight, nothing asked for yet."""
        self.start = self.end = self.frontier = 0

    def take(self, weight: torch.Tensor | None = None) -> tuple[int, int]:
        """``(address, bytes)`` for the next kernel to prefetch; ``weight``: the weight that kernel
        streams (a GEMV), None for any other kernel. ``(0, 0)``: nothing to fetch."""
        if not self.total:
            return 0, 0
        horizon = self.end
        if weight is not None:
            segment = self.index.get(weight.data_ptr())
            if segment is None:  # not a stream weight (cuBLAS fallback, an adapter): no change
                return 0, 0
            base = self.start - self.start % self.total
            start = base + self.starts[segment]
            if start < self.start:  # the next step's copy of that weight
                start += self.total
            self.start, self.end = start, start + self.sizes[segment]
            horizon = self.start
        low, high = max(self.frontier, self.end), horizon + self.lookahead
        if high <= low:
            return 0, 0
        offset = low % self.total
        segment = bisect.bisect_right(self.starts, offset) - 1
        within = offset - self.starts[segment]
        size = min(high - low, self.sizes[segment] - within)
        self.frontier = low + size
        return self.addrs[segment] + within, size


_active: WeightStream | None = None


@contextmanager
def activate(stream: WeightStream | None):
    """Kernels launched inside this block prefetch from ``stream`` (None: no prefetching)."""
    global _active
    previous, _active = _active, stream
    if stream is not None:
        stream.reset()
    try:
        yield
    finally:
        _active = previous


def take(weight: torch.Tensor | None = None) -> tuple[int, int]:
    """The launch's prefetch range from the active stream (``(0, 0)``: none)."""
    return _active.take(weight) if _active is not None else (0, 0)


def streaming() -> bool:
    """Whether a weight stream is active (GEMVs then load weights evict-first)."""
    return _active is not None


def lanes(num_warps: int) -> int:
    """Lanes per program: one bulk prefetch per thread."""
    return triton.next_power_of_2(32 * num_warps)
