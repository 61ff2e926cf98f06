"""Row-wise argmax over a vocabulary, for the greedy token at the end of a decode graph.

torch's argmax reduces one row with a single thread block: ~28 us for a 128k vocabulary on an H100,
2 % of a 1B model's whole decode step. Here each row is split into chunks that many programs
reduce at once (max and its first index per chunk), and a second small kernel picks, per row, the
largest chunk maximum, the earliest chunk on ties — so the result is torch's (the first index of
the maximum), which the eager sampler computes for the same logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # logits per program: 16 KB of fp32, a few hundred ns of traffic


@triton.jit
def _chunk_max_kernel(x_ptr, part_val_ptr, part_idx_ptr, V, x_stride, num_chunks, CHUNK: tl.constexpr):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * x_stride + offs, mask=offs < V, other=float("-inf"))
    value, index = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(part_val_ptr + row * num_chunks + chunk, value)
    tl.store(part_idx_ptr + row * num_chunks + chunk, chunk * CHUNK + index)


@triton.jit
def _row_max_kernel(part_val_ptr, part_idx_ptr, out_ptr, num_chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_chunks
    values = tl.load(part_val_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
    indices = tl.load(part_idx_ptr + row * num_chunks + offs, mask=mask, other=0)
    best = tl.max(values, 0)
    # the earliest chunk holding the maximum has the smallest index: the row's first maximum
    first = tl.min(tl.where(mask & (values == best), indices, 2 ** 62), 0)
    tl.store(out_ptr + row, first)


class Argmax:
    """Buffers for rows of up to ``max_rows`` x ``vocab`` fp32 logits, allocated once (graphs hold them)."""

    def __init__(self, max_rows: int, vocab: int, device: torch.device):
        self.num_chunks = triton.cdiv(vocab, CHUNK)
        self.values = torch.empty(max_rows, self.num_chunks, dtype=torch.float32, device=device)
        self.indices = torch.empty(max_rows, self.num_chunks, dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out[i] = logits[i].argmax()`` (int64) for fp32 ``logits`` [rows, vocab] with contiguous rows."""
        rows, vocab = logits.shape
        assert logits.dtype == torch.float32 and logits.stride(1) == 1 and triton.cdiv(vocab, CHUNK) == self.num_chunks
        assert rows <= self.values.shape[0] and out.shape == (rows,) and out.dtype == torch.long
        _chunk_max_kernel[(rows, self.num_chunks)](logits, self.values, self.indices, vocab, logits.stride(0), self.num_chunks,
                                                   CHUNK=CHUNK)
        _row_max_kernel[(rows,)](self.values, self.indices, out, self.num_chunks,
                                 BLOCK=max(triton.next_power_of_2(self.num_chunks), 16))
        return out
