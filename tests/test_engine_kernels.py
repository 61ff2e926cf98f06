"""The Triton kernels equal the torch reference (or, for the argmax and the decode-graph input advance,
torch's results and the expected positions), run on CPU through the Triton interpreter.

The interpreter must be chosen before Triton is first imported, so each check runs in a fresh
interpreter process (``python tests/test_engine_kernels.py <check>``) with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def paged_setup(q_lens: list[int], context_lens: list[int], heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                block_size: int = 4, num_blocks: int = 60, seed: int = 0):
    import torch

    from engine.context import Context

    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    ids = torch.randperm(num_blocks, generator=g).tolist()  # scattered, non-contiguous blocks
    width = max(-(-n // block_size) for n in context_lens)
    tables = []
    for n in context_lens:
        need = -(-n // block_size)
        tables.append(ids[:need] + [0] * (width - need))
        ids = ids[need:]
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g)
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    ctx = Context(slot_mapping=torch.empty(0), block_tables=torch.tensor(tables, dtype=torch.int32),
                  context_lens=torch.tensor(context_lens, dtype=torch.int32), cu_seqlens_q=cu, max_seqlen_q=max(q_lens),
                  is_decode=all(n == 1 for n in q_lens), seqlens_q=q_lens, context_lens_list=context_lens)
    return q, k_cache, v_cache, ctx


def check_decode() -> None:
    import torch

    from engine.attention import paged_attention_torch
    from engine.kernels import paged_attention as kernels

    q, k_cache, v_cache, ctx = paged_setup([1, 1, 1, 1], [1, 7, 33, 70])
    expected = paged_attention_torch(q, k_cache, v_cache, ctx, scale=0.25)
    got = kernels.decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # explicit split counts (the split + combine path), a second call (a graph replay) computing the
    # same, and a padded row (context 0) giving zeros without touching the others
    lens = ctx.context_lens.clone()
    lens[0] = 0
    # and the split merge in the decode kernel (its last split) equal to the separate combine kernel
    for splits in (1, 4, 8):
        first = kernels.decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, 0.25, splits)
        again = kernels.decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, 0.25, splits)
        torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(first, again), splits
        separate = kernels.decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, 0.25, splits, False)
        assert torch.equal(separate, first), splits
        padded = kernels.decode_attention(q, k_cache, v_cache, ctx.block_tables, lens, 0.25, splits)
        assert torch.equal(padded[0], torch.zeros_like(padded[0])) and torch.equal(padded[1:], first[1:]), splits
    # a wide group (8 query heads per K/V head): the merge takes the live splits in several tiles
    q, k_cache, v_cache, ctx = paged_setup([1, 1], [300, 5], heads=16, kv_heads=2, num_blocks=90)
    expected = paged_attention_torch(q, k_cache, v_cache, ctx, scale=0.25)
    for merge in (True, False):
        got = kernels.decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, 0.25, 8, merge)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    counters = kernels.split_counters(q.device, 1)
    assert not counters.any(), "every launch leaves its arrival counters at zero"


def check_prefill() -> None:
    import torch

    from engine.attention import paged_attention_torch
    from engine.kernels import paged_attention as kernels

    # a whole prompt, a chunk after 12 cached tokens, a decode-like row, and a prompt longer than one tile
    q, k_cache, v_cache, ctx = paged_setup([9, 5, 1, 20], [9, 17, 6, 20])
    expected = paged_attention_torch(q, k_cache, v_cache, ctx, scale=0.25)
    got = kernels.prefill_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.cu_seqlens_q,
                                    ctx.max_seqlen_q, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def check_store() -> None:
    import torch

    from engine.attention import store_kv_torch
    from engine.kernels import paged_attention as kernels

    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, (4 + 2 + 2) * 16, generator=g)  # k and v as strided views of a fused qkv output
    k, v = qkv[:, 64:96].view(5, 2, 16), qkv[:, 96:].view(5, 2, 16)
    slots = torch.tensor([3, 17, -1, 0, 9])  # -1: padding, must be skipped
    expected = [torch.zeros(6, 4, 2, 16) for _ in range(2)]
    store_kv_torch(k, v, *expected, slots)
    got = [torch.zeros(6, 4, 2, 16) for _ in range(2)]
    kernels.store_kv(k, v, *got, slots)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def check_rope_kv() -> None:
    """The fused q/k norm + RoPE + KV-store kernel equals apply_rope + store_kv_torch in fp32: with and
    without Qwen3's q/k norm, a llama3-scaled table, a head_dim whose half is not a power of two,
    padded rows (slot -1) leaving the caches untouched, and qkv rows with a wider stride."""
    import torch

    from engine.attention import store_kv_torch
    from engine.kernels import pdl_supported, use_pdl
    from engine.kernels.rope_kv import rope_store_kv
    from engine.layers import RotaryEmbedding, apply_rope

    assert not pdl_supported("cpu") and not use_pdl("cpu")  # the interpreter path never uses PDL
    llama3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, head_dim, scaling, qk_norm in ((4, 2, 16, None, True), (4, 2, 16, llama3, False),
                                                        (6, 3, 24, None, True), (2, 2, 8, llama3, True)):
        rope = RotaryEmbedding(head_dim, 512, 10_000.0, scaling)
        width = (heads + 2 * kv_heads) * head_dim
        qkv = torch.randn(7, width + 5, generator=g)[:, :width]  # row stride != width
        positions = torch.tensor([3, 0, 511, 77, 200, 1, 300])
        slots = torch.tensor([5, -1, 17, 0, -1, 30, 9])
        norm_w = [torch.randn(head_dim, generator=g) if qk_norm else None for _ in range(2)]
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        expected_q, expected_k = apply_rope(positions, q.reshape(7, heads, head_dim), k.reshape(7, kv_heads, head_dim),
                                            rope.cos, rope.sin, *norm_w, 1e-6)
        caches = torch.randn(4, 8, 4, kv_heads, head_dim, generator=g)  # expected k, v; got k, v ([blocks=8, block_size=4])
        caches[2:] = caches[:2]
        store_kv_torch(expected_k, v.reshape(7, kv_heads, head_dim), caches[0], caches[1], slots)
        got_q = rope_store_kv(qkv, positions, rope.cos, rope.sin, *norm_w, 1e-6, caches[2], caches[3], slots, heads, kv_heads)
        case = f"heads {heads}/{kv_heads} head_dim {head_dim} scaling {scaling is not None} qk_norm {qk_norm}"
        if qk_norm:  # the sum of squares may add in another order than torch's reduction
            torch.testing.assert_close(got_q, expected_q, rtol=1e-6, atol=1e-6, msg=lambda m: f"{case}: {m}")
            torch.testing.assert_close(caches[2], caches[0], rtol=1e-6, atol=1e-6, msg=lambda m: f"{case}: {m}")
        else:  # no reduction: every op rounds as torch's
            assert torch.equal(got_q, expected_q) and torch.equal(caches[2], caches[0]), case
        assert torch.equal(caches[3], caches[1]), case  # v: copied raw; padded rows' slots untouched on both sides


def check_rope_decode() -> None:
    """Decode attention straight from the qkv rows (q/k norm + RoPE + KV store + attention in one kernel)
    equals the torch path (apply_rope, store_kv_torch, paged attention) in fp32: with and without q/k
    norm, one split and several (the new token in any split), a padded row (slot -1, context 0) that
    stores nothing and yields zeros, and the same result on a second call (a graph replay)."""
    import torch

    from engine.attention import paged_attention_torch, store_kv_torch
    from engine.kernels.paged_attention import rope_decode_attention
    from engine.layers import RotaryEmbedding, apply_rope

    g = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    lens = [1, 7, 33, 70]
    for qk_norm in (True, False):
        q_ref, k_cache, v_cache, ctx = paged_setup([1] * 4, lens, heads, kv_heads, head_dim, block_size, seed=4)
        rope = RotaryEmbedding(head_dim, 512, 10_000.0, None)
        qkv = torch.randn(4, (heads + 2 * kv_heads) * head_dim, generator=g)
        positions = torch.tensor([n - 1 for n in lens])
        slots = torch.tensor([int(ctx.block_tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                              for i, n in enumerate(lens)])
        norm_w = [torch.randn(head_dim, generator=g) if qk_norm else None for _ in range(2)]
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        rq, rk = apply_rope(positions, q.reshape(4, heads, head_dim), k.reshape(4, kv_heads, head_dim), rope.cos, rope.sin,
                            *norm_w, 1e-6)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        store_kv_torch(rk, v.reshape(4, kv_heads, head_dim), ref_k, ref_v, slots)
        expected = paged_attention_torch(rq, ref_k, ref_v, ctx, scale=0.25)
        for splits in (1, 4, 8):
            got_k, got_v = k_cache.clone(), v_cache.clone()
            args = (qkv, positions, rope.cos, rope.sin, *norm_w, 1e-6, got_k, got_v, slots, ctx.block_tables)
            first = rope_decode_attention(*args, ctx.context_lens, 0.25, heads, splits)
            case = f"qk_norm {qk_norm} splits {splits}"
            torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}: {m}")
            torch.testing.assert_close(got_k, ref_k, rtol=1e-6, atol=1e-6, msg=lambda m: f"{case}: {m}")
            assert torch.equal(got_v, ref_v), case
            assert torch.equal(rope_decode_attention(*args, ctx.context_lens, 0.25, heads, splits), first), case
            assert torch.equal(rope_decode_attention(*args, ctx.context_lens, 0.25, heads, splits, False), first), case
            # the engine's call: step metadata and cache read before the previous kernel's output (same values)
            early_k, early_v = k_cache.clone(), v_cache.clone()
            early = rope_decode_attention(qkv, positions, rope.cos, rope.sin, *norm_w, 1e-6, early_k, early_v, slots,
                                          ctx.block_tables, ctx.context_lens, 0.25, heads, splits, early_kv=True)
            assert torch.equal(early, first) and torch.equal(early_k, got_k) and torch.equal(early_v, got_v), case
            padded_lens, padded_slots = ctx.context_lens.clone(), slots.clone()
            padded_lens[0], padded_slots[0] = 0, -1
            fresh_k, fresh_v = k_cache.clone(), v_cache.clone()
            padded = rope_decode_attention(qkv, positions, rope.cos, rope.sin, *norm_w, 1e-6, fresh_k, fresh_v, padded_slots,
                                           ctx.block_tables, padded_lens, 0.25, heads, splits)
            assert torch.equal(padded[0], torch.zeros_like(padded[0])) and torch.equal(padded[1:], first[1:]), case
            flat = lambda cache: cache.view(-1, kv_heads, head_dim)[slots[0]]  # noqa: E731 -- the padded row's slot
            assert torch.equal(flat(fresh_k), flat(k_cache)) and torch.equal(flat(fresh_v), flat(v_cache)), case


def check_engine() -> None:
    """The whole engine on the Triton backend (prefix hits, chunks, decode) equals the torch backend."""
    import tempfile

    from engine import LLM, SamplingParams
    from tests.conftest import make_tiny_model_dir

    path = make_tiny_model_dir(Path(tempfile.mkdtemp()), "qwen3", num_hidden_layers=1)
    shared = list(range(5, 14))
    prompts = [shared + [20], [100, 200, 300], shared + [30, 31, 32]]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    runs = []
    for backend in ("torch", "triton"):
        llm = LLM(path, dtype="fp32", block_size=4, num_blocks=32, max_num_batched_tokens=8, attention_backend=backend,
                  skip_tokenizer_init=True)
        llm.generate(prompts[:1], params)  # fills the prefix cache for the next call
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        assert llm.stats()["prefix_hits"] > 0
    assert runs[0] == runs[1], runs


def check_engine_gemv() -> None:
    """The model's GEMV paths (qkv/gate_up with the add + norm prologue carrying the residual stream,
    down_proj with SiLU * up, o_proj and the LM head plain; row kernel at 1 row, dot kernel with
    split-K at 2..8) give the torch backend's greedy tokens. The plans are fixed here; on CUDA the
    runner times them."""
    import tempfile

    import torch

    from engine import LLM, SamplingParams
    from engine.kernels.gemv import GemvConfig, Workspace
    from engine.kernels.gemv_tuning import GemvPlan
    from tests.conftest import make_tiny_model_dir

    # a 512-token vocabulary: the interpreter runs every program of the LM head's GEMV in Python
    path = make_tiny_model_dir(Path(tempfile.mkdtemp()), "qwen3", num_hidden_layers=2, vocab_size=512)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42] * 5]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    options = dict(dtype="fp32", block_size=4, num_blocks=32, max_num_batched_tokens=8, skip_tokenizer_init=True)
    expected = [o.outputs[0].token_ids for o in LLM(path, attention_backend="torch", **options).generate(prompts, params)]
    llm = LLM(path, attention_backend="triton", **options)
    row, dot = GemvConfig(1, 256, 64, 2), GemvConfig(16, 256, 64, 2)  # wide N tiles: few interpreted programs
    workspace = Workspace(torch.device("cpu"))
    for p in llm.engine.runner.model.projections():
        workspace.reserve(p.linear.weight.shape[0], dot)
        p.linear.gemv = GemvPlan({1: row, 2: dot, 4: dot, 8: dot}, workspace)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]  # batch 1: row kernel
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]  # batch 3: dot kernel
    assert alone == expected and batched == expected, (alone, batched, expected)


def check_gemv() -> None:
    """Every candidate config (row and dot kernels, split-K with a ragged last split, bias) and every
    prologue equals torch: plain, add + RMSNorm (with and without a residual), SiLU * up; and the
    residual-add epilogue with the sums of squares a following add + RMSNorm GEMV takes instead."""
    import torch
    import torch.nn.functional as F

    from engine.kernels.gemv import GemvConfig, Workspace, gemv, set_early_epilogue
    from engine.layers import add_rms_norm, rms_norm, silu_and_mul

    g = torch.Generator().manual_seed(0)
    n, k = 50, 300  # N not a multiple of any block, K not a multiple of split * block
    w, bias, norm_w = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(k, generator=g)
    configs = [GemvConfig(1, 16, 64, 1), GemvConfig(1, 16, 64, 4), GemvConfig(16, 32, 64, 1), GemvConfig(16, 32, 64, 4),
               GemvConfig(1, 8, 512, 1, 8, 1), GemvConfig(1, 4, 128, 3, 4, 1),  # whole K slice per program (one tile)
               GemvConfig(1, 1, 512, 1, 4, 1)]  # one row per program
    workspace = Workspace(torch.device("cpu"))
    for config in configs:
        workspace.reserve(n, config)
        m = 1 if config.block_m == 1 else 5
        x, residual = torch.randn(m, k, generator=g), torch.randn(m, k, generator=g)
        close = dict(rtol=1e-4, atol=1e-4, msg=lambda text: f"{config}: {text}")
        torch.testing.assert_close(gemv(x, w, bias, config, workspace), F.linear(x, w, bias), **close)
        y, h = gemv(x, w, None, config, workspace, "add_rms_norm", residual, norm_w, 1e-6)
        normed, expected_h = add_rms_norm(x, residual, norm_w, 1e-6)
        torch.testing.assert_close(y, F.linear(normed, w), **close)
        assert torch.equal(h, expected_h), config
        y, h = gemv(x, w, None, config, workspace, "add_rms_norm", None, norm_w, 1e-6)
        torch.testing.assert_close(y, F.linear(rms_norm(x, norm_w, 1e-6), w), **close)
        assert h is x
        gate_up = torch.randn(m, 2 * k, generator=g)
        torch.testing.assert_close(gemv(gate_up, w, None, config, workspace, "silu_mul"), F.linear(silu_and_mul(gate_up), w),
                                   **close)
        # the residual add in the producer's epilogue (o_proj, down_proj) and the norm after it from its sums
        res = torch.randn(m, n, generator=g)
        for early in (False, True):  # the residual loaded after the reduction, or with x (the default, last)
            set_early_epilogue(early)
            h, stats = gemv(x, w, bias, config, workspace, add_residual=res)
            torch.testing.assert_close(h, F.linear(x, w, bias) + res, **close)
        assert stats.shape == (m, -(-n // config.block_n)), stats.shape
        torch.testing.assert_close(stats.sum(1), (h * h).sum(1), **close)
        h_act, stats_act = gemv(gate_up, w, None, config, workspace, "silu_mul", add_residual=res)
        torch.testing.assert_close(h_act, F.linear(silu_and_mul(gate_up), w) + res, **close)
        w2, norm2 = torch.randn(40, n, generator=g), torch.randn(n, generator=g)
        workspace.reserve(40, config)
        y2, h2 = gemv(h, w2, None, config, workspace, "add_rms_norm", None, norm2, 1e-6, stats=stats)
        assert h2 is h
        torch.testing.assert_close(y2, F.linear(rms_norm(h, norm2, 1e-6), w2), **close)
        try:
            gemv(h, w2, None, config, workspace, "add_rms_norm", res, norm2, 1e-6, stats=stats)
            raise AssertionError("stats with a residual still to add must be rejected")
        except ValueError as e:
            assert "residual=None" in str(e)
        assert not workspace.tickets.any(), "split-K tickets must be back at 0 for the next call / graph replay"


def check_gemv_bf16() -> None:
    """bf16 weights, fp32 accumulation: within bf16 output rounding of an fp32 reference. (Row kernel,
    no prologue: the Triton 3.6 interpreter's bf16 tl.dot and bf16 arithmetic return garbage and its
    fp32 -> bf16 cast truncates; bench/engine_gpu_check.py checks those paths on the GPU.)"""
    import torch
    import torch.nn.functional as F

    from engine.kernels.gemv import GemvConfig, Workspace, gemv

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 512, generator=g).bfloat16(), torch.randn(1, 512, generator=g).bfloat16()
    config = GemvConfig(1, 16, 128, 2)
    workspace = Workspace(torch.device("cpu"))
    workspace.reserve(64, config)
    expected = F.linear(x.float(), w.float())
    got = gemv(x, w, None, config, workspace)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-1)


def check_gemv_rejects_bad_input() -> None:
    import torch

    from engine.kernels.gemv import GemvConfig, Workspace, gemv

    w, workspace = torch.randn(8, 32), Workspace(torch.device("cpu"))
    row, dot = GemvConfig(1, 8, 32, 1), GemvConfig(16, 8, 32, 2)
    workspace.reserve(8, row)
    for call, message in ((lambda: gemv(torch.randn(2, 32), w, None, row, workspace), "row kernel: 1 row"),
                          (lambda: gemv(torch.randn(9, 32), w, None, row, workspace), "rows do not fit"),
                          (lambda: gemv(torch.randn(1, 32), w, None, row, workspace, "silu_mul"), "prologue 'silu_mul'"),
                          (lambda: gemv(torch.randn(1, 32), w, None, dot, workspace), "workspace was not reserved"),
                          (lambda: gemv(torch.randn(1, 32), w, None, row, workspace, "gelu"), "prologue 'gelu'")):
        try:
            call()
        except ValueError as e:
            assert message in str(e), (message, str(e))
        else:
            raise AssertionError(f"no error for: {message}")


def check_argmax() -> None:
    import torch

    from engine.kernels.argmax import CHUNK, Argmax

    vocab = 2 * CHUNK + 37  # a partial last chunk
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, vocab, generator=g)
    logits[1, 7] = logits[1, CHUNK + 3] = logits[1, 2 * CHUNK + 5] = 50.0  # ties across chunks: the first wins
    logits[2, 100] = logits[2, 101] = 60.0  # ties inside a chunk
    logits[3] = float("-inf")
    logits[3, vocab - 1] = 0.0  # the maximum in the partial chunk
    logits[4, :] = 1.0  # all equal: index 0
    argmax = Argmax(8, vocab, logits.device)
    out = torch.full((5,), -1, dtype=torch.long)
    assert argmax(logits, out).tolist() == logits.argmax(-1).tolist() == [logits[0].argmax().item(), 7, 100, vocab - 1, 0]
    out3 = torch.full((3,), -1, dtype=torch.long)
    assert argmax(logits[2:], out3).tolist() == [100, vocab - 1, 0]  # a row slice, as a graph's bucket is


def check_advance() -> None:
    import torch

    from engine.kernels.decode_advance import advance_decode_inputs

    block_size = 4  # tables are 3 blocks wide
    # rows: live mid-block | live at a block's last slot | padding | dry run (no slot, has context) | at its table's end
    ids = torch.tensor([5, 6, 0, 9, 7])
    pos = torch.tensor([1, 3, 0, 6, 11])
    tables = torch.tensor([[10, 11, 12], [20, 21, 22], [0, 0, 0], [0, 0, 0], [30, 31, 32]])
    slots = torch.tensor([10 * 4 + 1, 20 * 4 + 3, -1, -1, 32 * 4 + 3])
    lens = torch.tensor([2, 4, 0, 7, 12])
    hist = torch.full((2, 8), -7)
    counter = torch.zeros(1, dtype=torch.long)
    tokens = torch.tensor([100, 101, 102, 103, 104])
    advance_decode_inputs(ids, pos, slots, lens, tables, tokens, hist, counter, block_size)
    assert counter.tolist() == [1]
    assert hist[0, :5].tolist() == tokens.tolist() and hist[0, 5:].tolist() == [-7] * 3 and hist[1].tolist() == [-7] * 8
    assert ids.tolist() == [100, 101, 0, 9, 7]
    assert pos.tolist() == [2, 4, 0, 6, 11]
    assert lens.tolist() == [3, 5, 0, 7, 12]
    assert slots.tolist() == [10 * 4 + 2, 21 * 4 + 0, -1, -1, 32 * 4 + 3]  # row 1 crossed into its next block
    # the next step, then a replay past the history's depth wraps around to its first row (a ring: a round
    # queued ahead writes the rows after the current round's)
    advance_decode_inputs(ids, pos, slots, lens, tables, torch.tensor([200, 201, 202, 203, 204]), hist, counter, block_size)
    assert hist[1, :5].tolist() == [200, 201, 202, 203, 204] and counter.tolist() == [2]
    assert hist[0, :5].tolist() == tokens.tolist()
    advance_decode_inputs(ids, pos, slots, lens, tables, torch.tensor([300, 301, 302, 303, 304]), hist, counter, block_size)
    assert hist[0, :5].tolist() == [300, 301, 302, 303, 304] and counter.tolist() == [3]
    assert hist[1, :5].tolist() == [200, 201, 202, 203, 204]
    assert pos.tolist() == [4, 6, 0, 6, 11] and ids.tolist() == [300, 301, 0, 9, 7]
    assert slots.tolist() == [11 * 4 + 0, 21 * 4 + 2, -1, -1, 32 * 4 + 3]


CHECKS = {"argmax": check_argmax, "advance": check_advance, "decode": check_decode, "prefill": check_prefill, "store": check_store, "rope_kv": check_rope_kv, "rope_decode": check_rope_decode, "engine": check_engine,
          "engine_gemv": check_engine_gemv, "gemv": check_gemv, "gemv_bf16": check_gemv_bf16, "gemv_rejects_bad_input": check_gemv_rejects_bad_input}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_triton_kernel_matches_torch_reference(check):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    CHECKS[sys.argv[1]]()
