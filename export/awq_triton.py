"""Triton int4 kernels for AutoAWQ GEMM checkpoints: ``y = x @ dequant(qweight)`` (= x @ W^T).

Layout (export/awq.py): ``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/g, N/8], ``scales`` fp16
[K/g, N]; output column j of each 8 sits in nibble ``(j >> 1) + 4 * (j & 1)`` (AWQ order).

Two paths, picked by the number of rows M (tokens) of x:

* ``M <= FUSED_MAX_M`` (decode): a fused dequant-GEMM with split-K. Decode is bound by weight bytes,
  and an [N / BLOCK_N] grid alone gives SmolLM2's 576..3072-wide layers 9..48 programs for 132 SMs,
  so the K loop is cut into ``split_k`` slices of whole groups; each program writes an fp32 partial
  sum and a second small kernel adds the slices in a fixed order. That keeps results deterministic
  (CUDA-graph replays and eager steps agree bit for bit, which atomic adds would not).
  One K step is one quantization group: its zeros and scales are loaded once per [group, BLOCK_N]
  tile, each int32 word once per 8 columns (expanded in registers by interleaving), and the scale
  multiplies the dot product rather than the weights,
      sum_k x_k (q_kn - z_n) s_n  =  s_n * sum_k x_k (q_kn - z_n),
  so the tensor-core operand ``q - z`` is a small integer, exact in bf16/fp16, and the multiply
  runs on a [BLOCK_M, BLOCK_N] tile instead of a [group, BLOCK_N] one.
* larger M (prefill): dequantize once into a [K, N] buffer in x's dtype with a Triton kernel and
  let cuBLAS do the GEMM (what vLLM does): a compute-bound GEMM gains nothing from int4 bytes.

Tile sizes come from ``fused_config``, a pure function of (M, N, K, group, SM count), rather than
``triton.autotune``: autotuning picks by timing noise, and a different split count changes the
summation order, so two engine processes could produce different tokens.

On CPU, set ``TRITON_INTERPRET=1`` before importing this module to run the same kernels in numpy.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FUSED_MAX_M = 32  # rows up to which the fused kernel beats dequantize + cuBLAS (bench/export_gpu.py measures both)
PROGRAMS_PER_SM = 2  # split-K target: enough programs in flight to cover memory latency


@triton.jit
def _expand_words(words):
    """int32 [..., C] -> [..., 8C]: every packed word repeated for the 8 columns it holds."""
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    return tl.interleave(words, words)


@triton.jit
def _nibble_shifts(BLOCK_N: tl.constexpr):
    col = tl.arange(0, BLOCK_N) % 8
    return ((col >> 1) + (col & 1) * 4) * 4


@triton.jit
def _awq_fused_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, n_words,
                      stride_xm, stride_qk, stride_zg, stride_sg, stride_om, stride_split,
                      GROUP: tl.constexpr, GROUPS_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    offs_k = tl.arange(0, GROUP)
    mask_m, mask_n, mask_w = offs_m < M, offs_n < N, offs_w < n_words
    shifts = _nibble_shifts(BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(GROUPS_PER_SPLIT):
        g = pid_k * GROUPS_PER_SPLIT + i
        ks = g * GROUP + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None], other=0.0)
        words = tl.load(qw_ptr + ks[:, None] * stride_qk + offs_w[None, :], mask=mask_w[None, :], other=0)
        q = (_expand_words(words) >> shifts[None, :]) & 0xF
        z = (_expand_words(tl.load(qz_ptr + g * stride_zg + offs_w, mask=mask_w, other=0)) >> shifts) & 0xF
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = (q - z[None, :]).to(x.dtype)  # integers in [-15, 15]: exact in any float type
        acc += tl.dot(x, w, input_precision=DOT_PRECISION) * s[None, :]
    out = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over the split-K slices of ``partial`` [SPLIT_K, numel], always in slice order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(partial_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _awq_dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, n_words, stride_qk, stride_zg, stride_sg, stride_wk,
                        GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [group, BLOCK_N] tile of W^T = (q - z) * s, written in w's dtype."""
    g, pid_n = tl.program_id(0), tl.program_id(1)
    rows = g * GROUP + tl.arange(0, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    mask_n, mask_w = offs_n < N, offs_w < n_words
    shifts = _nibble_shifts(BLOCK_N)
    words = tl.load(qw_ptr + rows[:, None] * stride_qk + offs_w[None, :], mask=mask_w[None, :], other=0)
    q = (_expand_words(words) >> shifts[None, :]) & 0xF
    z = (_expand_words(tl.load(qz_ptr + g * stride_zg + offs_w, mask=mask_w, other=0)) >> shifts) & 0xF
    s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    w = (q - z[None, :]).to(tl.float32) * s[None, :]
    tl.store(w_ptr + rows[:, None] * stride_wk + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# Launch parameters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedConfig:
    block_m: int
    block_n: int
    split_k: int
    groups_per_split: int


def fused_config(M: int, N: int, K: int, group: int, num_sms: int, split_k: int | None = None) -> FusedConfig:
    """Tiles for the fused kernel: the smallest M tile tl.dot takes, then enough K slices that the
    grid holds about ``PROGRAMS_PER_SM`` programs per SM. Every slice gets the same number of whole
    groups (a divisor of the group count), so the kernel's K loop needs no bounds check."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 128 if triton.cdiv(N, 128) >= num_sms else 64
    n_groups = K // group
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    wanted = max(1, min(split_k or triton.cdiv(PROGRAMS_PER_SM * num_sms, tiles), n_groups))
    per_split = max(d for d in range(1, n_groups // wanted + 1) if n_groups % d == 0)
    return FusedConfig(block_m, block_n, n_groups // per_split, per_split)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: a few programs, so tests exercise split-K


def _check_shapes(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> None:
    K, n_words = qweight.shape
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight/qzeros must be int32 (got {qweight.dtype}, {qzeros.dtype})")
    if K % group or group % 16:
        raise ValueError(f"group size {group} must be a multiple of 16 dividing in_features {K}")
    if qzeros.shape != (K // group, n_words) or scales.shape != (K // group, 8 * n_words):
        raise ValueError(f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} with group {group}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the AWQ weight expects {K}")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def awq_gemm_fused(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
                   split_k: int | None = None) -> torch.Tensor:
    """x2 [M, K] (contiguous) -> [M, N] in x2's dtype through the fused split-K kernel."""
    (M, K), N = x2.shape, 8 * qweight.shape[1]
    if M == 0:
        return x2.new_empty(0, N)
    cfg = fused_config(M, N, K, group, _num_sms(x2.device), split_k)
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    target = out if cfg.split_k == 1 else torch.empty(cfg.split_k, M, N, dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), cfg.split_k)
    _awq_fused_kernel[grid](x2, qweight, qzeros, scales, target, M, N, N // 8,
                            x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), N, M * N,
                            GROUP=group, GROUPS_PER_SPLIT=cfg.groups_per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                            DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", num_warps=4, num_stages=3)
    if cfg.split_k > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](target, out, M * N, SPLIT_K=cfg.split_k, BLOCK=block)
    return out


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The [K, N] weight (W^T) in ``dtype``, dequantized on the device by a Triton kernel."""
    K, N = qweight.shape[0], 8 * qweight.shape[1]
    w = torch.empty(K, N, dtype=dtype, device=qweight.device)
    block_n = 64
    _awq_dequant_kernel[(K // group, triton.cdiv(N, block_n))](
        qweight, qzeros, scales, w, N, N // 8, qweight.stride(0), qzeros.stride(0), scales.stride(0), w.stride(0),
        GROUP=group, BLOCK_N=block_n, num_warps=4)
    return w


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
             split_k: int | None = None, fused_max_m: int = FUSED_MAX_M) -> torch.Tensor:
    """x [..., K] @ W^T with W the AWQ-dequantized [N, K] weight; returns [..., N] in x's dtype."""
    _check_shapes(x, qweight, qzeros, scales, group)
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.shape[0] <= fused_max_m:
        out = awq_gemm_fused(x2, qweight, qzeros, scales, group, split_k)
    else:
        out = x2 @ awq_dequantize(qweight, qzeros, scales, group, x2.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])
