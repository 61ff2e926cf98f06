"""L2 prefetch (Hopper's ``cp.async.bulk.prefetch.L2``) of weights a later kernel of the step reads.

A batch-1 decode layer streams its weights in four GEMVs, but between the qkv GEMV and o_proj the
decode attention runs for several microseconds with almost nothing for HBM to do: its K/V is a few
hundred KB and o_proj's weights (requested early under PDL) take ~1.4 us on a 0.6B. The stage-by-stage
timeline (engine/kernels/timeline.py; BENCHMARKS.md, session 10) shows the next GEMVs' programs cannot
be resident that early, so their weight streams start only when the attention and o_proj are nearly
done. So the attention's idle programs (the context splits past a short context, which otherwise exit
at once) ask L2 for the MLP's weights; gate_up and down then read them from L2. A prefetch is a hint
with no result: it changes no value, only timing.

Earlier attempts prefetched from every GEMV, one or two projections ahead (sessions 6 and 8): there the
requests competed with the GEMVs' own weight streams, which the PDL chain already overlapped, and lost.

``prefetch_l2`` deals a range out in pieces of at least 4 KB over the participating programs' threads;
each thread issues at most one bulk prefetch (16-byte granules; ``cp.async.bulk`` needs 16-byte
alignment, which a torch allocation and every granule offset keep). The instruction is PTX 8.0 / sm_90:
``prefetch_supported`` compiles and runs a probe once per device; the wrappers pass ``PREFETCH=False``
wherever it failed (older GPUs, the Triton interpreter, which has no inline assembly).
"""
from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

_ASM = tl.constexpr("""{
.reg .pred p;
setp.gt.s32 p, $2, 0;
@p cp.async.bulk.prefetch.L2.global [$1], $2;
mov.b32 $0, 0;
}""")
_MIN_GRANULES = tl.constexpr(256)  # 16-byte granules per bulk prefetch, at least (4 KB: a smaller one costs about as much)


@triton.jit
def prefetch_l2(ptr, numel, index, count, GRANULE: tl.constexpr, THREADS: tl.constexpr):
    """Ask L2 for participant ``index``'s share of ``ptr[0:numel]`` among ``count`` participating
    programs (``GRANULE`` elements = 16 bytes; ``THREADS`` = the program's thread count): pieces of at
    least 4 KB dealt round-robin (piece ``t * count + index`` to thread ``t``); threads without one issue nothing."""
    granules = (numel + GRANULE - 1) // GRANULE
    per_thread = tl.maximum((granules + count * THREADS - 1) // (count * THREADS), _MIN_GRANULES) * GRANULE
    start = (tl.arange(0, THREADS) * count + index).to(tl.int64) * per_thread
    pieces = tl.minimum(tl.maximum(numel - start, 0), per_thread)
    nbytes = (pieces // GRANULE * 16).to(tl.int32)  # whole granules: a ragged tail (< 16 bytes) is not worth a fetch
    tl.inline_asm_elementwise(_ASM, "=r,l,r", [ptr + start, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _probe_kernel(ptr, numel, out_ptr, GRANULE: tl.constexpr, THREADS: tl.constexpr):
    prefetch_l2(ptr, numel, tl.program_id(0), tl.num_programs(0), GRANULE, THREADS)
    tl.store(out_ptr + tl.program_id(0), 1)


def granule(tensor: torch.Tensor) -> int:
    """Elements per 16 bytes of ``tensor``."""
    return max(16 // tensor.element_size(), 1)


@functools.lru_cache(maxsize=None)
def _probe(index: int) -> bool:
    if triton.knobs.runtime.interpret or torch.cuda.get_device_capability(index) < (9, 0):
        return False
    device = torch.device("cuda", index)
    try:
        data = torch.zeros(1 << 16, dtype=torch.bfloat16, device=device)
        out = torch.zeros(4, dtype=torch.int32, device=device)
        compiled = _probe_kernel[(4,)](data, data.numel() - 8, out, GRANULE=granule(data), THREADS=128, num_warps=4)
        torch.cuda.synchronize(device)
        if "cp.async.bulk.prefetch.L2" not in compiled.asm["ptx"] or int(out.sum()) != 4:
            raise RuntimeError("the probe kernel did not emit or run the prefetch")
        return True
    except Exception as e:  # a compiler or driver without the instruction: the kernels run without it
        warnings.warn(f"L2 prefetch is off on cuda:{index}: {type(e).__name__}: {str(e)[:200]}")
        return False


def prefetch_supported(device: torch.device | str) -> bool:
    """Whether ``prefetch_l2`` compiles and runs on ``device`` (CUDA, compute capability >= 9)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.is_current_stream_capturing() and _probe.cache_info().currsize == 0:
        return False  # the probe launches a kernel, which a graph capture must not record (the runner probes first)
    return _probe(index)
