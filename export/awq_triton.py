"""Triton int4 dequant-GEMM for AutoAWQ GEMM checkpoints: ``y = x @ dequant(qweight).T``.

The weight never exists in fp16 in global memory: each program loads a [BLOCK_K, BLOCK_N] tile of
packed int32 words, unpacks the nibbles in registers (AWQ order 0,2,4,6,1,3,5,7, so output column j
sits in nibble (j >> 1) + 4*(j & 1)), applies the tile's group zero/scale and feeds ``tl.dot``. At
decode (M <= 32) the GEMM is bound by weight bytes, which is where int4 wins over bf16 (~3.5x fewer).

BLOCK_K divides the group size, so each K tile needs one row of zeros and scales.
On CPU, set ``TRITON_INTERPRET=1`` before importing this module to run the same kernel in numpy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _awq_gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N,
                     stride_xm, stride_xk, stride_qk, stride_zg, stride_sg, stride_om,
                     K: tl.constexpr, group: tl.constexpr,  # per-layer constants: the K loop unrolls/pipelines
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    packed_col = offs_n // 8
    shift = (((offs_n % 8) >> 1) + ((offs_n % 8) & 1) * 4) * 4  # nibble of column j in AWQ order

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
        words = tl.load(qw_ptr + ks[:, None] * stride_qk + packed_col[None, :], mask=mask_n[None, :], other=0)
        q = (words >> shift[None, :]) & 0xF
        g = k0 // group
        zwords = tl.load(qz_ptr + g * stride_zg + packed_col, mask=mask_n, other=0)
        z = (zwords >> shift) & 0xF
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(x.dtype)
        acc += tl.dot(x, w)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])


def _block_k(group: int, K: int) -> int:
    for b in (64, 32, 16):
        if group % b == 0 and K % b == 0:
            return b
    raise ValueError(f"group size {group} / in_features {K} need a common divisor among 64, 32, 16")


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
             block_m: int = 16, block_n: int = 64) -> torch.Tensor:
    """x [..., K] @ W^T with W the AWQ-dequantized [N, K] weight; returns [..., N] in x's dtype."""
    K, N = qweight.shape[0], qweight.shape[1] * 8
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the AWQ weight expects {K}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    scales = scales.contiguous()
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _awq_gemm_kernel[grid](x2, qweight.contiguous(), qzeros.contiguous(), scales, out, M, N,
                           x2.stride(0), x2.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
                           K=K, group=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(group, K))
    return out.reshape(*x.shape[:-1], N)
