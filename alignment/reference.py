"""The frozen reference policy that DPO and GRPO's KL term compare against.

- ``copy``: a deep copy of the policy taken at setup (full fine-tuning; costs one more model).
- ``lora_disabled``: the policy itself with its adapters switched off (``disable_adapter()``): with
  fresh adapters that *is* the starting policy, at no extra memory.
- ``auto``: ``lora_disabled`` when LoRA is on, else ``copy``.
DPO's third option, ``precomputed``, runs one of these once over the data and caches the numbers
(alignment/dpo.py).
"""
from __future__ import annotations

import contextlib
import copy

import torch

from alignment.sequences import token_logprobs
from trainer.config import ConfigError


def resolve_kind(kind: str, lora_enabled: bool) -> str:
    if kind == "auto":
        return "lora_disabled" if lora_enabled else "copy"
    return kind


class Reference:
    def __init__(self, kind: str, policy: torch.nn.Module, key: str):
        """``policy`` is the unwrapped (PEFT/HF) module; ``key`` names the config key in errors."""
        self.kind = kind
        self.policy = policy
        if kind == "lora_disabled":
            if not hasattr(policy, "disable_adapter"):
                raise ConfigError(f"{key}=lora_disabled needs a LoRA model (lora.enabled=true)")
            self.model = None
        elif kind == "copy":
            self.model = copy.deepcopy(policy).eval()
            self.model.requires_grad_(False)
        else:
            raise ConfigError(f"{key}={kind!r}: choose copy or lora_disabled")

    @torch.no_grad()
    def token_logprobs(self, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        if self.model is not None:
            return token_logprobs(self.model, batch, temperature)[0]
        was_training = self.policy.training
        self.policy.eval()  # no adapter dropout either way; restores the mode after
        try:
            with self.policy.disable_adapter() if hasattr(self.policy, "disable_adapter") else contextlib.nullcontext():
                return token_logprobs(self.policy, batch, temperature)[0]
        finally:
            self.policy.train(was_training)
