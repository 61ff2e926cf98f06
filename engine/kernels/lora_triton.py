"""Fused multi-LoRA delta (segmented SGMV): ``y[t] += B[slot_t] @ (A[slot_t] @ x[t])`` in ONE launch per
projection, for prefill and decode alike.

The step's tokens are grouped by adapter slot (``Segments``): ``rows`` lists the token rows sorted by
slot and each work item is a block of up to ``BLOCK_M`` rows of one slot. A program takes one work
item and one range of output columns, and

1. shrinks: ``v = X[rows] @ A[slot]^T`` over all fused parts at once (A viewed as [parts*R, in], so
   q/k/v or gate/up share one matmul), accumulated in fp32;
2. expands: ``y[rows, n] += v @ Bd^T`` where ``Bd`` is the block-diagonal [out, parts*R] view of B
   (column block p is non-zero only on the output rows of part p), so every part is one tl.dot.

Rows of one tile share their adapter's weights (read once per tile, not once per token as a
per-token BGMV gather does), and no intermediate goes through global memory. Programs that split the
output columns each redo the small shrink (R*in MACs per row) instead of paying a second launch.
Items with slot -1 (padding of a captured graph's fixed-size work list) return at once; rows of base
tokens are in no item, so they keep the base output. Every (row, column) has exactly one writer.

Checked on CPU with TRITON_INTERPRET=1 against the torch reference ``engine.lora.lora_delta_grouped``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # shrink reduction tile
BLOCK_N = 64  # expand output-column tile


@triton.jit
def _sgmv_kernel(x_ptr, a_ptr, b_ptr, y_ptr, rows_ptr, item_slot_ptr, item_lo_ptr, item_hi_ptr,
                 stride_xt, stride_as, stride_bs, stride_bo, stride_yt,
                 IN_FEATURES: tl.constexpr, OUT_FEATURES: tl.constexpr, COLS_PER_SPLIT: tl.constexpr, RANK: tl.constexpr, PARTS: tl.constexpr, PART1: tl.constexpr, PART2: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_PR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    # the widths are compile-time constants: one specialization per projection shape (a handful)
    item = tl.program_id(0)
    slot = tl.load(item_slot_ptr + item)
    if slot < 0:
        return
    lo = tl.load(item_lo_ptr + item)
    hi = tl.load(item_hi_ptr + item)
    m = lo + tl.arange(0, BLOCK_M)
    row_ok = m < hi
    rows = tl.load(rows_ptr + m, mask=row_ok, other=0).to(tl.int64)

    # shrink: v[BLOCK_M, parts*R] = X[rows] @ A[slot]^T (A[slot] is [parts*R, in], row-major)
    j = tl.arange(0, BLOCK_PR)  # column of v: part j // RANK, rank j % RANK
    j_ok = j < PARTS * RANK
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    v = tl.zeros([BLOCK_M, BLOCK_PR], dtype=tl.float32)
    for k0 in range(0, IN_FEATURES, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < IN_FEATURES
        x = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_t = tl.load(a_base + j[None, :] * IN_FEATURES + k[:, None], mask=j_ok[None, :] & k_ok[:, None], other=0.0)
        v += tl.dot(x, a_t, input_precision=PRECISION)
    v = v.to(x_ptr.dtype.element_ty)  # the expand runs in the model dtype, like the base matmul

    # expand over this program's output columns: y[rows, n] += v @ Bd[n, :]^T
    part_of_j = j // RANK
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    n_start = tl.program_id(1) * COLS_PER_SPLIT
    for n0 in range(0, COLS_PER_SPLIT, BLOCK_N):
        n = n_start + n0 + tl.arange(0, BLOCK_N)
        n_ok = n < OUT_FEATURES
        part_of_n = (n >= PART1).to(tl.int32) + (n >= PART2).to(tl.int32)
        on_diagonal = (part_of_j[:, None] == part_of_n[None, :]) & j_ok[:, None] & n_ok[None, :]
        bd_t = tl.load(b_base + n[None, :] * stride_bo + (j % RANK)[:, None], mask=on_diagonal, other=0.0)
        delta = tl.dot(v, bd_t, input_precision=PRECISION)
        y_tile = y_ptr + rows[:, None] * stride_yt + n[None, :]
        mask = row_ok[:, None] & n_ok[None, :]
        y = tl.load(y_tile, mask=mask, other=0.0)
        tl.store(y_tile, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


def columns_per_program(out_features: int, block_m: int) -> int:
    """Output columns one program expands. Decode-sized tiles (few items) split the columns finely so
    enough programs run; prefill tiles (many items) take wide ranges, so the shrink is redone rarely.
    Two fixed choices keep the kernel at two specializations per projection shape."""
    per_program = 256 if block_m <= 16 else 1024
    return min(per_program, triton.cdiv(out_features, BLOCK_N) * BLOCK_N)


def sgmv_lora(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, output_sizes: list[int],
              rows: torch.Tensor, item_slot: torch.Tensor, item_lo: torch.Tensor, item_hi: torch.Tensor,
              block_m: int) -> torch.Tensor:
    """Add every work item's LoRA delta to ``y`` in place and return it.

    x [T, in], y [T, out] (row stride free, unit column stride); a [S, parts, R, in] and b [S, out, R]
    contiguous, B already scaled; rows [T] int32 token rows sorted by slot; item_* [W] int32 work items
    (slot, first and end position in ``rows``), slot -1 = nothing to do; ``block_m`` rows per item.
    """
    parts, rank, in_features = a.shape[1], a.shape[2], a.shape[3]
    out_features = b.shape[1]
    if not (a.is_contiguous() and b.is_contiguous() and x.stride(1) == 1 and y.stride(1) == 1):
        raise ValueError("sgmv_lora: A and B must be contiguous and x, y must have unit column stride")
    if parts > 3:
        raise ValueError(f"sgmv_lora: at most 3 fused parts are supported (got {parts})")
    bounds = [sum(output_sizes[:p + 1]) for p in range(parts)] + [out_features] * (3 - parts)
    cols_per_split = columns_per_program(out_features, block_m)
    grid = (item_slot.shape[0], triton.cdiv(out_features, cols_per_split))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 models stay exact; bf16 ignores it
    _sgmv_kernel[grid](
        x, a, b, y, rows, item_slot, item_lo, item_hi, x.stride(0), a.stride(0), b.stride(0), b.stride(1), y.stride(0),
        IN_FEATURES=in_features, OUT_FEATURES=out_features, COLS_PER_SPLIT=cols_per_split, RANK=rank, PARTS=parts,
        PART1=bounds[0], PART2=bounds[1], BLOCK_M=block_m,
        BLOCK_PR=max(16, triton.next_power_of_2(parts * rank)), BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, PRECISION=precision)
    return y
