"""Optimizer and learning-rate schedule factories (``train.optimizer``, ``train.scheduler``).

Both are plain functions of the config so strategies can build the optimizer *after* they have
sharded the parameters (``Strategy.wrap(model, make_optimizer)``).
"""
from __future__ import annotations

import math
from functools import partial

import torch

from trainer.config import Config, ConfigError


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (fused kernel on GPU), or a bitsandbytes 8-bit / paged AdamW.

    Weight decay applies to matrices only: norms and biases (1-D) are not decayed, the usual
    choice for transformers and what makes ``train.weight_decay`` safe to turn on.
    """
    t = cfg.train
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (check lora.target_modules / lora.enabled)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = dict(lr=t.lr, betas=tuple(t.betas))
    if t.optimizer == "adamw":
        on_gpu = all(p.is_cuda for p in params)
        # fused=True needs every param on one accelerator; on CPU the foreach path is the fast one
        return torch.optim.AdamW(groups, fused=on_gpu or None, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"train.optimizer={t.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw": bnb.optim.PagedAdamW}
    return classes[t.optimizer](groups, **kwargs)


def lr_multiplier(step: int, *, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """The factor applied to the peak lr after ``step`` optimizer steps.

    Linear warmup from ``1/warmup`` to 1 over ``warmup`` steps, then ``kind`` decays to
    ``min_ratio`` at ``total`` steps (``constant`` stays at 1).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"train.scheduler={kind!r} is not one of cosine, linear, constant")
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg.train
    # warmup_steps >= max_steps is allowed (a short debugging run of a long recipe): it never finishes warming up
    fn = partial(lr_multiplier, warmup=t.warmup_steps, total=t.max_steps, kind=t.scheduler, min_ratio=t.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
