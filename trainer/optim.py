"""Optimizer and learning-rate schedule factories (``train.optimizer``, ``train.scheduler``).

Both are plain functions of the config so strategies can build the optimizer *after* they have
sharded the parameters (``Strategy.wrap(model, make_optimizer)``).
"""
from __future__ import annotations

import math
from functools import partial

import torch

from trainer.config import Config, ConfigError


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter], masters: dict[int, torch.Tensor] | None = None) -> torch.optim.Optimizer:
    """AdamW (fused kernel on GPU), or a bitsandbytes 8-bit / paged AdamW.

    Weight decay applies to matrices only: norms and biases (1-D) are not decayed, the usual
    choice for transformers and what makes ``train.weight_decay`` safe to turn on. ``masters``
    (``train.mixed_precision=bf16_weights``: fp32 copies of the bf16 params by ``id``) selects
    ``MasterWeightAdamW``.
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
        if masters is not None:
            return MasterWeightAdamW(groups, masters, fused=on_gpu or None, **kwargs)
        return torch.optim.AdamW(groups, fused=on_gpu or None, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"train.optimizer={t.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw": bnb.optim.PagedAdamW}
    return classes[t.optimizer](groups, **kwargs)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW whose parameters are fp32 masters of the model's bf16 parameters (cast-once mixed precision).

    The model trains on its bf16 parameters; this optimizer owns their fp32 copies. ``step`` casts
    the bf16 gradients up once, runs AdamW on the masters in fp32 and writes the rounded result
    back into the model once, so weights are cast once per optimizer step instead of at every use.
    ``param_groups`` (and so the lr schedule) and ``state`` are the masters'. The state dict carries
    the master values too: the model's checkpoint holds only the rounded bf16 weights, and resume
    must continue from the exact fp32 ones.
    """

    def __init__(self, groups: list[dict], masters: dict[int, torch.Tensor], **kwargs):
        self.model_params = [p for g in groups for p in g["params"]]
        self.masters = [_master_of(p, masters) for p in self.model_params]
        by_model_param = dict(zip(map(id, self.model_params), self.masters))
        super().__init__([{**g, "params": [by_model_param[id(p)] for p in g["params"]]} for g in groups], **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:  # a closure would recompute bf16 grads after they were upcast
            raise ValueError("MasterWeightAdamW.step does not take a closure")
        self._upcast_grads()
        super().step()
        torch._foreach_copy_(self.model_params, self.masters)
        for master in self.masters:
            master.grad = None  # the fp32 gradients are transient: keep only the bf16 ones between steps

    def _upcast_grads(self) -> None:
        """fp32 copies of the bf16 gradients as the masters' grads: one multi-tensor copy, not a cast
        kernel per parameter (a LoRA model has hundreds of small adapters)."""
        pairs = [(m, p.grad) for m, p in zip(self.masters, self.model_params) if p.grad is not None]
        if not pairs:
            return
        upcast = [torch.empty_like(m) for m, _ in pairs]
        torch._foreach_copy_(upcast, [g for _, g in pairs])
        for (master, _), grad in zip(pairs, upcast):
            master.grad = grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for param in self.model_params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "master_weights": list(self.masters)}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        if saved is None:
            raise ValueError("optimizer state has no master_weights: it was saved without train.mixed_precision=bf16_weights; "
                             "resume with the mixed_precision the run was started with")
        if len(saved) != len(self.masters):
            raise ValueError(f"optimizer state has {len(saved)} master weights, this model trains {len(self.masters)} parameters")
        super().load_state_dict(state_dict)
        torch._foreach_copy_(self.masters, [m.to(self.masters[0].device) for m in saved])
        torch._foreach_copy_(self.model_params, self.masters)


def _master_of(param: torch.Tensor, masters: dict[int, torch.Tensor]) -> torch.Tensor:
    """The fp32 master of ``param``: the pre-rounding copy when one was taken, else its upcast value."""
    master = masters.get(id(param))
    return (master if master is not None else param.detach().float().clone()).to(param.device)


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
