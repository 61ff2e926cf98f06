"""Training methods plug into the one loop through this small interface.

A method (SFT, DPO, GRPO, distillation) decides *what* a micro-batch is and *what* its loss is; the
Trainer decides *how* to step (accumulation, precision, strategy, logging, checkpoints). Register a
method with ``@register_method("name")``; ``train.method`` selects it.

Loss contract (gradient accumulation that is exact):
    ``normalizer(batch)`` is known before the forward (e.g. number of trained tokens). The trainer
    sums it over every micro-batch of the accumulation window and over all ranks, then calls
    ``loss(model, batch)`` which returns the *sum* of per-unit losses; the trainer divides by the
    global normalizer. So ``micro_batch 8 == micro_batch 2 x grad_accum 4`` exactly.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # sum over units (tokens, pairs, sequences) of this micro-batch
    metrics: dict[str, float] = field(default_factory=dict)  # averaged over micro-batches for logging
    num_tokens: int = 0  # tokens processed (for tokens/s)


@dataclass
class Run:
    """What a method gets at setup: everything the trainer built."""

    cfg: Any
    tokenizer: Any
    model: torch.nn.Module  # as wrapped by the strategy (call this for forward)
    strategy: Any
    device: torch.device
    output_dir: Path
    log: Callable[[str], None] = print

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.strategy.unwrap(self.model)

    def autocast(self):
        """The training step's autocast: forwards a method runs itself (scoring rollouts, references)
        must see the same numerics, and bf16 bases with fp32 adapters only multiply under it."""
        from trainer.precision import autocast_context

        return autocast_context(self.device, self.cfg.precision, self.cfg.train.mixed_precision)


class Method:
    """Base class: override ``setup``, ``next_batch``, ``normalizer`` and ``loss``; the rest is optional."""

    name = "base"

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, run: Run) -> None:
        """Build data, reference models, rollout engines... (called once, after the model is wrapped)."""

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch for this rank (tensors on CPU; the trainer moves them)."""
        raise NotImplementedError

    def normalizer(self, batch: dict[str, Any]) -> float:
        """Units the loss is averaged over (trained tokens, pairs...), known before the forward."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError

    def after_optimizer_step(self, run: Run, step: int) -> dict[str, float]:
        """Hook after each optimizer step (GRPO syncs its engine here). Returns extra metrics."""
        return {}

    def evaluate(self, run: Run) -> dict[str, float]:
        """Validation metrics (e.g. val_loss, val_ppl, reward)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Data position and any method state needed for an exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def finish(self, run: Run, history: list[dict[str, Any]]) -> None:
        """After training: method-specific plots and summaries (e.g. a reward curve)."""

    # The metric shown in the progress bar and the summary next to the loss.
    headline_metrics: tuple[str, ...] = ()


_METHODS: dict[str, str] = {
    "sft": "trainer.sft:SFTMethod",
    "dpo": "alignment.dpo:DPOMethod",
    "grpo": "alignment.grpo:GRPOMethod",
    "distill": "distill.kd:DistillMethod",
}


def register_method(name: str, target: str) -> None:
    """Register ``module:Class`` under ``name`` (imported lazily when selected)."""
    _METHODS[name] = target


def build_method(cfg) -> Method:
    module, cls = _METHODS[cfg.train.method].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
