"""Triton kernels: KV-cache store, paged decode attention (GQA), paged varlen prefill attention.

Caches are ``[num_blocks, block_size, kv_heads, head_dim]``. Both attention kernels gather K/V
rows through the block table (``slot = table[pos // block_size] * block_size + pos % block_size``),
so the tile size is independent of the block size. Softmax is the online (flash) form in fp32.

The engine's decode steps call ``rope_decode_attention``: the decode kernel reads the qkv rows and
does ``rope_store_kv``'s work itself (one launch per layer fewer at batch 1); ``decode_attention``
takes already-rotated queries (the kernel-level benches and tests). Prefill steps run
``rope_store_kv`` and then the prefill kernel.

At small batches the decode kernel splits each context over several programs (``decode_splits``);
the split that finishes last merges the partials (an arrival counter per sequence and K/V head), so
a decode layer's attention is one launch.

A split's first block ids are requested together with the context length (``set_early_table``), not
after it: the K/V rows are then two dependent loads from the program's start instead of three (H100,
session 10: a 0.6B replay 0.653 against 0.677 ms, in one process).

The decode-path kernels (decode attention, its split combine) take ``USE_PDL``
(engine/kernels/__init__.py): they read only the step's activations and caches, so each waits for
its predecessor before its first load and only lets the next kernel's launch start early.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import timeline, use_pdl
from engine.kernels.rope_kv import head_inv_rms, head_rms_norm, rope_halves, rope_row

_LOG2E = 1.4426950408889634


def _precision(q: torch.Tensor) -> str:
    # fp32 engines are the exact path: keep dot products in full fp32 instead of TF32
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_stride, v_stride,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    offs = tl.arange(0, BLOCK)
    # slot -1: a padded CUDA-graph row. Broadcast the slot test to a block mask (the interpreter of
    # newer Tritons rejects a scalar & block mask)
    mask = (offs < WIDTH) & ((offs * 0 + slot) >= 0)
    slot = tl.maximum(slot, 0).to(tl.int64)
    tl.store(k_cache_ptr + slot * WIDTH + offs, tl.load(k_ptr + token * k_stride + offs, mask=mask), mask=mask)
    tl.store(v_cache_ptr + slot * WIDTH + offs, tl.load(v_ptr + token * v_stride + offs, mask=mask), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] with contiguous rows (views into the fused qkv output are fine).
    No longer on the engine's path — its Triton backend stores K/V in the fused RoPE kernel
    (engine/kernels/rope_kv.py); kept as the previous path that bench/decode_kernels_gpu.py measures
    the fused kernel against."""
    num_tokens, width = k.shape[0], k.shape[1] * k.shape[2]
    assert k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2] and k.stride(2) == v.stride(2) == 1
    _store_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    WIDTH=width, BLOCK=triton.next_power_of_2(width))


@triton.jit
def _gather_kv(k_cache_ptr, v_cache_ptr, tables_ptr, seq, table_stride, kv_head, start, end,
               NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               CACHE: tl.constexpr):
    """K and V [BLOCK_N, HEAD_DIM] of one sequence's positions ``start ..`` (rows at or past ``end``
    are zeros) for one K/V head, gathered through the block table; also the positions and their mask.
    ``CACHE``: the loads' cache modifier ("" default; ".cg" through L2 only, for data another kernel
    wrote, read before ``gdc_wait``)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < end
    block = tl.load(tables_ptr + seq * table_stride + offs_n // BLOCK_SIZE, mask=mask_n, other=0, cache_modifier=CACHE)
    k, v = _kv_rows(k_cache_ptr, v_cache_ptr, block, offs_n, mask_n, kv_head, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, CACHE)
    return k, v, offs_n, mask_n


@triton.jit
def _kv_rows(k_cache_ptr, v_cache_ptr, block, offs_n, mask_n, kv_head, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_SIZE: tl.constexpr, CACHE: tl.constexpr):
    """K and V rows of positions ``offs_n`` (zeros where not ``mask_n``), given each position's cache block."""
    slot = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
    kv_offs = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_cache_ptr + kv_offs, mask=mask_n[:, None], other=0.0, cache_modifier=CACHE)
    v = tl.load(v_cache_ptr + kv_offs, mask=mask_n[:, None], other=0.0, cache_modifier=CACHE)
    return k, v


@triton.jit
def _attend_tile(q, k, v, visible, m, l, acc, scale_log2, PRECISION: tl.constexpr):
    """One K/V tile into the online-softmax state (running max ``m``, sum ``l``, output ``acc``) of
    the query rows ``q``; ``visible`` masks the scores (a row that sees nothing yet keeps m = -inf)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m - m_ref)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _split_chunk(context_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """A split's share of the context in whole BLOCK_N tiles, and how many splits have any (at least
    one: split 0 of an empty context writes the zeros). Read from the device, so the grid — and a
    captured CUDA graph — is independent of the context length; the splits past ``live`` skip."""
    chunk = tl.maximum(tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N), 1) * BLOCK_N
    return chunk, tl.maximum(tl.cdiv(context_len, chunk), 1)


@triton.jit
def _merge_splits(part_ptr, out_ptr, live, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  SPLIT_TILE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The ``GROUP`` query heads of one (sequence, K/V head): rescale their first ``live`` partials
    (``[GROUP, NUM_SPLITS, HEAD_DIM + 2]`` at ``part_ptr``) to a common max, sum, normalize, store
    ``[GROUP, HEAD_DIM]`` at ``out_ptr``. Every head's partials are loaded before any store (a store
    between them would order the next loads after it), a tile of splits at a time; the loads bypass
    L1 (``.cg``): other programs of the same grid may have just written them."""
    offs_g = tl.arange(0, GROUP_P2)
    offs_s = tl.arange(0, SPLIT_TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_g = offs_g < GROUP
    head_base = part_ptr + offs_g * (NUM_SPLITS * (HEAD_DIM + 2))
    m_run = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_run = tl.zeros([GROUP_P2], tl.float32)
    acc_run = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
    first = 0
    while first < live:  # one pass while live <= SPLIT_TILE
        mask = mask_g[:, None] & ((first + offs_s) < live)[None, :]
        base = head_base[:, None] + (first + offs_s)[None, :] * (HEAD_DIM + 2)
        m = tl.load(base + HEAD_DIM, mask=mask, other=float("-inf"), cache_modifier=".cg")  # -inf: nothing seen
        l = tl.load(base + HEAD_DIM + 1, mask=mask, other=0.0, cache_modifier=".cg")
        acc = tl.load(base[:, :, None] + offs_d[None, None, :], mask=mask[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_ref[:, None]))
        alpha = tl.where(m_run == float("-inf"), 0.0, tl.exp2(m_run - m_ref))
        l_run = l_run * alpha + tl.sum(l * w, 1)
        acc_run = acc_run * alpha[:, None] + tl.sum(acc * w[:, :, None], 1)
        m_run = m_new
        first += SPLIT_TILE
    out = acc_run / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
    tl.store(out_ptr + offs_g[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_ptr, count_ptr, tables_ptr, lens_ptr, scale_log2,
                   table_stride, q_stride, pos_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, slot_ptr, cos_stride, eps,
                   NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP_P2: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   SPLIT_TILE: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr, FUSED_ROPE: tl.constexpr,
                   QK_NORM: tl.constexpr, MERGE_IN_KERNEL: tl.constexpr, EARLY_KV: tl.constexpr, CACHE: tl.constexpr,
                   stamp_ptr, STAMPS: tl.constexpr, EARLY_TABLE: tl.constexpr):
    """One program per (sequence, K/V head, split of the context). With NUM_SPLITS == 1 it writes the
    output; otherwise it writes its unnormalized partial (acc, max, sum), and then either
    ``_combine_kernel`` merges them (a second launch) or, MERGE_IN_KERNEL, the split that finishes
    last: each live split counts itself in ``count_ptr[seq, kv_head]`` after its partial is written,
    and the one that brings the count to ``live`` merges its query heads and resets the counter for
    the next launch. The merge reads every partial in split order, whichever program runs it, so the
    result is the same bit for bit as the separate kernel's.

    FUSED_ROPE: ``q_ptr`` is the qkv projection's output and the kernel does what ``rope_store_kv``
    would have done first (one launch per layer fewer): (q/k norm and) RoPE of its query heads and of
    the new token's key, and — split 0 — the new key and value into the cache. The new token's
    position (the context's last) is read from those registers, not from the cache, since another
    program may not have stored it yet.

    EARLY_KV (PDL): the caller guarantees that the step's metadata and cache writers have completed
    when this kernel starts (an earlier kernel of the step triggered its dependents only after its own
    ``gdc_wait``: layer 0's qkv GEMV, ``gemv(late_trigger=True)``), so the step's lengths, positions,
    slots, block tables and cached K/V are read before ``gdc_wait`` (through L2): only the
    new token's qkv row waits for the previous kernel, and the first K/V tile's HBM latency overlaps it."""
    HALF: tl.constexpr = HEAD_DIM // 2
    started = timeline.now(STAMPS)
    program = (tl.program_id(0) * NUM_KV_HEADS + tl.program_id(1)) * NUM_SPLITS + tl.program_id(2)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if FUSED_ROPE and QK_NORM:  # weights: safe to read before gdc_wait
        offs_h = tl.arange(0, HALF)
        qw_lo, qw_hi = tl.load(q_norm_ptr + offs_h).to(tl.float32), tl.load(q_norm_ptr + HALF + offs_h).to(tl.float32)
        kw_lo, kw_hi = tl.load(k_norm_ptr + offs_h).to(tl.float32), tl.load(k_norm_ptr + HALF + offs_h).to(tl.float32)
    if USE_PDL and not EARLY_KV:
        tl.extra.cuda.gdc_wait()  # the qkv rows, the cache, the tables and lengths all belong to the step
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_h = tl.arange(0, HALF)
    mask_g = offs_g < GROUP
    heads = kv_head * GROUP + offs_g  # the query heads sharing this K/V head
    # the step's metadata, then the split's first K/V tile. The length and the tile's block ids are requested
    # together: the ids assume the context spans at most NUM_SPLITS tiles (then every split's chunk is one
    # tile, at split * BLOCK_N), so the K/V rows are two dependent loads away (length and table -> K/V), not
    # three; a longer context reads its ids again. Splits past the context load no K/V.
    first_n = split * BLOCK_N + tl.arange(0, BLOCK_N)
    first_blocks = first_n
    if EARLY_TABLE:
        first_blocks = tl.load(tables_ptr + seq * table_stride + first_n // BLOCK_SIZE,
                               mask=first_n < table_stride * BLOCK_SIZE, other=0, cache_modifier=CACHE)
    context_len = tl.load(lens_ptr + seq, cache_modifier=CACHE)
    cached_len = context_len
    if FUSED_ROPE:
        cached_len = context_len - 1  # the new token is not read from the cache
    chunk, live = _split_chunk(context_len, NUM_SPLITS, BLOCK_N)
    start = split * chunk
    split_end = tl.minimum(start + chunk, context_len)
    end = tl.minimum(split_end, cached_len)
    if EARLY_TABLE and chunk == BLOCK_N:
        offs_n = start + tl.arange(0, BLOCK_N)  # = first_n, in the length's integer type (int64 in the graphs)
        mask_n = offs_n < end
        k, v = _kv_rows(k_cache_ptr, v_cache_ptr, first_blocks, offs_n, mask_n, kv_head, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                        CACHE)
    else:
        k, v, offs_n, mask_n = _gather_kv(k_cache_ptr, v_cache_ptr, tables_ptr, seq, table_stride, kv_head, start, end,
                                          NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, CACHE)
    if FUSED_ROPE:
        dtype: tl.constexpr = q_ptr.dtype.element_ty
        slot = tl.load(slot_ptr + seq, cache_modifier=CACHE)
        cos_lo, cos_hi, sin_lo, sin_hi = rope_row(cos_ptr, sin_ptr, tl.load(pos_ptr + seq, cache_modifier=CACHE), cos_stride,
                                                  offs_h, HALF + offs_h, offs_h < HALF, dtype)
    if USE_PDL and EARLY_KV:
        tl.extra.cuda.gdc_wait()  # the qkv rows: the previous kernel's output
    released = timeline.now(STAMPS)
    if FUSED_ROPE:
        row = q_ptr + seq.to(tl.int64) * q_stride
        q_lo = tl.load(row + heads[:, None] * HEAD_DIM + offs_h[None, :], mask=mask_g[:, None], other=0.0).to(tl.float32)
        q_hi = tl.load(row + heads[:, None] * HEAD_DIM + HALF + offs_h[None, :], mask=mask_g[:, None], other=0.0).to(tl.float32)
        k_row = row + (NUM_KV_HEADS * GROUP + kv_head) * HEAD_DIM
        k_lo, k_hi = tl.load(k_row + offs_h).to(tl.float32), tl.load(k_row + HALF + offs_h).to(tl.float32)
        v_new = tl.load(k_row + NUM_KV_HEADS * HEAD_DIM + offs_d)
    else:
        q = tl.load(q_ptr + seq * q_stride + heads[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_g[:, None], other=0.0)
    if split < live:  # the grid is sized for max_model_len: splits past the context have nothing to do
        if STAMPS:  # when the split's first K/V tile has arrived (the new token's q requested before)
            timeline.mark_arrival(stamp_ptr, program, 3, tl.sum(k.to(tl.float32)) + tl.sum(v.to(tl.float32)), STAMPS)
        if FUSED_ROPE:
            if QK_NORM:  # order-independent sums: the keys equal rope_store_kv's bit for bit
                q_inv = head_inv_rms(q_lo, q_hi, eps, HEAD_DIM, 1)
                q_lo, q_hi = head_rms_norm(q_lo, q_hi, qw_lo[None, :], qw_hi[None, :], q_inv[:, None], dtype)
                k_inv = head_inv_rms(k_lo, k_hi, eps, HEAD_DIM, 0)
                k_lo, k_hi = head_rms_norm(k_lo, k_hi, kw_lo, kw_hi, k_inv, dtype)
            q_lo, q_hi = rope_halves(q_lo, q_hi, cos_lo[None, :], cos_hi[None, :], sin_lo[None, :], sin_hi[None, :], dtype)
            k_lo, k_hi = rope_halves(k_lo, k_hi, cos_lo, cos_hi, sin_lo, sin_hi, dtype)
            q = tl.reshape(tl.permute(tl.join(q_lo, q_hi), (0, 2, 1)), (GROUP_PAD, HEAD_DIM)).to(dtype)
            k_new = tl.reshape(tl.permute(tl.join(k_lo, k_hi), (1, 0)), (HEAD_DIM,)).to(dtype)
            if (split == 0) & (slot >= 0):  # slot -1: a padded graph row stores nothing
                cache_row = slot.to(tl.int64) * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
                tl.store(k_cache_ptr + cache_row + offs_d, k_new)
                tl.store(v_cache_ptr + cache_row + offs_d, v_new)
        timeline.mark(stamp_ptr, program, 0, STAMPS)  # q (and the new key) normed and rotated
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        while start < end:  # (a while loop: the Triton interpreter cannot range() over a loaded bound)
            m, l, acc = _attend_tile(q, k, v, mask_n[None, :], m, l, acc, scale_log2, PRECISION)
            start += BLOCK_N
            k, v, offs_n, mask_n = _gather_kv(k_cache_ptr, v_cache_ptr, tables_ptr, seq, table_stride, kv_head, start, end,
                                              NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, CACHE)  # none past the end
        if FUSED_ROPE:
            if (cached_len >= split * chunk) & (cached_len < split_end):  # this split holds the new token
                s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2
                m_new = tl.maximum(m, s_new)
                p = tl.exp2(s_new - m_new)
                alpha = tl.exp2(m - m_new)
                l = l * alpha + p
                # p rounded to the cache dtype, as the tiles' p feeds tl.dot
                acc = acc * alpha[:, None] + p.to(dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
                m = m_new
        timeline.mark(stamp_ptr, program, 1, STAMPS)  # the split attended
        num_heads: tl.constexpr = NUM_KV_HEADS * GROUP
        if NUM_SPLITS == 1:
            out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # context 0 (graph padding) -> zeros
            out_row = out_ptr + seq * (num_heads * HEAD_DIM)  # out is a fresh [seqs, heads, head_dim] tensor
            tl.store(out_row + heads[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
        else:  # partials: [seq, head, split, HEAD_DIM + 2] fp32 = acc | m | l
            base = part_ptr + ((seq * num_heads + heads) * NUM_SPLITS + split) * (HEAD_DIM + 2)
            tl.store(base[:, None] + offs_d[None, :], acc, mask=mask_g[:, None])
            tl.store(base + HEAD_DIM, m, mask=mask_g)
            tl.store(base + HEAD_DIM + 1, l, mask=mask_g)
            if MERGE_IN_KERNEL:
                tl.debug_barrier()  # every thread's partial stores happen before the release below
                counter = count_ptr + seq * NUM_KV_HEADS + kv_head
                arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
                timeline.mark(stamp_ptr, program, 2, STAMPS)  # its partial counted
                if arrived == live - 1:  # the last split to finish
                    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
                    first_head = kv_head * GROUP
                    _merge_splits(part_ptr + (seq * num_heads + first_head) * NUM_SPLITS * (HEAD_DIM + 2),
                                  out_ptr + (seq * num_heads + first_head) * HEAD_DIM, live, GROUP, GROUP_P2, NUM_SPLITS, SPLIT_TILE,
                                  HEAD_DIM)
    timeline.stamp(stamp_ptr, program, started, released, STAMPS)


@triton.jit
def _combine_kernel(part_ptr, out_ptr, lens_ptr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
                    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """Merges the live splits of one (sequence, K/V head) in a second launch (MERGE_IN_KERNEL=False)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    seq = tl.program_id(0)
    first_head = tl.program_id(1) * GROUP
    num_heads: tl.constexpr = NUM_KV_HEADS * GROUP
    _, live = _split_chunk(tl.load(lens_ptr + seq), NUM_SPLITS, BLOCK_N)
    _merge_splits(part_ptr + (seq * num_heads + first_head) * NUM_SPLITS * (HEAD_DIM + 2),
                  out_ptr + (seq * num_heads + first_head) * HEAD_DIM, live, GROUP, GROUP_P2, NUM_SPLITS, SPLIT_TILE, HEAD_DIM)


def decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, block_n: int = 64) -> int:
    """Context splits per (sequence, K/V head): enough programs to fill the GPU's SMs when the batch
    is small (batch 1 has only ``num_kv_heads`` programs otherwise), never more than the longest
    context has tiles, and 1 (no combine pass) once the batch alone fills the machine."""
    programs = num_seqs * num_kv_heads
    if programs >= 128:
        return 1
    return max(1, min(triton.next_power_of_2(-(-256 // programs)), triton.next_power_of_2(-(-max_context // block_n)), 32))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                     merge_in_kernel: bool | None = None, counters: torch.Tensor | None = None,
                     early_kv: bool = False) -> torch.Tensor:
    """q: [num_seqs, heads, head_dim], one new token per sequence -> [num_seqs, heads, head_dim].

    ``num_splits`` is fixed per call shape (the model runner derives it from the batch size and
    ``max_model_len``), so a CUDA graph captures one grid that serves every context length.
    ``merge_in_kernel``: the last split merges (default: ``set_merge_in_kernel``'s process-wide choice),
    counting arrivals in ``counters`` (int32, zeros, >= sequences x K/V heads; default: a per-device
    buffer of this module — an engine passes its own, so engines sharing a device never share them).
    ``early_kv``: read the lengths, tables and cache before waiting for the previous kernel — only when
    a kernel after their writers and before this one triggers its dependents late
    (``gemv(late_trigger=True)``) or uses no PDL (engine/kernels/__init__.py)."""
    q = q.contiguous()
    return _decode(q, None, k_cache, v_cache, block_tables, context_lens, scale, num_splits, q.shape[1], merge_in_kernel,
                   counters, early_kv)


def rope_decode_attention(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, scale: float, num_heads: int, num_splits: int | None = None,
                          merge_in_kernel: bool | None = None, counters: torch.Tensor | None = None,
                          early_kv: bool = False) -> torch.Tensor:
    """Decode attention straight from the qkv projection's output ``[num_seqs, (heads + 2 * kv_heads) * head_dim]``
    (contiguous rows): ``rope_store_kv`` (q/k norm, RoPE, the new K/V into the cache at ``slot_mapping``)
    and ``decode_attention`` in one kernel -> ``[num_seqs, heads, head_dim]``."""
    head_dim = k_cache.shape[-1]
    num_kv_heads = k_cache.shape[2]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"rope_decode_attention: qkv {tuple(qkv.shape)} is not [seqs, ({num_heads} + 2 * {num_kv_heads}) * "
                         f"{head_dim}] with contiguous rows")
    if cos.shape[1] != head_dim or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"rope_decode_attention: RoPE tables {tuple(cos.shape)} do not fit head_dim {head_dim}")
    if q_norm_weight is not None and not (q_norm_weight.dtype == k_norm_weight.dtype == qkv.dtype):
        raise ValueError(f"rope_decode_attention: q/k norm weights ({q_norm_weight.dtype}) must be in the activation dtype {qkv.dtype}")
    rope = (positions, cos, sin, q_norm_weight, k_norm_weight, slot_mapping, cos.stride(0), eps)
    return _decode(qkv, rope, k_cache, v_cache, block_tables, context_lens, scale, num_splits, num_heads, merge_in_kernel,
                   counters, early_kv)


_merge_in_kernel = True
_early_table = True


def set_early_table(enabled: bool) -> None:
    """Process-wide: request a split's first block ids with the context length (on) or after it (the
    path before session 10; benchmarks A/B the two; the model runner recaptures its graphs)."""
    global _early_table
    _early_table = bool(enabled)


_split_counters: dict[torch.device, torch.Tensor] = {}


def set_merge_in_kernel(enabled: bool) -> None:
    """Process-wide: merge a split decode's partials in the decode kernel itself (its last split to
    finish; one launch per layer fewer) or in ``_combine_kernel`` after it (benchmarks A/B the two;
    the model runner recaptures its graphs after switching)."""
    global _merge_in_kernel
    _merge_in_kernel = bool(enabled)


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """The in-kernel merge's arrival counters, one per (sequence, K/V head), zero between launches
    (the last split resets its own). One buffer per device that lives as long as the process: CUDA
    graphs keep its address, and a buffer freed after capture would be reused under a replaying graph."""
    counters = _split_counters.get(device)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode attention: the split counters must be allocated by an eager call before graph capture")
        counters = _split_counters[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return counters


def _decode(q: torch.Tensor, rope: tuple | None, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor, scale: float, num_splits: int | None, num_heads: int,
            merge_in_kernel: bool | None, counters: torch.Tensor | None, early_kv: bool) -> torch.Tensor:
    """Launch the decode kernel (and, without the in-kernel merge, its split combine): ``q`` rotated
    queries, or with ``rope`` the qkv rows."""
    num_seqs = q.shape[0]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    group = num_heads // num_kv_heads
    block_n = 64
    if num_splits is None:
        num_splits = decode_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, block_n)
    merge = (_merge_in_kernel if merge_in_kernel is None else merge_in_kernel) and num_splits > 1
    group_p2 = triton.next_power_of_2(group)
    split_tile = max(2, min(num_splits, 32 // group_p2))  # splits merged per pass: ~32 partial rows per tile
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    partials = (torch.empty(num_seqs, num_heads, num_splits, head_dim + 2, dtype=torch.float32, device=q.device)
                if num_splits > 1 else out)
    if not merge:
        counters = context_lens  # unused
    elif counters is None:
        counters = split_counters(q.device, num_seqs * num_kv_heads)
    elif counters.numel() < num_seqs * num_kv_heads or counters.dtype != torch.int32:
        raise ValueError(f"decode attention: counters must be int32 with >= {num_seqs * num_kv_heads} entries "
                         f"(got {counters.dtype}, {counters.numel()})")
    pdl = use_pdl(q.device)
    positions, cos, sin, q_norm, k_norm, slots, cos_stride, eps = rope or (out, out, out, None, None, out, 0, 0.0)
    qk_norm = q_norm is not None
    stamps, recording = timeline.claim("attention", num_seqs * num_kv_heads * num_splits, num_seqs, out)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, partials, counters, block_tables, context_lens, scale * _LOG2E, block_tables.stride(0),
        q.stride(0), positions, cos, sin, q_norm if qk_norm else out, k_norm if qk_norm else out, slots, cos_stride, eps,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, group_p2), GROUP_P2=group_p2, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, SPLIT_TILE=split_tile, PRECISION=_precision(q),
        USE_PDL=pdl, FUSED_ROPE=rope is not None, QK_NORM=qk_norm, MERGE_IN_KERNEL=merge, EARLY_KV=early_kv,
        CACHE=".cg" if early_kv else "", stamp_ptr=stamps, STAMPS=recording,
        EARLY_TABLE=_early_table,
        enable_fp_fusion=rope is None,  # RoPE rounds each product as torch does: no FMA contraction
        launch_pdl=pdl,
    )
    if num_splits > 1 and not merge:
        _combine_kernel[(num_seqs, num_kv_heads)](partials, out, context_lens, NUM_KV_HEADS=num_kv_heads, GROUP=group,
                                                  GROUP_P2=group_p2, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
                                                  SPLIT_TILE=split_tile, BLOCK_N=block_n, USE_PDL=pdl, launch_pdl=pdl)
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, lens_ptr, cu_q_ptr, scale_log2,
                    table_stride, q_stride,
                    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                    CACHE: tl.constexpr):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    context_len = tl.load(lens_ptr + seq)
    cached = context_len - q_len  # tokens before this step's chunk
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * q_stride + head * HEAD_DIM + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    pos_m = cached + offs_m
    # causal: this tile sees keys up to its last query's position (none when the tile is past the chunk)
    end = tl.where(tile * BLOCK_M < q_len, tl.minimum(context_len, cached + (tile + 1) * BLOCK_M), 0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    start = 0
    while start < end:
        k, v, offs_n, mask_n = _gather_kv(k_cache_ptr, v_cache_ptr, tables_ptr, seq, table_stride, kv_head, start, end,
                                          NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, CACHE)
        visible = mask_n[None, :] & (offs_n[None, :] <= pos_m[:, None])
        m, l, acc = _attend_tile(q, k, v, visible, m, l, acc, scale_log2, PRECISION)
        start += BLOCK_N
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + q_rows[:, None] * q_stride + head * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim], the new tokens of every sequence (varlen) -> [T, heads, head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    block_m = 64 if max_seqlen_q > 16 else 16
    grid = (triton.cdiv(max_seqlen_q, block_m), context_lens.shape[0], num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, cu_seqlens_q, scale * _LOG2E, block_tables.stride(0), q.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=64, PRECISION=_precision(q), CACHE="",
    )
    return out
