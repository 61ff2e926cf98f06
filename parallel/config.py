"""Config section ``parallel.*``: how the model and optimizer are spread over devices."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ParallelConfig:
    strategy: Literal["single", "ddp", "fsdp2", "zero1", "zero2", "zero3"] = "single"
    offload: Literal["none", "optimizer", "params"] = "none"
    reshard_after_forward: bool = True  # fsdp2: False keeps params gathered between fwd and bwd (ZeRO-2-like)
    deepspeed_config: str | None = None  # a user JSON merged over the generated DeepSpeed config
    timeout_s: int = 600  # collective timeout; a hung rank fails fast with its rank named
    async_checkpoint: bool = False
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"

    def check(self, cfg) -> None:
        pass
