"""Config sections ``engine.*`` (the inference engine) and ``serve.*`` (the HTTP server)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 512  # CPU KV budget
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    dtype: str = "auto"

    def check(self, cfg) -> None:
        pass


@dataclass
class ServeConfig:
    max_waiting: int = 256
    api_key: str | None = None

    def check(self, cfg) -> None:
        pass
