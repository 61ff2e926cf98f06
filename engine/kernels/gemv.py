"""Skinny GEMM for decode: ``y[M, N] = prologue(x)[M, K] @ W[N, K]^T (+ bias)`` for M <= 8, fp32 accumulation.

At batch 1..8 a projection is a pure weight stream (every weight byte is read once and used M
times), so all a kernel must do is keep enough bytes in flight on every SM; cuBLAS's bf16 M=1
path leaves ~20 % of an H100's copy bandwidth unused. Two inner products, one per config family:

- row (``BLOCK_M == 1``, M = 1 only): a program multiplies [BLOCK_N, BLOCK_K] weight tiles by the
  x vector elementwise into an fp32 accumulator of the same shape, reduced once at the end (no
  shuffles in the loop; the loads are wide because K is the contiguous axis);
- dot (``BLOCK_M == 16``): x padded to 16 rows feeds ``tl.dot``, so Triton's software pipeline
  (``num_stages``) prefetches weight tiles through shared memory.

Split-K: when ``N / BLOCK_N`` programs cannot fill the GPU (o_proj and down_proj of small models),
``SPLIT_K`` programs share an output tile. Each writes an fp32 partial; the last to finish (an
atomic ticket per tile) sums the partials in split order and resets the ticket for the next call.
The fixed order makes results deterministic, so eager steps and CUDA-graph replays agree bit for bit.

Prologues fold the op before a projection into the x load (x is a few KB and stays in L2), and are
elementwise, so no program waits on a reduction before streaming weights:
- ``add_rms_norm`` (qkv_proj, gate_up_proj): ``x = norm_w * rms_norm(x + residual)``, HF's rounding
  order; ``residual`` may be None (the first layer). A one-program-per-row kernel first writes
  ``h = x + residual`` (the residual stream the layer passes on) and each row's 1/rms; the GEMV's
  prologue then only scales. (Re-deriving the row's 1/rms in every program, as an earlier version
  did, put a full-row reduction in front of every program's weight stream: 10-20 % slower than
  cuBLAS + a norm kernel on the 1B shape's qkv and gate_up.)
- ``silu_mul`` (down_proj): ``x = silu(gate) * up`` read from the gate_up output ``[M, 2K]``.

Epilogue ``add_residual`` (o_proj, down_proj in the model): the output tile plus the residual, and
each row's sum of squares over the tile; the next ``add_rms_norm`` GEMV, given those sums, skips the
statistics kernel (the model's decode layers run that way at <= 8 rows). The residual is requested
right after ``gdc_wait``, alongside x, and the bias (a weight) before it: loaded in the epilogue, after
the reduction's CTA barriers, each was one more dependent L2 round trip at the end of the kernel.

Weights load ``evict_first`` (``set_evict_first``): a decode step reads each weight byte once, and the
~1 GB stream would otherwise push out of L2 what the step reuses (H100, session 10: a 0.6B replay
0.653 against 0.678 ms with the default policy, in one process).

PDL (``USE_PDL``, engine/kernels/__init__.py): the first weight tile is loaded before ``gdc_wait``,
so at batch 1 the kernel's launch and first HBM round trip overlap the previous kernel's tail;
everything else (x, the rows' 1/rms, workspace, outputs) waits. The loop's first iteration is peeled to
use that tile, with the same sums in the same order, so results equal the kernel without PDL.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import timeline, use_pdl

MAX_M = 8  # beyond this the weight tile is reused enough that cuBLAS's GEMM wins
PROLOGUES = ("none", "add_rms_norm", "silu_mul")
_PROLOGUE_ID = {name: i for i, name in enumerate(PROLOGUES)}


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # 1: row kernel (M = 1 only); 16: tl.dot kernel
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        kind = "row" if self.block_m == 1 else "dot"
        return f"{kind} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps}"


@triton.jit
def _load_x(x_ptr, norm_ptr, inv_rms, offs_m, mask_m, k, mask_k, x_stride, K, PROLOGUE: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of prologue(x) at columns ``k``, in the weight's dtype. Arithmetic
    is fp32 with a rounding to the dtype after each op, as torch computes 16-bit elementwise ops, so
    the values equal the unfused path's (HF's)."""
    mask = mask_m[:, None] & mask_k[None, :]
    ptrs = x_ptr + offs_m[:, None] * x_stride + k[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    dtype = x.dtype
    if PROLOGUE == 1:  # add_rms_norm (x is h = x + residual): normalize in fp32, cast back, then scale (HF order)
        normed = (x.to(tl.float32) * inv_rms[:, None]).to(dtype)
        scale = tl.load(norm_ptr + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        x = (scale * normed.to(tl.float32)).to(dtype)
    elif PROLOGUE == 2:  # silu_mul: gate is the first K columns, up the next K
        gate = x.to(tl.float32)
        up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        x = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype)
    return x


@triton.jit
def _add_rounded(a, b):
    """``a + b`` computed in fp32 and rounded to a's dtype (torch's 16-bit add)."""
    return (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)


@triton.jit
def _rms_stats_kernel(x_ptr, res_ptr, h_ptr, inv_ptr, K, x_stride, eps,
                      HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """One program per row: ``h = x + residual`` (rounded to the dtype, stored when there is a residual)
    and ``1 / rms(h)`` in fp32, for the GEMV's ``add_rms_norm`` prologue."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # x and the residual belong to the step
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    mask = k < K
    x = tl.load(x_ptr + row * x_stride + k, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = _add_rounded(x, tl.load(res_ptr + row * K + k, mask=mask, other=0.0))
        tl.store(h_ptr + row * K + k, x, mask=mask)
    xf = x.to(tl.float32)
    tl.store(inv_ptr + row, tl.rsqrt(tl.sum(xf * xf, 0) / K + eps))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, inv_ptr, norm_ptr, part_ptr, ticket_ptr, res_ptr, stats_out_ptr,
                 M, N, K, x_stride, stats_in_tiles, eps,
                 PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STATS_IN: tl.constexpr, STATS_PAD: tl.constexpr,
                 ADD_RESIDUAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 K_TILES: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr, LATE_TRIGGER: tl.constexpr,
                 EARLY_EPILOGUE: tl.constexpr, stamp_ptr, STAMPS: tl.constexpr, EVICT: tl.constexpr):
    started = timeline.now(STAMPS)
    if USE_PDL and not LATE_TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    tile = tl.program_id(0)
    split = tl.program_id(1)
    program = tile * SPLIT_K + split  # the timeline's row
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:  # a weight: read before gdc_wait, off the epilogue's critical path
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if USE_PDL:
        # the first weight tile streams in while the previous kernel finishes: weights are the only
        # input no kernel of the step writes (x, the row's 1/rms, the split-K workspace wait for gdc_wait).
        # (Its addresses repeat w_rows/k_first below, which stay where they were so that the code
        # without PDL compiles exactly as before; the compiler merges the two.)
        k0 = split * (K_TILES * BLOCK_K) + tl.arange(0, BLOCK_K)
        w0 = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + k0[None, :], mask=mask_n[:, None] & (k0 < K)[None, :],
                     other=0.0, eviction_policy=EVICT)
        tl.extra.cuda.gdc_wait()
        if LATE_TRIGGER:  # the next kernel starts only once the previous one has completed (see gemv())
            tl.extra.cuda.gdc_launch_dependents()
    released = timeline.now(STAMPS)
    residual = tl.zeros([BLOCK_M, BLOCK_N], y_ptr.dtype.element_ty)
    if ADD_RESIDUAL and EARLY_EPILOGUE:
        # requested with x, not after the reduction: the epilogue's add then waits on no L2 round trip
        # of its own (the reduction's CTA barriers keep the compiler from hoisting a load above them)
        residual = tl.load(res_ptr + out_offs, mask=out_mask, other=0.0)
    inv_rms = tl.zeros([BLOCK_M], tl.float32)
    if PROLOGUE == 1:
        if STATS_IN:  # x is already h: 1/rms from the producing GEMV's per-tile sums of squares, in a fixed order
            offs_t = tl.arange(0, STATS_PAD)
            sums = tl.load(inv_ptr + offs_m[:, None] * stats_in_tiles + offs_t[None, :],
                           mask=mask_m[:, None] & (offs_t < stats_in_tiles)[None, :], other=0.0)
            inv_rms = tl.rsqrt(tl.sum(sums, 1) / K + eps)
        else:
            inv_rms = tl.load(inv_ptr + offs_m, mask=mask_m, other=0.0)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K  # int64: an LM head has > 2^31 weights
    k_first = split * (K_TILES * BLOCK_K)
    # with PDL, tile 0 is peeled off the loop (it uses w0); the sums keep the same order either way
    T0: tl.constexpr = 1 if USE_PDL else 0
    if BLOCK_M == 1:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if USE_PDL:
            x = _load_x(x_ptr, norm_ptr, inv_rms, offs_m, mask_m, k0, k0 < K, x_stride, K, PROLOGUE)
            acc2 += w0.to(tl.float32) * x.to(tl.float32)
        for t in range(T0, K_TILES):
            k = k_first + t * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = k < K
            w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0, eviction_policy=EVICT)
            x = _load_x(x_ptr, norm_ptr, inv_rms, offs_m, mask_m, k, mask_k, x_stride, K, PROLOGUE)
            acc2 += w.to(tl.float32) * x.to(tl.float32)  # x: [1, BLOCK_K] broadcasts over the rows
        acc = tl.sum(acc2, 1)[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if USE_PDL:
            x = _load_x(x_ptr, norm_ptr, inv_rms, offs_m, mask_m, k0, k0 < K, x_stride, K, PROLOGUE)
            acc = tl.dot(x, tl.trans(w0), acc, input_precision=PRECISION)
        for t in range(T0, K_TILES):
            k = k_first + t * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = k < K
            w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0, eviction_policy=EVICT)
            x = _load_x(x_ptr, norm_ptr, inv_rms, offs_m, mask_m, k, mask_k, x_stride, K, PROLOGUE)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    timeline.mark(stamp_ptr, program, 0, STAMPS)  # the product is reduced
    if ADD_RESIDUAL and not EARLY_EPILOGUE:
        residual = tl.load(res_ptr + out_offs, mask=out_mask, other=0.0)
    if SPLIT_K > 1:
        tl.store(part_ptr + split * M * N + out_offs, acc, mask=out_mask)
        # every thread's partial is written before the ticket's release (one thread performs the
        # scalar atomic); acq_rel then makes all partials visible to the program that draws the last ticket
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + tile, 1)
        if ticket == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT_K):  # fixed order: deterministic sums
                acc += tl.load(part_ptr + s * M * N + out_offs, mask=out_mask, other=0.0, cache_modifier=".cg")
            _store_out(y_ptr, bias, residual, stats_out_ptr, acc, tile, tl.num_programs(0), offs_m, mask_m, out_offs, out_mask,
                       HAS_BIAS, ADD_RESIDUAL)
            tl.atomic_xchg(ticket_ptr + tile, 0)  # ready for the next call (and the next graph replay)
    else:
        _store_out(y_ptr, bias, residual, stats_out_ptr, acc, tile, tl.num_programs(0), offs_m, mask_m, out_offs, out_mask,
                   HAS_BIAS, ADD_RESIDUAL)
    timeline.stamp(stamp_ptr, program, started, released, STAMPS)


@triton.jit
def _store_out(y_ptr, bias, residual, stats_ptr, acc, tile, num_tiles, offs_m, mask_m, out_offs, out_mask,
               HAS_BIAS: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    """The output tile, rounded to the dtype; with ADD_RESIDUAL, ``h = y + residual`` (rounded as torch's
    16-bit add) instead, plus each row's sum of h^2 over the tile for the next norm (fp32, one slot per tile).
    ``bias`` [BLOCK_N] fp32 and ``residual`` [BLOCK_M, BLOCK_N] are values the kernel loaded earlier."""
    if HAS_BIAS:
        acc += bias[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    if ADD_RESIDUAL:
        y = _add_rounded(y, residual)
        yf = tl.where(out_mask, y.to(tl.float32), 0.0)
        tl.store(stats_ptr + offs_m * num_tiles + tile, tl.sum(yf * yf, 1), mask=mask_m)
    tl.store(y_ptr + out_offs, y, mask=out_mask)


_early_epilogue = True
_evict_first = True


def set_evict_first(enabled: bool) -> None:
    """Process-wide: load weights ``evict_first`` (each weight byte is read once per decode step, so L2
    keeps what the step reuses: activations, norm statistics, split partials, the K/V cache) or with the
    default policy (benchmarks A/B the two; the model runner recaptures its graphs)."""
    global _evict_first
    _evict_first = bool(enabled)


def set_early_epilogue(enabled: bool) -> None:
    """Process-wide: load the epilogue's residual right after ``gdc_wait`` (with x) or, as before
    session 9, after the reduction (benchmarks A/B the two; the model runner recaptures its graphs)."""
    global _early_epilogue
    _early_epilogue = bool(enabled)


class Workspace:
    """Split-K scratch shared by every GEMV on a device: fp32 partials and one ticket per output tile.
    Kernels on one stream run one after another and each leaves its tickets at 0, so one buffer
    serves them all. Sized once, before any graph capture (graphs hold its address)."""

    def __init__(self, device: torch.device):
        self.partials = torch.empty(0, dtype=torch.float32, device=device)
        self.tickets = torch.zeros(0, dtype=torch.int32, device=device)

    def reserve(self, n: int, config: GemvConfig) -> None:
        partials = config.split_k * MAX_M * n if config.split_k > 1 else 0
        tiles = triton.cdiv(n, config.block_n)
        if partials > self.partials.numel():
            self.partials = torch.empty(partials, dtype=torch.float32, device=self.partials.device)
        if tiles > self.tickets.numel():
            self.tickets = torch.zeros(tiles, dtype=torch.int32, device=self.tickets.device)

    def fits(self, n: int, config: GemvConfig) -> bool:
        partials = config.split_k * MAX_M * n if config.split_k > 1 else 0
        return partials <= self.partials.numel() and triton.cdiv(n, config.block_n) <= self.tickets.numel()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig, workspace: Workspace,
         prologue: str = "none", residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, stats: torch.Tensor | None = None, add_residual: torch.Tensor | None = None,
         late_trigger: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``prologue(x) @ weight.T + bias`` for x [M <= 8, K] (``silu_mul``: [M, 2K]); ``add_rms_norm``
    also returns the new residual stream ``x + residual`` (``x`` itself when residual is None).

    The residual add can move to the producing GEMV instead (one kernel per norm fewer): with
    ``add_residual`` [M, N] the result is ``(h, stats)``, ``h = y + add_residual`` and ``stats`` each
    row's partial sums of h^2 per output tile; an ``add_rms_norm`` GEMV given ``stats`` (and no
    residual) takes x as that h and derives each row's 1/rms from them, without the stats kernel.

    ``late_trigger`` (PDL): let the next kernel launch only after this one's ``gdc_wait``, i.e. once
    every kernel before this one has completed — so the next kernel may read, before its own
    ``gdc_wait``, anything those kernels wrote (the decode attention after the qkv projection reads the
    step's lengths, block tables and cached K/V early)."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    _check(x, weight, config, workspace, prologue, k)
    y = torch.empty(m, n, dtype=weight.dtype, device=x.device)
    pdl = use_pdl(x.device)
    inv_rms = y  # unused unless add_rms_norm
    if prologue == "add_rms_norm" and stats is not None:
        if residual is not None or stats.shape[0] != m or stats.dtype != torch.float32 or not stats.is_contiguous():
            raise ValueError(f"gemv: stats {tuple(stats.shape)} {stats.dtype} must be the producing GEMV's fp32 [{m}, tiles] "
                             "sums for an x that already holds the residual (residual=None)")
        inv_rms = stats
    elif prologue == "add_rms_norm":
        h = torch.empty(m, k, dtype=x.dtype, device=x.device) if residual is not None else x
        inv_rms = torch.empty(m, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(k)
        _rms_stats_kernel[(m,)](x, residual if residual is not None else x, h, inv_rms, k, x.stride(0), eps,
                                HAS_RESIDUAL=residual is not None, BLOCK_K=block, USE_PDL=pdl,
                                num_warps=8 if block >= 4096 else 4, launch_pdl=pdl)
        x = h
    tiles = triton.cdiv(n, config.block_n)
    stats_out = y  # unused unless add_residual
    if add_residual is not None:
        if tuple(add_residual.shape) != (m, n) or not add_residual.is_contiguous() or add_residual.dtype != weight.dtype:
            raise ValueError(f"gemv: add_residual {tuple(add_residual.shape)} must be a contiguous [{m}, {n}] {weight.dtype} tensor")
        stats_out = torch.empty(m, tiles, dtype=torch.float32, device=x.device)
    stats_in_tiles = stats.shape[1] if stats is not None else 1
    k_tiles = triton.cdiv(k, config.split_k * config.block_k)
    grid = (tiles, config.split_k)
    stamps, recording = timeline.claim(f"gemv {n}x{k}", tiles * config.split_k, m, y)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else y, y, inv_rms,
        norm_weight if norm_weight is not None else weight, workspace.partials, workspace.tickets,
        add_residual if add_residual is not None else y, stats_out,
        m, n, k, x.stride(0), stats_in_tiles, eps,
        PROLOGUE=_PROLOGUE_ID[prologue], HAS_BIAS=bias is not None, STATS_IN=stats is not None,
        STATS_PAD=triton.next_power_of_2(stats_in_tiles), ADD_RESIDUAL=add_residual is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        K_TILES=k_tiles, PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", USE_PDL=pdl, LATE_TRIGGER=late_trigger,
        EARLY_EPILOGUE=_early_epilogue, stamp_ptr=stamps, STAMPS=recording, EVICT="evict_first" if _evict_first else "",
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    if add_residual is not None:
        return y, stats_out
    if prologue == "add_rms_norm":
        return y, x  # x is now the residual stream h (the input itself when there was no residual)
    return y


def _check(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig, workspace: Workspace, prologue: str, k: int) -> None:
    if prologue not in PROLOGUES:
        raise ValueError(f"gemv prologue {prologue!r} is not one of {PROLOGUES}")
    if not 1 <= x.shape[0] <= MAX_M or (config.block_m == 1 and x.shape[0] != 1):
        raise ValueError(f"gemv: {x.shape[0]} rows do not fit config {config} (row kernel: 1 row; dot kernel: 1..{MAX_M})")
    expected = 2 * k if prologue == "silu_mul" else k
    if x.shape[1] != expected or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"gemv: x {tuple(x.shape)} (stride {x.stride()}) does not match weight {tuple(weight.shape)} "
                         f"with prologue {prologue!r}; x rows and the weight must be contiguous")
    if not workspace.fits(weight.shape[0], config):
        raise ValueError(f"gemv: workspace was not reserved for N={weight.shape[0]} with {config}")


def candidate_configs(n: int, k: int, m: int, num_sms: int) -> list[GemvConfig]:
    """A handful of configs for one (N, K, M): each shape family with the split-K that gives the
    grid about four programs per SM (capped so every split keeps at least one K tile)."""
    # (block_m, block_n, block_k, warps, stages); few on purpose: each is a Triton compile at start-up.
    # The row configs are the winners of bench/gemv_sweep.py on an H100 (BENCHMARKS.md): a tile grid with
    # long K tiles for the 0.6B gate_up and with short ones for the LM head; every other projection of the
    # 0.6B and 1B shapes streams fastest with whole-slice programs (``whole_slice_configs``)
    shapes = [(16, 32, 128, 4, 4), (16, 64, 64, 4, 4)]
    if m == 1:
        shapes += [(1, 8, 512, 4, 2), (1, 8, 128, 8, 2)]
    configs = [GemvConfig(block_m, block_n, block_k, split_k_for(n, k, block_n, block_k, num_sms), warps, stages)
               for block_m, block_n, block_k, warps, stages in shapes]
    if m == 1:
        configs += whole_slice_configs(k)
    return configs


def split_k_for(n: int, k: int, block_n: int, block_k: int, num_sms: int, per_sm: int = 4) -> int:
    """The split-K (a power of two, at most 16) that gives the grid about ``per_sm`` programs per SM,
    capped so every split keeps at least one K tile."""
    tiles, split = triton.cdiv(n, block_n), 1
    while tiles * split < per_sm * num_sms and split * 2 * block_k <= k and split < 16:
        split *= 2
    return split


def whole_slice_configs(k: int) -> list[GemvConfig]:
    """Row configs whose program reads its whole K slice as one tile (``K_TILES == 1``): with PDL every
    weight byte of the kernel is requested before ``gdc_wait``, so none of its HBM round trips waits
    for the previous kernel, and with one split per 1-2K columns there is little or no split-K
    reduction. A [BLOCK_N, BLOCK_K] tile of at most 16K elements keeps it in registers."""
    out = []
    for block_k, block_n, warps in ((2048, 2, 4), (2048, 4, 8), (2048, 8, 8), (1024, 4, 4), (1024, 8, 8), (4096, 4, 8)):
        if block_k <= triton.next_power_of_2(k) and (block_k < 4096 or k >= 8192):
            out.append(GemvConfig(1, block_n, block_k, triton.cdiv(k, block_k), warps, 1))
    # programs of one or two warps (the 0.6B's gate_up): bench/gemv_sweep.py's winners on an H100 (BENCHMARKS.md,
    # session 9). Its one-row o_proj winner is left out: with it the decode step was 2 % slower end to end
    # although the tuner, timing each projection alone, preferred it — likely because, as the residual's
    # producer, it writes one sum of squares per row block and the next norm's GEMV then reads twice as many.
    if k <= 1024:
        out += [GemvConfig(1, block_n, triton.next_power_of_2(k), 1, warps, 1) for block_n, warps in ((4, 2), (4, 1), (8, 1))]
    # one masked tile over all of a K above 2048 (3072: the 0.6B's down_proj; 8192: the 1B's): no split-K,
    # so no partials, ticket or second reduction round trip at the end of the kernel
    whole = triton.next_power_of_2(k)
    for block_n in (2, 4):
        config = GemvConfig(1, block_n, whole, 1, 8, 1)
        if whole > 2048 and block_n * whole <= 16384 and config not in out:
            out.append(config)
    return out
