"""Config section ``parallel.*``: how the model and optimizer are spread over devices.

Every combination that cannot work is refused here, at validation, with the reason; nothing is
left to fail (or worse, silently train badly) mid-run.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

SHARDED_PARAMS = ("fsdp2", "zero3")


@dataclass
class ParallelConfig:
    strategy: Literal["single", "ddp", "fsdp2", "zero1", "zero2", "zero3"] = "single"
    offload: Literal["none", "optimizer", "params"] = "none"  # optimizer: zero1-3; params: fsdp2 / zero3
    reshard_after_forward: bool = True  # fsdp2: False keeps params gathered between fwd and bwd (ZeRO-2-like)
    deepspeed_config: str | None = None  # a user JSON merged over the generated DeepSpeed config
    timeout_s: int = 600  # collective timeout; a hung rank fails fast with its rank named
    async_checkpoint: bool = False  # fsdp2: write sharded checkpoints in the background
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"  # torchao float8 scaling (precision=fp8)

    def check(self, cfg) -> None:
        from trainer.config import ConfigError

        s = self.strategy
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s must be > 0 (got {self.timeout_s})")
        world = int(os.environ.get("WORLD_SIZE", 1))
        if s == "single" and world > 1:
            raise ConfigError(f"parallel.strategy=single but torchrun started {world} processes; "
                              "choose parallel.strategy=ddp, fsdp2, zero1, zero2 or zero3")
        if s.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"parallel.strategy={s} needs DeepSpeed: pip install deepspeed")
        if self.deepspeed_config and not s.startswith("zero"):
            raise ConfigError(f"parallel.deepspeed_config is only read by zero1/zero2/zero3 (parallel.strategy={s})")
        if self.deepspeed_config and not os.path.isfile(self.deepspeed_config):
            raise ConfigError(f"parallel.deepspeed_config={self.deepspeed_config!r} does not exist")
        if self.offload == "optimizer" and not s.startswith("zero"):
            raise ConfigError(f"parallel.offload=optimizer is DeepSpeed's (zero1/2/3); with parallel.strategy={s} use "
                              + ("parallel.offload=params (FSDP2 offloads parameters, gradients and the step together)" if s == "fsdp2"
                                 else "a sharded strategy"))
        if self.offload != "none" and s.startswith("zero") and cfg.train.optimizer != "adamw":
            raise ConfigError(f"parallel.offload={self.offload} with parallel.strategy={s} steps DeepSpeed's fp32 CPU Adam on the "
                              f"host; train.optimizer={cfg.train.optimizer} cannot run there (use train.optimizer=adamw)")
        if self.offload == "params" and s not in SHARDED_PARAMS:
            raise ConfigError(f"parallel.offload=params needs sharded parameters (fsdp2 or zero3), not parallel.strategy={s}")
        if not self.reshard_after_forward and s != "fsdp2":
            raise ConfigError(f"parallel.reshard_after_forward=false is an fsdp2 option (parallel.strategy={s})")
        if self.async_checkpoint and s != "fsdp2":
            raise ConfigError(f"parallel.async_checkpoint=true needs parallel.strategy=fsdp2 (DCP); {s} saves synchronously")
        if cfg.quant.load_in_4bit and s in SHARDED_PARAMS:
            self._check_quant_storage(cfg)
        if cfg.precision == "fp8":
            if s.startswith("zero"):
                raise ConfigError(f"precision=fp8 works with single, ddp and fsdp2 (torchao float8), not parallel.strategy={s}")
            if cfg.quant.load_in_4bit:
                raise ConfigError("precision=fp8 with quant.load_in_4bit=true: an NF4 base has no FP8 path; use LoRA on a bf16 base")

    def _check_quant_storage(self, cfg) -> None:
        """FSDP2 / ZeRO-3 shard the packed NF4 storage as one flat buffer per unit, in the params' dtype.

        With any other storage dtype the shards are reinterpreted bytes: the run trains with
        ``loss=0.0, grad_norm=nan`` and no error (accelerate#3983). Refuse it up front.
        """
        from trainer.config import ConfigError
        from trainer.models import param_dtype

        expected = {"torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(param_dtype(cfg))]
        if cfg.quant.quant_storage not in ("auto", expected):
            raise ConfigError(
                f"quant.quant_storage={cfg.quant.quant_storage} with parallel.strategy={self.strategy}: the sharded 4-bit "
                f"weights must be stored as the model's parameter dtype ({expected}); set quant.quant_storage={expected} (or auto) "
                "(a mismatch trains silently broken: loss=0.0, grad_norm=nan)"
            )
