"""The rest of a decoder layer after attention, at batch 1, as one persistent kernel.

At batch 1 every projection is a few-microsecond weight stream, and each kernel boundary between
them costs about as much again: the next kernel's programs start streaming only once the previous
grid is nearly done, and its results wait for the whole grid to complete. This kernel runs the
layer's last three projections in one launch of one program per SM:

  stage 0  h2  = o_proj(attn) + residual              (and per-tile sums of h2^2)
  stage 1  act = silu(gate) * up of gate_up(rms_norm(h2))   (1/rms from those sums, in tile order)
  stage 2  out = down_proj(act) + h2                  (and per-tile sums of out^2 for the next layer's norm)

Each program takes row tiles round-robin (a tile is whole rows, so no split-K sums), streams the
next tile while reducing the current one, and between stages meets the others at a grid barrier: an
arrival counter (release), spun on with acquire atomics. Before it waits it has already requested
its first tile of the next stage — weights are the one input no stage writes — so HBM keeps
streaming across the barrier where a kernel boundary would leave it idle. Values written by other
programs (h2, act, the sums) are read through L2 (``.cg``). Arithmetic and roundings are those of
the unfused GEMV path (engine/kernels/gemv.py: the ``add_rms_norm``/``silu_mul`` prologues and the
``add_residual`` epilogue), so the two agree up to fp32 summation order.

A grid barrier needs every program resident at once: one program per SM, and the grid is launched
with PDL (engine/kernels/__init__.py), whose next kernel starts only once all of these programs
have, so nothing can take their place. The counters (two per launch) return to zero at the end —
the last program to leave resets them — so CUDA-graph replays reuse them. The Triton interpreter
runs programs one after another, where a barrier would never open: there (and for tests) each
stage can be its own launch (``stages=``), the kernel boundary standing in for the barrier.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import use_pdl
from engine.kernels.gemv import _add_rounded

TILE_BYTES = 32768  # weight bytes per tile: two in flight per program (64 KB per SM) keep HBM busy


@triton.jit
def _row_tile(w_ptr, tile, N, K, BN: tl.constexpr, BK: tl.constexpr):
    """Rows ``tile * BN ...`` of a row-major [N, K] weight (zeros past N or K; a tile past the end loads nothing)."""
    rows = tile * BN + tl.arange(0, BN)
    cols = tl.arange(0, BK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _grid_barrier(count_ptr, target):
    """Wait until ``target`` programs have arrived at ``count_ptr`` (this one included). Every thread's
    stores precede the release (CTA barrier first); the acquire makes the others' visible after it."""
    tl.debug_barrier()
    tl.atomic_add(count_ptr, 1, sem="release")
    arrived = tl.atomic_add(count_ptr, 0, sem="acquire")
    while arrived < target:
        arrived = tl.atomic_add(count_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _layer_tail_kernel(attn_ptr, res_ptr, wo_ptr, norm_ptr, wgu_ptr, wd_ptr, h2_ptr, act_ptr, sums_ptr, out_ptr,
                       sums_out_ptr, count_ptr, HIDDEN, Q_SIZE, INTER, eps,
                       BN_O: tl.constexpr, BK_O: tl.constexpr, TILES_O: tl.constexpr, BN_U: tl.constexpr,
                       BK_U: tl.constexpr, TILES_U: tl.constexpr, BN_D: tl.constexpr, BK_D: tl.constexpr,
                       TILES_D: tl.constexpr, SUMS_PAD: tl.constexpr, PROGRAMS: tl.constexpr, FIRST: tl.constexpr,
                       LAST: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # ---- stage 0: h2 = o_proj(attn) + residual
    if FIRST == 0:
        w_o = _row_tile(wo_ptr, pid, HIDDEN, Q_SIZE, BN_O, BK_O)  # weights: requested before waiting for attention
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        cols_o = tl.arange(0, BK_O)
        x_o = tl.load(attn_ptr + cols_o, mask=cols_o < Q_SIZE, other=0.0).to(tl.float32)
        for i in range(0, TILES_O, PROGRAMS):  # tile pid + i (a tile past the end touches nothing)
            tile_o = pid + i
            w_next_o = _row_tile(wo_ptr, tile_o + PROGRAMS, HIDDEN, Q_SIZE, BN_O, BK_O)
            rows_o = tile_o * BN_O + tl.arange(0, BN_O)
            mask_o = rows_o < HIDDEN
            y_o = tl.sum(w_o.to(tl.float32) * x_o[None, :], 1).to(dtype)
            h_o = _add_rounded(y_o, tl.load(res_ptr + rows_o, mask=mask_o, other=0.0))
            tl.store(h2_ptr + rows_o, h_o, mask=mask_o)
            hf_o = tl.where(mask_o, h_o.to(tl.float32), 0.0)
            tl.store(sums_ptr + tile_o, tl.sum(hf_o * hf_o, 0), mask=tile_o < TILES_O)
            w_o = w_next_o
    # ---- stage 1: act = silu(gate) * up, of gate_up(rms_norm(h2))
    if FIRST <= 1 and LAST >= 1:
        gate_w = _row_tile(wgu_ptr, pid, INTER, HIDDEN, BN_U, BK_U)
        up_w = _row_tile(wgu_ptr + INTER * HIDDEN, pid, INTER, HIDDEN, BN_U, BK_U)
        if FIRST == 1:
            if USE_PDL:
                tl.extra.cuda.gdc_wait()
        else:
            _grid_barrier(count_ptr, PROGRAMS)
        offs_u = tl.arange(0, SUMS_PAD)
        sums_u = tl.load(sums_ptr + offs_u, mask=offs_u < TILES_O, other=0.0, cache_modifier=".cg")
        inv_rms_u = tl.rsqrt(tl.sum(sums_u, 0) / HIDDEN + eps)
        cols_u = tl.arange(0, BK_U)
        mask_k_u = cols_u < HIDDEN
        h_u = tl.load(h2_ptr + cols_u, mask=mask_k_u, other=0.0, cache_modifier=".cg")
        normed_u = (h_u.to(tl.float32) * inv_rms_u).to(dtype)  # HF order: normalize in fp32, cast, then scale
        x_u = (tl.load(norm_ptr + cols_u, mask=mask_k_u, other=0.0).to(tl.float32) * normed_u.to(tl.float32)).to(dtype)
        x_u = x_u.to(tl.float32)
        for i in range(0, TILES_U, PROGRAMS):
            tile_u = pid + i
            gate_next = _row_tile(wgu_ptr, tile_u + PROGRAMS, INTER, HIDDEN, BN_U, BK_U)
            up_next = _row_tile(wgu_ptr + INTER * HIDDEN, tile_u + PROGRAMS, INTER, HIDDEN, BN_U, BK_U)
            rows_u = tile_u * BN_U + tl.arange(0, BN_U)
            gate_u = tl.sum(gate_w.to(tl.float32) * x_u[None, :], 1).to(dtype).to(tl.float32)
            up_u = tl.sum(up_w.to(tl.float32) * x_u[None, :], 1).to(dtype).to(tl.float32)
            act_u = ((gate_u / (1.0 + tl.exp(-gate_u))).to(dtype).to(tl.float32) * up_u).to(dtype)
            tl.store(act_ptr + rows_u, act_u, mask=rows_u < INTER)
            gate_w = gate_next
            up_w = up_next
    # ---- stage 2: out = down_proj(act) + h2
    if LAST == 2:
        w_d = _row_tile(wd_ptr, pid, HIDDEN, INTER, BN_D, BK_D)
        if FIRST == 2:
            if USE_PDL:
                tl.extra.cuda.gdc_wait()
        else:
            _grid_barrier(count_ptr, 2 * PROGRAMS)
        cols_d = tl.arange(0, BK_D)
        x_d = tl.load(act_ptr + cols_d, mask=cols_d < INTER, other=0.0, cache_modifier=".cg").to(tl.float32)
        for i in range(0, TILES_D, PROGRAMS):
            tile_d = pid + i
            w_next_d = _row_tile(wd_ptr, tile_d + PROGRAMS, HIDDEN, INTER, BN_D, BK_D)
            rows_d = tile_d * BN_D + tl.arange(0, BN_D)
            mask_d = rows_d < HIDDEN
            y_d = tl.sum(w_d.to(tl.float32) * x_d[None, :], 1).to(dtype)
            h_d = _add_rounded(y_d, tl.load(h2_ptr + rows_d, mask=mask_d, other=0.0, cache_modifier=".cg"))
            tl.store(out_ptr + rows_d, h_d, mask=mask_d)
            hf_d = tl.where(mask_d, h_d.to(tl.float32), 0.0)
            tl.store(sums_out_ptr + tile_d, tl.sum(hf_d * hf_d, 0), mask=tile_d < TILES_D)
            w_d = w_next_d
    if FIRST < LAST:  # the last program out resets both counters for the next launch (or graph replay)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + 1, 1) == PROGRAMS - 1:
            tl.atomic_xchg(count_ptr, 0)
            tl.atomic_xchg(count_ptr + 1, 0)


def _tile(n: int, k: int, element_size: int) -> tuple[int, int, int]:
    """(rows per tile, padded K, tiles) for a [n, k] weight: whole rows, about ``TILE_BYTES`` per tile."""
    bk = triton.next_power_of_2(k)
    bn = max(1, min(16, TILE_BYTES // (bk * element_size)))
    bn = 1 << (bn.bit_length() - 1)  # a power of two
    return bn, bk, triton.cdiv(n, bn)


def supports(hidden: int, q_size: int, inter: int) -> bool:
    """Whether whole-row tiles stay small enough to hold in registers (K up to 8192)."""
    return max(hidden, q_size, inter) <= 8192


def layer_tail(attn: torch.Tensor, residual: torch.Tensor, o_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
               gate_up_weight: torch.Tensor, down_weight: torch.Tensor, counters: torch.Tensor, programs: int,
               stages: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, sums)`` for one token: ``out = h2 + down(silu(gate) * up)`` with ``gate, up =
    gate_up(rms_norm(h2))`` and ``h2 = residual + o_proj(attn)``; ``sums`` [1, tiles] are the per-tile
    sums of out^2 (the next ``add_rms_norm`` GEMV's ``stats``). ``attn`` [1, q_size] and ``residual``
    [1, hidden] contiguous; ``counters``: two int32 zeros this launch owns. ``stages``: run the stages
    as separate launches, each (first, last) pair one launch — ((0, 0), (1, 1), (2, 2)) for the
    interpreter; None runs all three in one launch with grid barriers."""
    hidden, q_size = o_weight.shape
    inter = down_weight.shape[1]
    if attn.shape != (1, q_size) or residual.shape != (1, hidden) or gate_up_weight.shape != (2 * inter, hidden):
        raise ValueError(f"layer_tail: attn {tuple(attn.shape)}, residual {tuple(residual.shape)} and gate_up "
                         f"{tuple(gate_up_weight.shape)} do not fit o_proj {tuple(o_weight.shape)} / down {tuple(down_weight.shape)}")
    if not (attn.is_contiguous() and residual.is_contiguous()) or counters.dtype != torch.int32 or counters.numel() < 2:
        raise ValueError("layer_tail: attn and residual must be contiguous, counters two int32 entries")
    size = o_weight.element_size()
    bn_o, bk_o, tiles_o = _tile(hidden, q_size, size)
    bn_u, bk_u, tiles_u = _tile(inter, hidden, 2 * size)  # a tile is gate rows + the matching up rows
    bn_d, bk_d, tiles_d = _tile(hidden, inter, size)
    dev, dtype = attn.device, o_weight.dtype
    h2 = torch.empty(hidden, dtype=dtype, device=dev)
    act = torch.empty(inter, dtype=dtype, device=dev)
    sums = torch.empty(tiles_o, dtype=torch.float32, device=dev)
    out = torch.empty(1, hidden, dtype=dtype, device=dev)
    sums_out = torch.empty(1, tiles_d, dtype=torch.float32, device=dev)
    pdl = use_pdl(dev)
    for first, last in stages or ((0, 2),):
        _layer_tail_kernel[(programs,)](
            attn, residual, o_weight, norm_weight, gate_up_weight, down_weight, h2, act, sums, out, sums_out, counters,
            hidden, q_size, inter, eps,
            BN_O=bn_o, BK_O=bk_o, TILES_O=tiles_o, BN_U=bn_u, BK_U=bk_u, TILES_U=tiles_u, BN_D=bn_d, BK_D=bk_d,
            TILES_D=tiles_d, SUMS_PAD=triton.next_power_of_2(tiles_o), PROGRAMS=programs, FIRST=first, LAST=last, USE_PDL=pdl,
            num_warps=16, num_stages=1, launch_pdl=pdl,
        )
    return out, sums_out
