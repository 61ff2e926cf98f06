"""The Triton kernels equal the torch reference, run on CPU through the Triton interpreter.

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


CHECKS = {"decode": check_decode, "prefill": check_prefill, "store": check_store, "engine": check_engine}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_triton_kernel_matches_torch_reference(check):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    CHECKS[sys.argv[1]]()
