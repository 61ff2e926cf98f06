"""The per-step attention metadata, set by the model runner and read by every attention layer.

A global (as in nano-vllm) keeps the model's forward signature ``(input_ids, positions)`` so the
same module runs eagerly and inside captured CUDA graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Context:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot (block * block_size + offset) of each new token; -1 = skip
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32: tokens in the cache after this step
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32: where each sequence's new tokens start
    max_seqlen_q: int
    is_decode: bool  # one new token per sequence (the decode kernel and CUDA graphs)
    backend: str = "torch"  # torch | triton
    # host copies for the torch reference path, which loops over sequences
    seqlens_q: list[int] | None = None
    context_lens_list: list[int] | None = None
    adapter_ids: torch.Tensor | None = None  # [num_tokens] adapter slot per token, for batched LoRA
    decode_splits: int | None = None  # context splits of the decode kernel (equal in graph and eager steps)
    split_counters: torch.Tensor | None = None  # the decode kernel's arrival counters, owned by the runner


_CONTEXT: Context | None = None


def set_context(context: Context | None) -> None:
    global _CONTEXT
    _CONTEXT = context


def get_context() -> Context:
    assert _CONTEXT is not None, "attention ran outside a model-runner step"
    return _CONTEXT
