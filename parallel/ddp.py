"""DDP: every rank holds the whole model; gradients are all-reduced once per accumulation window."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from parallel.base import OptimizerFactory
from parallel.distributed import DistributedStrategy


class DDPStrategy(DistributedStrategy):
    name = "ddp"

    def wrap(self, model: torch.nn.Module, make_optimizer: OptimizerFactory) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from parallel.fp8 import maybe_apply_fp8

        maybe_apply_fp8(model, self.cfg)
        model.to(self.device)
        # frozen parameters (a LoRA base) are not registered for all-reduce at all, so the default
        # find_unused_parameters=False holds: every trainable parameter is used in each forward
        ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return ddp, make_optimizer([p for p in ddp.parameters() if p.requires_grad])

    def no_sync(self, model: torch.nn.Module, is_last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if is_last_micro_batch else model.no_sync()
