"""Paged attention: new K/V go into the block cache, then each query attends over its sequence's cache.

One formulation serves prefill, chunked prefill, prefix-cache hits and decode: a sequence brings
``q_len`` new tokens and has ``context_len`` tokens in the cache after they are stored, so query
``j`` sits at position ``context_len - q_len + j`` and sees every cached token up to it.
The torch path is the numerical reference (and the CPU backend); the Triton path runs on GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.context import Context, get_context
from engine.layers import RMSNorm, RotaryEmbedding


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, D]; caches: [num_blocks, block_size, kv_heads, D]; slot -1 = padding."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float) -> torch.Tensor:
    """q: [T, heads, D] -> [T, heads, D], one SDPA call per sequence over its gathered cache."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    offsets = torch.arange(block_size, device=q.device)
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, kv_len) in enumerate(zip(ctx.seqlens_q, ctx.context_lens_list)):
        num_blocks = (kv_len + block_size - 1) // block_size
        slots = (ctx.block_tables[i, :num_blocks, None].long() * block_size + offsets).flatten()[:kv_len]
        qi = q[start:start + q_len].transpose(0, 1)  # [H, q_len, D]
        ki = k_flat[slots].transpose(0, 1).repeat_interleave(group, dim=0)  # [H, kv_len, D]
        vi = v_flat[slots].transpose(0, 1).repeat_interleave(group, dim=0)
        if q_len == kv_len:  # a whole prompt: plain causal, the same call HF makes
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=q_len > 1, scale=scale)
        elif q_len == 1:  # decode: the query sees the whole cache
            oi = F.scaled_dot_product_attention(qi, ki, vi, scale=scale)
        else:  # a chunk after cached tokens: causal with an offset
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[start:start + q_len] = oi.transpose(0, 1)
        start += q_len
    return out


class PagedAttention(nn.Module):
    """A layer's attention from its fused qkv projection's output: (Qwen3: per-head RMSNorm of q and
    k,) RoPE, the new K/V into the paged cache, then each query over its sequence's cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # views into the engine's one KV tensor, attached by the model runner
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, qkv: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, q_norm: RMSNorm | None = None,
                k_norm: RMSNorm | None = None) -> torch.Tensor:
        """qkv: [T, (heads + 2 * kv_heads) * D] -> [T, heads, D]; ``q_norm``/``k_norm``: Qwen3's."""
        ctx = get_context()
        if ctx.backend == "triton":
            from engine.kernels import paged_attention as kernels
            from engine.kernels.rope_kv import rope_store_kv

            norm = (q_norm.weight, k_norm.weight, q_norm.eps) if q_norm is not None else (None, None, 0.0)
            if ctx.is_decode:  # one kernel: norm + RoPE of q and k, k and v into the cache, attention
                return kernels.rope_decode_attention(qkv, positions, rope.cos, rope.sin, *norm, self.k_cache, self.v_cache,
                                                     ctx.slot_mapping, ctx.block_tables, ctx.context_lens, self.scale,
                                                     self.num_heads, ctx.decode_splits, counters=ctx.split_counters,
                                                     early_kv=True)  # layer 0's qkv GEMV triggers late (model.py)
            # one kernel for norm + RoPE of q and k, and k, v into the cache; then attention
            q = rope_store_kv(qkv, positions, rope.cos, rope.sin, *norm, self.k_cache, self.v_cache, ctx.slot_mapping,
                              self.num_heads, self.num_kv_heads)
            return kernels.prefill_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens,
                                             ctx.cu_seqlens_q, ctx.max_seqlen_q, self.scale)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rope(positions, q, k, q_norm, k_norm)  # Qwen3 normalizes each head before RoPE
        store_kv_torch(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        return paged_attention_torch(q, self.k_cache, self.v_cache, ctx, self.scale)
