"""Fixed-size KV blocks: allocation with reference counts, and hash-based prefix caching.

A full block's hash chains over every token before it (``hash(prev_hash, adapter_id, tokens)``), so
equal hashes mean equal prefixes under the same adapter. Blocks whose last user finished stay in the
hash table while they sit on the free list; they are reused on a hit and evicted least recently
freed first when a fresh block is needed.
"""
from __future__ import annotations

from collections import OrderedDict

from engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(prev_hash: int | None, adapter_id: int, token_ids: list[int] | tuple[int, ...]) -> int:
    return hash((prev_hash, adapter_id, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which were found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_ids) / len(self.blocks)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached contents
            del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def allocate_cached_prefix(self, seq: Sequence) -> None:
        """Start a fresh sequence on cached blocks holding its prompt's longest cached prefix."""
        assert not seq.block_table
        seq.num_computed_tokens = 0
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:  # prompt logprobs need every position computed
            return
        # Leave at least one token uncomputed: the step that computes it yields the next token's logits.
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.block_tokens(i))
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, seq.adapter_id, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:  # miss (or a hash collision)
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size

    def record_prefix_lookup(self, seq: Sequence) -> None:
        self.prefix_queries += len(seq)
        self.prefix_hits += seq.num_computed_tokens

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return seq.num_blocks_for(num_tokens) - len(seq.block_table) <= len(self.free_ids)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table to hold ``num_tokens`` tokens (call ``can_allocate`` first)."""
        for _ in range(seq.num_blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_fresh())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` (same prompt) share the parent's full prompt blocks instead of recomputing them."""
        shared = (child.num_prompt_tokens - 1) // self.block_size
        for block_id in parent.block_table[:shared]:
            self._take(block_id)
        child.block_table = parent.block_table[:shared]
        child.block_hashes = parent.block_hashes[:shared]
        child.num_computed_tokens = shared * self.block_size

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full and computed in the last step."""
        if not self.enable_prefix_caching:
            return
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            tokens = tuple(seq.block_tokens(i))
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, seq.adapter_id, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:  # the first copy of a prefix is the cached one
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        # In reverse, so a sequence's tail blocks are evicted before the prefix blocks others may share.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (their KV was computed with weights that just changed)."""
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block.clear()
