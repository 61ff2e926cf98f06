"""Attention prologue in one kernel: per-head RMSNorm of q and k (Qwen3), RoPE, and the KV-cache store.

It reads the fused qkv projection's output ``[T, (heads + 2 * kv_heads) * head_dim]`` and writes the
rotated q ``[T, heads, head_dim]`` plus the rotated k and raw v into the paged caches at
``slot_mapping[t]`` (slot -1, a padded CUDA-graph row: nothing goes to the cache). On the decode
path it replaces two kernels per layer (the torch.compile'd norm + rotary, the KV store) with one.

One program per (token, head): heads ``0 .. heads-1`` are q heads, the next ``kv_heads`` are k heads,
and each k program also copies its v head. In the qkv row, k head ``j`` starts at column
``(heads + j) * head_dim`` and v head ``j`` ``kv_heads * head_dim`` after it, so the program's head
index addresses its input directly.

Numerics are torch eager's (HF's) exactly: each elementwise op is computed in fp32 and rounded to
the activation dtype, in HF's order: ``rms_norm``: ``x.float() * rsqrt(mean(x^2) + eps)``, cast,
then ``weight *`` that; RoPE: the fp32 cos/sin rows cast to the dtype first, then ``x * cos``,
``rotate_half(x) * sin`` and their sum, each rounded. The kernel is compiled without FMA
contraction, so in fp32 ``x * cos + r * sin`` also rounds each product as torch's separate kernels
do. (The sum of squares is taken in fp64 (``head_inv_rms``), not in torch's fp32 order: with q/k
norm, results can differ from torch in the last fp32 bit, which very rarely moves a 16-bit rounding.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import use_pdl


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` and held in fp32 again: one torch 16-bit elementwise op."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def head_inv_rms(x_lo, x_hi, eps, HEAD_DIM: tl.constexpr, AXIS: tl.constexpr):
    """``1 / rms`` of heads from their two halves (fp32 values of 16-bit activations), reduced over
    ``AXIS``. The squares are summed in fp64: a 16-bit value's square is exact, and so is the fp64 sum
    of a head's squares (unless they span more than ~2^37), so the result does not depend on the
    reduction order. The decode kernel (engine/kernels/paged_attention.py) and ``rope_store_kv`` reduce
    with different layouts and must still write bit-identical keys: a token's K may not depend on
    whether a decode step or a mixed prefill step computed it (the prefix cache reuses both)."""
    lo, hi = x_lo.to(tl.float64), x_hi.to(tl.float64)
    total = tl.sum(lo * lo, AXIS) + tl.sum(hi * hi, AXIS)
    return tl.rsqrt(total.to(tl.float32) / HEAD_DIM + eps)


@triton.jit
def head_rms_norm(x_lo, x_hi, w_lo, w_hi, inv_rms, dtype: tl.constexpr):
    """Qwen3's per-head RMSNorm of a head's two halves (fp32 values of ``dtype``), given each head's
    ``1 / rms`` broadcastable to them: HF's order (normalize, cast, then scale by the weight)."""
    return rounded(w_lo * rounded(x_lo * inv_rms, dtype), dtype), rounded(w_hi * rounded(x_hi * inv_rms, dtype), dtype)


@triton.jit
def rope_row(cos_ptr, sin_ptr, position, stride, lo, hi, mask, dtype: tl.constexpr):
    """``(cos_lo, cos_hi, sin_lo, sin_hi)`` of a position's row of the fp32 RoPE tables at the head's
    columns ``lo`` / ``hi``, rounded to ``dtype`` (HF casts the tables before multiplying)."""
    row = position.to(tl.int64) * stride
    return (rounded(tl.load(cos_ptr + row + lo, mask=mask, other=0.0), dtype),
            rounded(tl.load(cos_ptr + row + hi, mask=mask, other=0.0), dtype),
            rounded(tl.load(sin_ptr + row + lo, mask=mask, other=0.0), dtype),
            rounded(tl.load(sin_ptr + row + hi, mask=mask, other=0.0), dtype))


@triton.jit
def rope_halves(x_lo, x_hi, cos_lo, cos_hi, sin_lo, sin_hi, dtype: tl.constexpr):
    """RoPE of a head's halves with ``rotate_half(x) = cat(-x_hi, x_lo)``; cos/sin already rounded to
    ``dtype`` (HF casts the tables first); every product and sum rounded as torch's separate ops."""
    out_lo = rounded(rounded(x_lo * cos_lo, dtype) + rounded(-x_hi * sin_lo, dtype), dtype)
    out_hi = rounded(rounded(x_hi * cos_hi, dtype) + rounded(x_lo * sin_hi, dtype), dtype)
    return out_lo, out_hi


@triton.jit
def _rope_kv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                    qkv_stride, table_stride, eps,
                    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
                    QK_NORM: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    lo = tl.arange(0, HALF_PAD)  # the first half of the head; rotate_half pairs element i with i + HALF
    hi = lo + HALF
    in_half = lo < HALF
    is_q = (lo * 0 + head) < NUM_HEADS  # a block mask (the interpreter rejects a scalar & block mask)
    if QK_NORM:  # norm weights are never written during a step: safe to read before gdc_wait
        w_lo = tl.where(is_q, tl.load(q_norm_ptr + lo, mask=in_half & is_q, other=0.0),
                        tl.load(k_norm_ptr + lo, mask=in_half & ~is_q, other=0.0)).to(tl.float32)
        w_hi = tl.where(is_q, tl.load(q_norm_ptr + hi, mask=in_half & is_q, other=0.0),
                        tl.load(k_norm_ptr + hi, mask=in_half & ~is_q, other=0.0)).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # qkv, positions, slots and the caches belong to the step
    dtype = qkv_ptr.dtype.element_ty
    row = qkv_ptr + token * qkv_stride + head * HEAD_DIM
    x_lo = tl.load(row + lo, mask=in_half, other=0.0).to(tl.float32)
    x_hi = tl.load(row + hi, mask=in_half, other=0.0).to(tl.float32)
    if QK_NORM:
        inv_rms = head_inv_rms(x_lo, x_hi, eps, HEAD_DIM, 0)
        x_lo, x_hi = head_rms_norm(x_lo, x_hi, w_lo, w_hi, inv_rms, dtype)
    cos_lo, cos_hi, sin_lo, sin_hi = rope_row(cos_ptr, sin_ptr, tl.load(pos_ptr + token), table_stride, lo, hi, in_half, dtype)
    out_lo, out_hi = rope_halves(x_lo, x_hi, cos_lo, cos_hi, sin_lo, sin_hi, dtype)
    out_lo, out_hi = out_lo.to(dtype), out_hi.to(dtype)

    # clamped head indices keep the masked-off lanes' addresses inside their tensors
    q_row = q_ptr + token * (NUM_HEADS * HEAD_DIM) + tl.minimum(head, NUM_HEADS - 1) * HEAD_DIM
    tl.store(q_row + lo, out_lo, mask=in_half & is_q)
    tl.store(q_row + hi, out_hi, mask=in_half & is_q)
    slot = tl.load(slot_ptr + token)
    to_cache = in_half & ~is_q & ((lo * 0 + slot) >= 0)
    cache_row = tl.maximum(slot, 0).to(tl.int64) * (NUM_KV_HEADS * HEAD_DIM) + tl.maximum(head - NUM_HEADS, 0) * HEAD_DIM
    tl.store(k_cache_ptr + cache_row + lo, out_lo, mask=to_cache)
    tl.store(k_cache_ptr + cache_row + hi, out_hi, mask=to_cache)
    v_row = row + NUM_KV_HEADS * HEAD_DIM
    tl.store(v_cache_ptr + cache_row + lo, tl.load(v_row + lo, mask=to_cache), mask=to_cache)
    tl.store(v_cache_ptr + cache_row + hi, tl.load(v_row + hi, mask=to_cache), mask=to_cache)


def rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Rotated q ``[T, num_heads, head_dim]`` of ``qkv`` ``[T, (num_heads + 2 * num_kv_heads) * head_dim]``
    (contiguous rows); rotated k and v are stored in ``k_cache``/``v_cache``
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` at ``slot_mapping`` (-1: skipped).
    ``cos``/``sin``: ``[max_positions, head_dim]`` fp32 tables (RotaryEmbedding's); with
    ``q_norm_weight``/``k_norm_weight`` ([head_dim], Qwen3), each q and k head is RMS-normalized first."""
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"rope_store_kv: qkv {tuple(qkv.shape)} (stride {qkv.stride()}) is not [T, "
                         f"({num_heads} + 2 * {num_kv_heads}) * {head_dim}] with contiguous rows")
    if k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"rope_store_kv: caches {tuple(k_cache.shape)} {k_cache.dtype} do not match qkv ({qkv.dtype}, "
                         f"{num_kv_heads} kv heads of {head_dim})")
    if head_dim % 2 or cos.shape[1] != head_dim or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"rope_store_kv: RoPE tables {tuple(cos.shape)} do not fit head_dim {head_dim}")
    qk_norm = q_norm_weight is not None
    if qk_norm and not (q_norm_weight.dtype == k_norm_weight.dtype == qkv.dtype):
        # torch would promote ``weight * x`` to the weight's dtype; the kernel rounds to the activations'
        raise ValueError(f"rope_store_kv: q/k norm weights ({q_norm_weight.dtype}) must be in the activation dtype {qkv.dtype}")
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    pdl = use_pdl(qkv.device)
    _rope_kv_kernel[(num_tokens, num_heads + num_kv_heads)](
        qkv, positions, cos, sin, q_norm_weight if qk_norm else cos, k_norm_weight if qk_norm else cos,
        q, k_cache, v_cache, slot_mapping, qkv.stride(0), cos.stride(0), eps,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), QK_NORM=qk_norm, USE_PDL=pdl,
        # a head is at most a few hundred elements: one warp; no FMA contraction (torch's rounding)
        num_warps=1, enable_fp_fusion=False, launch_pdl=pdl,
    )
    return q
