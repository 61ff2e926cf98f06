"""Move a CUDA-graph decode step's inputs on to the next position, on the device.

The last kernel of every captured decode graph. It records the step's greedy tokens in a history
row (``hist[step % depth]``, ``step`` read from and incremented in a device counter) and makes them the
next step's input ids, with each row's position, context length and KV slot advanced by one (the
slot looked up in the row's block table). Replaying the same graph k times in a row is then k
greedy decode steps with no host work between them; the host reads ``hist[:k]`` once.

Only rows that stored K/V this step (slot >= 0) advance: padding rows (slot -1, length 0) and the
benchmarks' dry-run rows (slot -1, length > 0: attention without any cache write) stay as they are.
A row also stays when its next position is past its block table; the engine never replays a row
further than the blocks it allocated, so that case only arises for a step the host re-prepares.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _advance_kernel(ids_ptr, pos_ptr, slot_ptr, lens_ptr, tables_ptr, tokens_ptr, hist_ptr, counter_ptr,
                    n, width, hist_stride, num_steps, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    in_batch = rows < n
    step = tl.load(counter_ptr)
    row = step % num_steps  # a ring: rounds queued back to back write successive rows
    tokens = tl.load(tokens_ptr + rows, mask=in_batch, other=0)
    tl.store(hist_ptr + row * hist_stride + rows, tokens, mask=in_batch)
    slot = tl.load(slot_ptr + rows, mask=in_batch, other=-1)
    length = tl.load(lens_ptr + rows, mask=in_batch, other=0)
    pos = tl.load(pos_ptr + rows, mask=in_batch, other=0) + 1
    index = pos // BLOCK_SIZE
    live = in_batch & (slot >= 0) & (index < width)
    block = tl.load(tables_ptr + rows * width + index, mask=live, other=0)
    tl.store(ids_ptr + rows, tokens, mask=live)
    tl.store(pos_ptr + rows, pos, mask=live)
    tl.store(lens_ptr + rows, length + 1, mask=live)
    tl.store(slot_ptr + rows, block * BLOCK_SIZE + pos % BLOCK_SIZE, mask=live)
    tl.debug_barrier()  # every warp has read the step counter before it moves on
    tl.store(counter_ptr, step + 1)


def advance_decode_inputs(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor,
                          tables: torch.Tensor, tokens: torch.Tensor, hist: torch.Tensor, counter: torch.Tensor,
                          block_size: int) -> None:
    """In place, for the first ``len(ids)`` rows: ``hist[counter] = tokens``, ``counter += 1``, and every
    row with a KV slot moves to its next position with ``tokens`` as input. All tensors int64;
    ``tables`` [rows, width] contiguous; ``hist`` [steps, >= rows] with contiguous rows."""
    n, width = ids.shape[0], tables.shape[1]
    assert tables.is_contiguous() and hist.stride(1) == 1 and n <= hist.shape[1]
    _advance_kernel[(1,)](ids, positions, slots, lens, tables, tokens, hist, counter, n, width, hist.stride(0), hist.shape[0],
                          BLOCK_SIZE=block_size, BLOCK=max(triton.next_power_of_2(hist.shape[1]), 16))
