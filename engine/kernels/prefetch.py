"""L2 prefetch of the next projection's weights (Hopper's ``cp.async.bulk.prefetch.L2``).

At batch 1 a decode step is a chain of small weight streams (a Qwen3-0.6B projection is 4-12 MB,
1.3-4 us of HBM traffic) separated by kernel boundaries, and HBM idles at every boundary: a kernel
requests its weights only once it runs, and it runs only once its predecessor is nearly done. So
every decode-path GEMV first asks L2 to fetch the weights of the projection ``ahead`` places later in
the step (``ModelRunner`` links them: ``Linear.prefetch``) and then streams its own, which the
kernel before it asked for: the weight stream keeps going across boundaries, and each kernel reads
its weights from L2. A prefetch is a hint with no result — it changes no value, only timing.

``prefetch_l2`` splits the range evenly over every thread of the grid; each thread issues one bulk
prefetch (16-byte granules; ``cp.async.bulk`` needs 16-byte alignment, which a torch allocation and
every granule offset keep). The instruction is PTX 8.0 / sm_90: ``prefetch_supported`` compiles and
runs a probe once per device and the wrappers pass ``PREFETCH=False`` anywhere it failed (older GPUs,
the Triton interpreter, which has no inline assembly).
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
def prefetch_l2(ptr, numel, GRANULE: tl.constexpr, THREADS: tl.constexpr):
    """Ask L2 for this program's share of ``ptr[0:numel]`` (``GRANULE`` elements = 16 bytes; ``THREADS``
    = the program's thread count, so each thread issues exactly one prefetch)."""
    programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    granules = (numel + GRANULE - 1) // GRANULE
    per_thread = (granules + programs * THREADS - 1) // (programs * THREADS) * GRANULE  # elements
    start = (pid * THREADS + tl.arange(0, THREADS)).to(tl.int64) * per_thread
    count = tl.minimum(tl.maximum(numel - start, 0), per_thread)
    nbytes = (count // GRANULE * 16).to(tl.int32)  # whole granules: a ragged tail (< 16 bytes) is not worth a fetch
    tl.inline_asm_elementwise(_ASM, "=r,l,r", [ptr + start, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _probe_kernel(ptr, numel, out_ptr, GRANULE: tl.constexpr, THREADS: tl.constexpr):
    prefetch_l2(ptr, numel, GRANULE, THREADS)
    tl.store(out_ptr + tl.program_id(0), 1)


def granule(tensor: torch.Tensor) -> int:
    """Elements per 16 bytes of ``tensor``."""
    return max(16 // tensor.element_size(), 1)


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    if triton.knobs.runtime.interpret or torch.cuda.get_device_capability(index) < (9, 0):
        return False
    device = torch.device("cuda", index)
    try:
        data = torch.zeros(1 << 16, dtype=torch.bfloat16, device=device)
        out = torch.zeros(4, dtype=torch.int32, device=device)
        compiled = _probe_kernel[(4,)](data, data.numel() - 8, out, GRANULE=granule(data), THREADS=128, num_warps=4)
        torch.cuda.synchronize(device)
        emitted = "cp.async.bulk.prefetch.L2" in compiled.asm["ptx"]
        if not emitted or int(out.sum()) != 4:
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
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def link_prefetch(weights: list[torch.Tensor], ahead: int, max_bytes: int = 64 << 20) -> list[torch.Tensor | None]:
    """For projections in step order, the weight each one prefetches: the one ``ahead`` places later,
    wrapping around (the last projections of a step — the LM head — prefetch the first layer's for the
    next step). ``ahead`` 0 turns prefetching off. A target over ``max_bytes`` (an LM head larger than
    L2 would evict what it is meant to keep) is cut to its first ``max_bytes``."""
    if ahead <= 0 or len(weights) < 2:
        return [None] * len(weights)
    out = []
    for i in range(len(weights)):
        target = weights[(i + ahead) % len(weights)]
        limit = max(max_bytes // target.element_size(), 1)
        out.append(target.reshape(-1)[:limit] if target.numel() > limit else target)
    return out
