"""Config sections ``distill.*`` and ``synth.*``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillConfig:
    teacher: str = "smollm2-135m-instruct"

    def check(self, cfg) -> None:
        pass


@dataclass
class SynthConfig:
    num_instructions: int = 64

    def check(self, cfg) -> None:
        pass
