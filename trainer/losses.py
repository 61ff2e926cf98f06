"""Token-level losses as small pure functions.

The one subtle piece is ``chunked_cross_entropy``: the logits of a batch are ``[tokens, vocab]``
(for SmolLM2, 49152 floats per token: 8K tokens already make 1.6 GB in fp32, more than the whole
135M model). Here the hidden states are projected through the LM head a chunk of tokens at a time,
each chunk inside ``torch.utils.checkpoint`` so its logits are freed right after its loss is taken
and recomputed (again one chunk at a time) in the backward. Peak logits memory is
``chunk_size x vocab`` in both passes, whatever the batch size; the price is one extra LM-head
matmul per chunk in the backward.

Every function returns the *sum* over tokens: dividing by the token count of the whole accumulation
window is the trainer's job (see ``trainer.methods``), which is what makes accumulation exact.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

Head = Callable[[torch.Tensor], torch.Tensor]  # [N, H] hidden -> [N, V] logits (the LM head)


def shift_for_next_token(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each position's hidden state with the *next* token's label and keep only trained pairs.

    ``labels`` are aligned with the inputs (HF convention): position t predicts ``labels[t + 1]``.
    Dropping ignored positions before the head means prompt and padding tokens cost no LM-head
    FLOPs at all. Returns ``hidden [N, H]`` and ``targets [N]``.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def cross_entropy_sum(hidden: torch.Tensor, targets: torch.Tensor, head: Head) -> torch.Tensor:
    """Plain summed CE: all logits at once (the reference the chunked version must equal)."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk_size: int) -> torch.Tensor:
    """Summed CE over ``[N, H]`` hidden states without ever holding more than ``chunk_size`` rows of logits.

    ``chunk_size <= 0`` or ``N <= chunk_size`` falls back to ``cross_entropy_sum`` (nothing to save).
    Logits are upcast to fp32 inside the chunk, so bf16 autocast never reduces the softmax in bf16.
    """
    n = hidden.shape[0]
    if n == 0:  # a micro-batch with no trained token still has to join the graph (DDP expects grads)
        return hidden.sum() * 0.0
    if chunk_size <= 0 or n <= chunk_size:
        return cross_entropy_sum(hidden, targets, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        # use_reentrant=False: the head's weight may be frozen or tied, and the chunk output is a
        # scalar, so the only thing saved per chunk is its slice of hidden states.
        total = total + checkpoint(cross_entropy_sum, h, y, head, use_reentrant=False)
    return total


def causal_lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: Head, chunk_size: int) -> tuple[torch.Tensor, int]:
    """Next-token CE summed over trained tokens, and how many tokens that was.

    ``hidden`` is the final (normed) hidden state ``[B, T, H]``; ``labels`` ``[B, T]`` as in the data contract.
    """
    h, y = shift_for_next_token(hidden, labels)
    return chunked_cross_entropy(h, y, head, chunk_size), int(y.numel())


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss in a ``[B, T]`` label batch (the SFT normalizer)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
