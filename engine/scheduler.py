"""Continuous batching: FCFS admission under a per-step token budget, chunked prefill, preemption.

Every step gives each scheduled sequence some number of new tokens to compute: a decode computes
one, a prefill computes its prompt (or a chunk of it when the budget is short). Running sequences
go first, in arrival order; when the KV cache is full the newest running sequence is preempted (its
blocks freed, recomputed later from its tokens). Waiting sequences are admitted in order while the
budget, the sequence cap and the free blocks allow; one that does not fit stops admission (FCFS).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sequence import Sequence, Status


@dataclass
class Batch:
    seqs: list[Sequence]
    num_new_tokens: list[int]

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly its last token (the CUDA-graph path)."""
        return all(n == 1 and s.num_uncomputed_tokens == 1 for s, n in zip(self.seqs, self.num_new_tokens))


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int):
        self.config = config
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget = self.config.max_num_batched_tokens
        batch = Batch([], [])
        preempted = False
        # 1. Running sequences: decodes and unfinished chunked prefills.
        still_running: deque[Sequence] = deque()
        while self.running:
            seq = self.running.popleft()
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                still_running.append(seq)
                continue
            while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + num_new):
                preempted = True
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.allocate(seq, seq.num_computed_tokens + num_new)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                still_running.append(seq)
                budget -= num_new
        self.running = still_running
        # 2. Waiting sequences, first come first served (not in a step that had to preempt).
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            fresh = not seq.block_table
            if fresh:
                self.block_manager.allocate_cached_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            fits_chunking = self.config.enable_chunked_prefill or num_new == seq.num_uncomputed_tokens
            if not fits_chunking or not self.block_manager.can_allocate(seq, seq.num_computed_tokens + num_new):
                if fresh:
                    self.block_manager.free(seq)
                break
            if fresh:
                self.block_manager.record_prefix_lookup(seq)
            self.block_manager.allocate(seq, seq.num_computed_tokens + num_new)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _preempt(self, seq: Sequence) -> None:
        """Free the blocks; the sequence recomputes its prompt and outputs when readmitted."""
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def advance(self, batch: Batch) -> None:
        """Account for the tokens a step computed (before any sampled token is appended)."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.block_manager.commit(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Queue a sibling of ``parent`` (n > 1) at the front, sharing the parent's prompt blocks."""
        self.block_manager.fork(parent, child)
        self.waiting.appendleft(child)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_usage": bm.usage,
            "prefix_queries": bm.prefix_queries,
            "prefix_hits": bm.prefix_hits,
            "preemptions": self.num_preemptions,
        }
