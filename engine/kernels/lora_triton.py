"""Multi-LoRA delta (segmented SGMV): ``y[t] += B[slot_t] @ (A[slot_t] @ x[t])`` as TWO launches per
projection (shrink, then expand), for prefill and decode alike, the split Punica / S-LoRA / vLLM use.

The step's tokens are grouped by adapter slot (``Segments``): ``rows`` lists the token rows sorted by
slot and each work item is a block of up to ``BLOCK_M`` rows of one slot.

1. ``_shrink_kernel``, grid (items, KSPLIT): program (w, ks) computes the partial
   ``v = X[rows, krange] @ A[slot][:, krange]^T`` over its ~256-wide slice of the input features for
   all fused parts at once (A viewed as [parts*R, in], so q/k/v or gate/up share one matmul), in fp32,
   and stores it to ``vbuf[ks, p, :]`` (p = the row's position in ``rows``; an fp32 [KSPLIT, T,
   BLOCK_PR] buffer, a few KB, that stays in L2).
2. ``_expand_kernel``, grid (items, cdiv(out, BLOCK_N)): program (w, nt) sums the KSPLIT partials of its
   rows, casts v to the model dtype (the precision of the base matmul) and adds ``v @ Bd^T`` to its
   BLOCK_N output columns, where ``Bd`` is the block-diagonal [out, parts*R] view of B (column block p
   is non-zero only on the output rows of part p), so every part is one tl.dot.

Why two kernels: at decode the delta is latency-bound, not bandwidth- or FLOP-bound. The former single
fused kernel (one program per item and column range: shrink over the WHOLE input dimension, then
expand) ran a serial chain of in/64 shrink iterations (16 for in=1024, 48 for in=3072) before its
expand, and every column split redid that shrink; measured on an H200 (torch.profiler, Qwen3-0.6B,
rank 16, 64-256 decode tokens) it cost 13-18 us per call against ~5 us for the base cuBLAS GEMM of the
same projection, which put serving with adapters at 0.34-0.79x of the base model. Splitting the
reduction over the input (KSPLIT programs of ~256 features each, at most 8) cuts the shrink's chain to
a few iterations spread over many more programs, the shrink runs once per item instead of once per
column split, and each expand program is one short dot over its BLOCK_N columns. Prefill tiles (64
rows) have plenty of items, so they keep KSPLIT = 1 (no partial sums to add).

Rows of one tile share their adapter's weights (read once per tile, not once per token as a per-token
BGMV gather does). Items with slot -1 (padding of a captured graph's fixed-size work list) return at
once in both kernels; rows of base tokens are in no item, so they keep the base output. Every (row,
column) of ``y`` has exactly one writer and the partial sums are added in a fixed order: the result is
deterministic, with no atomics. Both launches have compile-time shapes and no host syncs, so they are
captured in CUDA graphs as they are (the intermediate comes from ``torch.empty``, i.e. the graph pool).

Checked on CPU with TRITON_INTERPRET=1 against the torch reference ``engine.lora.lora_delta_grouped``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # shrink reduction tile
# Input features one shrink program reduces (rounded to BLOCK_K). Decode has few work items (one
# adapter x 256 tokens = 16 items), so its input is split finely to fill the GPU: on an H200 the
# single-adapter case, with 256-feature splits, ran at 0.745x base against 0.80-0.90x for 8-32 adapters.
DECODE_K_RANGE, MAX_DECODE_KSPLIT = 128, 16
PREFILL_K_RANGE, MAX_PREFILL_KSPLIT = 512, 8  # prefill has many items: coarse splits, few partials to sum
PREFILL_BLOCK_M = 64  # the prefill row tile


@triton.jit
def _work_item(rows_ptr, item_slot_ptr, item_lo_ptr, item_hi_ptr, BLOCK_M: tl.constexpr):
    """Work item ``program_id(0)``: its adapter slot (-1: nothing to do), its positions ``m`` in
    ``rows`` (at most BLOCK_M), which of them are in the item, and the token rows they hold."""
    item = tl.program_id(0)
    slot = tl.load(item_slot_ptr + item)
    lo = tl.load(item_lo_ptr + item)
    hi = tl.load(item_hi_ptr + item)
    m = lo + tl.arange(0, BLOCK_M)
    row_ok = (m < hi) & (slot >= 0)
    rows = tl.load(rows_ptr + m, mask=row_ok, other=0).to(tl.int64)
    return slot, m, row_ok, rows


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, v_ptr, rows_ptr, item_slot_ptr, item_lo_ptr, item_hi_ptr,
                   stride_xt, stride_as, stride_vk,
                   IN_FEATURES: tl.constexpr, K_PER_SPLIT: tl.constexpr, RANK: tl.constexpr, PARTS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_PR: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    slot, m, row_ok, rows = _work_item(rows_ptr, item_slot_ptr, item_lo_ptr, item_hi_ptr, BLOCK_M)
    if slot < 0:  # padding item of a captured graph's fixed-size work list
        return

    # partial v[BLOCK_M, parts*R] = X[rows, krange] @ A[slot][:, krange]^T (A[slot] is [parts*R, in], row-major)
    j = tl.arange(0, BLOCK_PR)  # column of v: part j // RANK, rank j % RANK
    j_ok = j < PARTS * RANK
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    k_start = tl.program_id(1) * K_PER_SPLIT
    v = tl.zeros([BLOCK_M, BLOCK_PR], dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        k = k_start + k0 + tl.arange(0, BLOCK_K)
        k_ok = k < IN_FEATURES
        x = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_t = tl.load(a_base + j[None, :] * IN_FEATURES + k[:, None], mask=j_ok[None, :] & k_ok[:, None], other=0.0)
        v += tl.dot(x, a_t, input_precision=PRECISION)
    v_tile = v_ptr + tl.program_id(1) * stride_vk + m[:, None] * BLOCK_PR + j[None, :]
    tl.store(v_tile, v, mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def _expand_kernel(v_ptr, b_ptr, y_ptr, rows_ptr, item_slot_ptr, item_lo_ptr, item_hi_ptr,
                   stride_vk, stride_bs, stride_bo, stride_yt,
                   OUT_FEATURES: tl.constexpr, KSPLIT: tl.constexpr, RANK: tl.constexpr, PARTS: tl.constexpr,
                   PART1: tl.constexpr, PART2: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_PR: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    slot, m, row_ok, rows = _work_item(rows_ptr, item_slot_ptr, item_lo_ptr, item_hi_ptr, BLOCK_M)
    if slot < 0:  # padding item of a captured graph's fixed-size work list
        return

    # v = the sum of the shrink's partials (fixed order: deterministic), then the model dtype like the base matmul
    j = tl.arange(0, BLOCK_PR)
    j_ok = j < PARTS * RANK
    v_mask = row_ok[:, None] & j_ok[None, :]
    v_tile = v_ptr + m[:, None] * BLOCK_PR + j[None, :]
    v = tl.load(v_tile, mask=v_mask, other=0.0)
    for ks in tl.static_range(1, KSPLIT):
        v += tl.load(v_tile + ks * stride_vk, mask=v_mask, other=0.0)
    v = v.to(y_ptr.dtype.element_ty)

    # y[rows, n] += v @ Bd[n, :]^T over this program's BLOCK_N output columns
    part_of_j = j // RANK
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < OUT_FEATURES
    part_of_n = (n >= PART1).to(tl.int32) + (n >= PART2).to(tl.int32)
    on_diagonal = (part_of_j[:, None] == part_of_n[None, :]) & j_ok[:, None] & n_ok[None, :]
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    bd_t = tl.load(b_base + n[None, :] * stride_bo + (j % RANK)[:, None], mask=on_diagonal, other=0.0)
    delta = tl.dot(v, bd_t, input_precision=PRECISION)
    y_tile = y_ptr + rows[:, None] * stride_yt + n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_tile, mask=mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


def shrink_splits(in_features: int, block_m: int) -> tuple[int, int]:
    """(KSPLIT, K_PER_SPLIT): the shrink's input range per program is about ``DECODE_K_RANGE`` features
    for decode tiles and ``PREFILL_K_RANGE`` for prefill tiles (a multiple of BLOCK_K), in a bounded
    number of splits."""
    prefill = block_m >= PREFILL_BLOCK_M
    k_range, max_split = (PREFILL_K_RANGE, MAX_PREFILL_KSPLIT) if prefill else (DECODE_K_RANGE, MAX_DECODE_KSPLIT)
    ksplit = min(max_split, triton.cdiv(in_features, k_range))
    k_per_split = triton.cdiv(triton.cdiv(in_features, ksplit), BLOCK_K) * BLOCK_K
    return triton.cdiv(in_features, k_per_split), k_per_split  # no split left empty by the rounding


def expand_block_n(block_m: int) -> int:
    """Output columns per expand program: 128 for decode tiles (fewer, fuller programs), 64 for prefill."""
    return 64 if block_m >= PREFILL_BLOCK_M else 128


def sgmv_lora(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, output_sizes: list[int],
              rows: torch.Tensor, item_slot: torch.Tensor, item_lo: torch.Tensor, item_hi: torch.Tensor,
              block_m: int) -> torch.Tensor:
    """Add every work item's LoRA delta to ``y`` in place and return it.

    x [T, in], y [T, out] (row stride free, unit column stride); a [S, parts, R, in] and b [S, out, R]
    contiguous, B already scaled; rows [T] integer token rows sorted by slot; item_* [W] integer work items
    (slot, first and end position in ``rows``), slot -1 = nothing to do; ``block_m`` rows per item.
    """
    parts, rank, in_features = a.shape[1], a.shape[2], a.shape[3]
    out_features = b.shape[1]
    if not (a.is_contiguous() and b.is_contiguous() and x.stride(1) == 1 and y.stride(1) == 1):
        raise ValueError("sgmv_lora: A and B must be contiguous and x, y must have unit column stride")
    if parts > 3:
        raise ValueError(f"sgmv_lora: at most 3 fused parts are supported (got {parts})")
    bounds = [sum(output_sizes[:p + 1]) for p in range(parts)] + [out_features] * (3 - parts)
    num_items = item_slot.shape[0]
    ksplit, k_per_split = shrink_splits(in_features, block_m)
    block_pr = max(16, triton.next_power_of_2(parts * rank))
    block_n = expand_block_n(block_m)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 models stay exact; bf16 ignores it
    # partial shrinks, fp32, indexed by position in rows; positions of base tokens are never written or read
    vbuf = torch.empty(ksplit, rows.shape[0], block_pr, dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_items, ksplit)](
        x, a, vbuf, rows, item_slot, item_lo, item_hi, x.stride(0), a.stride(0), vbuf.stride(0),
        IN_FEATURES=in_features, K_PER_SPLIT=k_per_split, RANK=rank, PARTS=parts,
        BLOCK_M=block_m, BLOCK_PR=block_pr, BLOCK_K=BLOCK_K, PRECISION=precision)
    _expand_kernel[(num_items, triton.cdiv(out_features, block_n))](
        vbuf, b, y, rows, item_slot, item_lo, item_hi, vbuf.stride(0), b.stride(0), b.stride(1), y.stride(0),
        OUT_FEATURES=out_features, KSPLIT=ksplit, RANK=rank, PARTS=parts, PART1=bounds[0], PART2=bounds[1],
        BLOCK_M=block_m, BLOCK_PR=block_pr, BLOCK_N=block_n, PRECISION=precision)
    return y
