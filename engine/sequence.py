"""One sequence being generated: its tokens, how many of them are in the KV cache, and its blocks."""
from __future__ import annotations

from enum import Enum, auto
from itertools import count

import torch

from engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(self, request_id: str, index: int, token_ids: list[int], params: SamplingParams,
                 seed: int | None, block_size: int, adapter_id: int = 0):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.block_size = block_size
        self.adapter_id = adapter_id  # part of the prefix-cache key: KV depends on the adapter
        self.status = Status.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full, computed blocks (prefix caching)
        # A seeded sequence samples from its own generator so its tokens do not depend on batch-mates.
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.output_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.partial_prompt_logprobs: list[dict[int, float]] = []  # filled chunk by chunk
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""  # detokenized output, kept only when stop strings need it
        self.forks: list["Sequence"] = []  # n > 1: siblings admitted once this one's prompt is cached

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]
