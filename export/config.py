"""Config sections ``export.*``, ``gguf.*``, ``awq.*`` and ``verify.*``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    pass


@dataclass
class GGUFConfig:
    type: str = "q8_0"


@dataclass
class AWQConfig:
    group_size: int = 128


@dataclass
class VerifyConfig:
    strict: bool = True
