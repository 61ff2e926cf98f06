"""A step's adapter tokens grouped by slot: the work list of the SGMV shrink and expand kernels (``lora_triton.py``).

``rows`` holds token rows sorted by slot; work item w covers ``rows[lo[w]:hi[w]]``, at most
``block_m`` rows, all of slot ``slot[w]`` (-1: padding, nothing to do). Base tokens (slot -1) are in
no item.

Two builders give the same list: eager steps build it on the host from the groups the runner
already knows (a tight list, one small copy); captured CUDA-graph steps build it on the device from
the static per-token slot buffer, with only sync-free, capturable ops and a fixed length, so the
graph replays it for whatever adapters the next batch mixes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    rows: torch.Tensor  # [tokens] int64 token rows, sorted by slot
    item_slot: torch.Tensor  # [W] int64, -1 = padding
    item_lo: torch.Tensor  # [W] int64 first position in rows
    item_hi: torch.Tensor  # [W] int64 end position in rows
    block_m: int  # rows per item (the kernel's row tile)


def block_m_for(max_rows_per_slot: int) -> int:
    """Row tile: 16 (tl.dot's minimum) for decode-sized groups, 64 when prefill chunks make tall ones."""
    return 16 if max_rows_per_slot <= 256 else 64


def segments_from_groups(groups: list[tuple[int, torch.Tensor]], device: torch.device) -> Segments:
    """Host-built work list for (slot, token rows) groups whose sizes the host knows (eager steps)."""
    counts = [rows.numel() for _, rows in groups]
    block_m = block_m_for(max(counts))
    items, offset = [], 0
    for (slot, _), n in zip(groups, counts):
        items += [(slot, offset + lo, offset + min(lo + block_m, n)) for lo in range(0, n, block_m)]
        offset += n
    slot, lo, hi = torch.tensor(items, dtype=torch.long).T.contiguous().to(device, non_blocking=True)
    rows = torch.cat([r.to(device=device, dtype=torch.long) for _, r in groups])
    return Segments(rows, slot, lo, hi, block_m)


def segments_on_device(slots: torch.Tensor, num_slots: int, block_m: int = 16) -> Segments:
    """Device-built work list for per-token ``slots`` (-1 = base), of fixed length
    ``ceil(T / block_m) + num_slots`` (a bound on the items any mix needs), without a host sync."""
    num_tokens, device = slots.shape[0], slots.device
    classes = slots.long() + 1  # 0 = base, s + 1 = slot s
    onehot = (classes[None, :] == torch.arange(num_slots + 1, device=device)[:, None]).long()  # [S + 1, T]
    counts = onehot.sum(1)
    starts = counts.cumsum(0) - counts
    rank_in_class = (onehot.cumsum(1) * onehot).sum(0) - 1
    position = starts[classes] + rank_in_class  # a stable sort by slot, written as arithmetic
    rows = torch.empty(num_tokens, dtype=torch.long, device=device).scatter_(0, position, torch.arange(num_tokens, device=device))

    blocks = (counts[1:] + block_m - 1) // block_m  # items per adapter slot
    block_end = blocks.cumsum(0)
    num_items = -(-num_tokens // block_m) + num_slots
    w = torch.arange(num_items, device=device)
    owner = torch.searchsorted(block_end, w, right=True)  # the slot of item w; num_slots past the last
    slot = owner.clamp(max=num_slots - 1)
    lo = starts[slot + 1] + (w - (block_end[slot] - blocks[slot])) * block_m
    hi = torch.minimum(lo + block_m, starts[slot + 1] + counts[slot + 1])
    slot = torch.where(owner < num_slots, slot, torch.full_like(slot, -1))
    return Segments(rows, slot, lo, hi, block_m)
