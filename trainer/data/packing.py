"""Micro-batches: best-fit-decreasing packing, per-document position ids, rank sharding, exact resume.

Attention never crosses documents, without building any mask here: transformers (5.x,
``masking_utils.find_packed_sequence_indices``) splits a row into documents wherever ``position_ids``
do not increase by exactly 1, and builds a block-diagonal causal mask for sdpa and eager — but only
when ``attention_mask is None`` and ``past_key_values is None``. Llama/Qwen configs default to
``use_cache=True``, which makes the model create an (empty) cache and silently fall back to a plain
causal mask over the whole packed row. So call the model with ``model_inputs(batch)``
(``use_cache=False``, no attention mask); tests/test_data_packing.py holds the packed == unpacked proof.

Padding goes at the end of a row with its own restarting position ids (a separate "document" with
labels -100), so it is never attended to by real tokens and never trained.
"""
from __future__ import annotations

import random
from bisect import bisect_left, insort
from typing import Any, Iterator, Sequence

import torch

from trainer.data.formats import IGNORE, Example


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices into ``lengths`` grouped into bins of total length <= ``capacity``.

    Each item goes to the fullest bin it still fits in. Bins are kept by remaining room (a sorted list
    of distinct room sizes, at most ``capacity`` of them), so packing n items costs O(n log n).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep the given order
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}
    rooms: list[int] = []  # sorted keys of by_room
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"item {i} has length {need} > capacity {capacity}")
        k = bisect_left(rooms, need)
        if k < len(rooms):
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            by_room[left].append(b)
    return bins


def collate(rows: list[list[Example]], pad_id: int = 0, width: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of documents -> ``input_ids``/``labels``/``position_ids`` [B, T]; T = ``width`` if given
    (a static shape for compiled models), else the longest row."""
    longest = max(sum(len(e) for e in row) for row in rows)
    width = max(width or 0, longest)
    input_ids, labels, positions = [], [], []
    for row in rows:
        ids, lab, pos = [], [], []
        for e in row:
            ids += e.input_ids
            lab += e.labels
            pos += range(len(e))
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        labels.append(lab + [IGNORE] * pad)
        positions.append(pos + list(range(pad)))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Forward kwargs that keep packed documents apart (see the module docstring for why use_cache=False)."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


def _rows(examples: Sequence[Example], order: list[int], seq_len: int, packing: bool) -> list[list[int]]:
    if not packing:
        return [[i] for i in order]
    bins = pack_bfd([len(examples[i]) for i in order], seq_len)
    return [[order[j] for j in b] for b in bins]


class PackedLoader:
    """An endless stream of micro-batches for one rank; epochs are reshuffled from ``seed + epoch``.

    Each epoch: shuffle the examples, pack them (or one per row), shuffle the rows, drop the last
    ``len(rows) % world_size`` rows so every rank gets as many, and give rank r the rows
    ``r, r + world_size, ...`` — disjoint shards of equal length. Every rank therefore sits at the same
    (epoch, position) after each micro-batch, so the state of any rank resumes all of them.
    """

    def __init__(self, examples: Sequence[Example], micro_batch_size: int, seq_len: int, packing: bool = True,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, pad_id: int = 0,
                 static_shape: bool = False):
        if not examples:
            raise ValueError("PackedLoader needs at least one example")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        too_long = next((i for i, e in enumerate(examples) if len(e) > seq_len), None)
        if too_long is not None:
            raise ValueError(f"example {too_long} has {len(examples[too_long])} tokens > seq_len={seq_len}; build examples with the same seq_len")
        self.examples, self.micro_batch_size, self.seq_len = examples, micro_batch_size, seq_len
        self.packing, self.seed, self.shuffle, self.pad_id = packing, seed, shuffle, pad_id
        self.static_shape = static_shape  # pad every micro-batch to seq_len (one shape for torch.compile)
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0  # position: rows of this rank's current epoch already served
        self._plan_epoch, self._plan = -1, []

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        if epoch != self._plan_epoch:
            rng = random.Random(f"{self.seed}-{epoch}")
            order = list(range(len(self.examples)))
            if self.shuffle:
                rng.shuffle(order)
            rows = _rows(self.examples, order, self.seq_len, self.packing)
            if self.shuffle and self.packing:
                rng.shuffle(rows)  # BFD emits the longest documents first
            usable = len(rows) - len(rows) % self.world_size
            if usable == 0:
                raise ValueError(f"{len(rows)} rows of training data cannot be split over world_size={self.world_size} ranks")
            self._plan_epoch, self._plan = epoch, rows[self.rank : usable : self.world_size]
        return self._plan

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows: list[list[int]] = []
        while len(rows) < self.micro_batch_size:  # a micro-batch may straddle two epochs
            plan = self._epoch_plan(self.epoch)
            take = plan[self.position : self.position + self.micro_batch_size - len(rows)]
            rows += take
            self.position += len(take)
            if self.position >= len(plan):
                self.epoch, self.position = self.epoch + 1, 0
        return collate([[self.examples[i] for i in row] for row in rows], self.pad_id, self.seq_len if self.static_shape else None)

    @classmethod
    def for_run(cls, examples: Sequence[Example], cfg, rank: int, world_size: int, pad_id: int) -> "PackedLoader":
        """The loader of a training run, configured from ``cfg`` (SFT and distillation share it).

        With ``train.compile`` every micro-batch is padded to ``train.seq_len``: packed rows otherwise
        differ by a few tokens from batch to batch, and each new width recompiles every compiled
        layer (measured on the Llama-3.2-1B shape: ~4 s per new width, 2.5x slower end to end).
        """
        return cls(examples, cfg.train.micro_batch_size, cfg.train.seq_len, cfg.data.packing, seed=cfg.seed,
                   shuffle=cfg.data.shuffle, rank=rank, world_size=world_size, pad_id=pad_id or 0,
                   static_shape=cfg.train.compile)

    @property
    def rows_per_epoch(self) -> int:
        """Rows (sequences) this rank sees per epoch."""
        return len(self._epoch_plan(self.epoch))

    @property
    def fill(self) -> float:
        """Real tokens / all tokens of this rank's padded micro-batches over an epoch (1.0 = no padding)."""
        lengths = [sum(len(self.examples[i]) for i in row) for row in self._epoch_plan(self.epoch)]
        b = self.micro_batch_size
        width = (lambda chunk: self.seq_len) if self.static_shape else max
        padded = sum(width(lengths[s : s + b]) * len(lengths[s : s + b]) for s in range(0, len(lengths), b))
        return sum(lengths) / padded

    def _fingerprint(self) -> dict[str, Any]:
        return {"num_examples": len(self.examples), "num_tokens": sum(len(e) for e in self.examples), "seq_len": self.seq_len,
                "packing": self.packing, "seed": self.seed, "shuffle": self.shuffle, "world_size": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._fingerprint()
        changed = [f"{k}: {state.get(k)} -> {v}" for k, v in mine.items() if state.get(k) != v]
        if changed:
            raise ValueError(f"cannot resume the data position exactly, the data or loader changed ({'; '.join(changed)})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def iter_eval_batches(examples: Sequence[Example], micro_batch_size: int, seq_len: int, packing: bool = True,
                      rank: int = 0, world_size: int = 1, pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Every example exactly once, in a fixed order, split over ranks (the last batch may be smaller).

    Ranks can get one batch more or less than each other: reduce sums after the loop, not per batch.
    """
    rows = _rows(examples, list(range(len(examples))), seq_len, packing)[rank::world_size]
    for s in range(0, len(rows), micro_batch_size):
        yield collate([[examples[i] for i in row] for row in rows[s : s + micro_batch_size]], pad_id)
