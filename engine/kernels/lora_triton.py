"""Batched LoRA for decode (BGMV): each token gathers its adapter's A/B by slot, no host sync.

shrink: v[t, p] = A[slot_t, p] @ x[t]            x [T, in], A [S, P, R, in] -> v [T, P, R] fp32
expand: y[t, rows_p] += B[slot_t, rows_p] @ v[t, p]   B [S, out, R] (scale folded in), y in place

Slot -1 is the base model: both kernels return at once for it. One program per (token, part) in
shrink and per (token, part, output block) in expand, so every output element has one writer.
Tested on CPU with TRITON_INTERPRET=1 against the torch segment-gather path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, v_ptr, rank,
                   stride_xt, stride_as, stride_ap, stride_ar, stride_vt, stride_vp,
                   in_features: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # in_features is a compile-time constant: one specialization per projection width (a handful)
    t = tl.program_id(0)
    p = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    a_base = a_ptr + slot * stride_as + p * stride_ap
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + t * stride_xt + k, mask=k < in_features, other=0.0).to(tl.float32)
        a = tl.load(a_base + r[:, None] * stride_ar + k[None, :], mask=(r[:, None] < rank) & (k[None, :] < in_features),
                    other=0.0).to(tl.float32)
        acc += tl.sum(a * xk[None, :], axis=1)
    tl.store(v_ptr + t * stride_vt + p * stride_vp + r, acc, mask=r < rank)


@triton.jit
def _expand_kernel(v_ptr, b_ptr, slots_ptr, y_ptr, offsets_ptr, sizes_ptr, rank,
                   stride_vt, stride_vp, stride_bs, stride_bo, stride_yt,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    p = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    offset = tl.load(offsets_ptr + p)
    size = tl.load(sizes_ptr + p)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    v = tl.load(v_ptr + t * stride_vt + p * stride_vp + r, mask=r < rank, other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + (offset + n)[:, None] * stride_bo + r[None, :],
                mask=(n[:, None] < size) & (r[None, :] < rank), other=0.0).to(tl.float32)
    delta = tl.sum(b * v[None, :], axis=1)
    y_row = y_ptr + t * stride_yt + offset + n
    y = tl.load(y_row, mask=n < size, other=0.0)
    tl.store(y_row, (y.to(tl.float32) + delta).to(y.dtype), mask=n < size)


def bgmv_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    num_tokens, (_, parts, rank, in_features) = x.shape[0], a.shape
    v = torch.empty(num_tokens, parts, rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_tokens, parts)](
        x, a, slots, v, rank, x.stride(0), a.stride(0), a.stride(1), a.stride(2), v.stride(0), v.stride(1),
        in_features=in_features, BLOCK_R=triton.next_power_of_2(rank), BLOCK_K=min(256, triton.next_power_of_2(in_features)))
    return v


def bgmv_expand(v: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor, part_offsets: torch.Tensor,
                part_sizes: torch.Tensor, max_part_size: int) -> torch.Tensor:
    num_tokens, parts, rank = v.shape
    block_n = min(128, triton.next_power_of_2(max_part_size))
    assert y.stride(1) == 1 and b.stride(2) == 1
    _expand_kernel[(num_tokens, parts, triton.cdiv(max_part_size, block_n))](
        v, b, slots, y, part_offsets, part_sizes, rank, v.stride(0), v.stride(1), b.stride(0), b.stride(1), y.stride(0),
        BLOCK_R=triton.next_power_of_2(rank), BLOCK_N=block_n)
    return y
