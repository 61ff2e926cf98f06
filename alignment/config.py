"""Config sections ``dpo.*`` and ``grpo.*``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DPOConfig:
    loss: str = "sigmoid"
    beta: float = 0.1

    def check(self, cfg) -> None:
        pass


@dataclass
class GRPOConfig:
    group_size: int = 4

    def check(self, cfg) -> None:
        pass
