"""L2 prefetch (Hopper's ``cp.async.bulk.prefetch.L2``) of the next layer's cached K/V at batch 1.

The stage-by-stage timeline of a batch-1 decode step (engine/kernels/timeline.py; BENCHMARKS.md,
session 10) shows the decode attention waiting ~2.5 us for its cached K/V: its programs become
resident only when the qkv GEMV's programs leave (they fill the SMs' registers), so the K/V loads,
issued first thing, start as o_proj's weight stream (requested early under PDL) starts too, and queue
behind it in HBM. A layer's K/V at batch 1 is small (1 MB for a 0.6B at 256 tokens), so the
attention's idle programs (the splits past a short context, which otherwise exit at once) ask L2
for the *next* layer's K/V blocks; that attention then reads them from L2. The GEMVs load their
weights ``evict_first`` (each weight byte is read once per step), so the K/V survives the ~30 MB of
weights streamed between two attentions. A prefetch is a hint with no result: it changes no value.

Earlier attempts prefetched weights (sessions 6, 8 and this one): weights are what HBM streams at
full speed anyway, and extra weight requests only competed with the kernels' own streams.

The instruction is PTX 8.0 / sm_90: ``prefetch_supported`` compiles and runs a probe once per device;
the wrappers pass the prefetch off wherever it failed (older GPUs, the Triton interpreter, which has
no inline assembly).
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


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """Elementwise: ask L2 for ``nbytes[i]`` bytes at ``ptrs[i]`` (16-byte aligned, a multiple of 16;
    0 issues nothing)."""
    tl.inline_asm_elementwise(_ASM, "=r,l,r", [ptrs, nbytes.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _probe_kernel(ptr, out_ptr):
    offs = tl.arange(0, 4)
    prefetch_l2(ptr + offs * 2048, tl.where(offs < 3, 4096, 0))
    tl.store(out_ptr + tl.program_id(0), 1)


@functools.lru_cache(maxsize=None)
def _probe(index: int) -> bool:
    if triton.knobs.runtime.interpret or torch.cuda.get_device_capability(index) < (9, 0):
        return False
    device = torch.device("cuda", index)
    try:
        data = torch.zeros(1 << 16, dtype=torch.bfloat16, device=device)
        out = torch.zeros(4, dtype=torch.int32, device=device)
        compiled = _probe_kernel[(4,)](data, out, num_warps=4)
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
