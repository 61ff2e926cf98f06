"""DeepSpeed ZeRO stages 1-3 (``parallel.strategy=zero1|zero2|zero3``) through ``deepspeed.initialize``.

The DeepSpeed config is generated from ours (batch sizes, clipping, bf16, stage, offload, buffer
sizes from the model's layer size) and a user JSON (``parallel.deepspeed_config``) is merged over it;
``trainer.memory`` estimates from the same resolved config. The model is built normally (not under
``zero.Init``) and partitioned by ``deepspeed.initialize``, so every model source, LoRA and QLoRA
work unchanged. Without offload the optimizer is our own torch optimizer (no CPU-Adam build);
with offload DeepSpeed's CPU Adam runs the step on the host.

Gradient accumulation: the loop marks the last micro-batch through ``no_sync``; DeepSpeed reduces
gradients only at that boundary. Clipping happens inside ``engine.step()``, so the gradient norm
exists only after the step: ``clip_grad_norm`` takes the step and ``optimizer_step`` then finds
nothing left to do. (So under ZeRO a non-finite gradient norm is reported after it was applied;
the first-step guard still refuses a non-finite or all-zero loss before the first step.)
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from parallel.base import OptimizerFactory, is_peft
from parallel.distributed import DistributedStrategy
from trainer.config import ConfigError, deep_merge

TAG = "zero"


# DeepSpeed's own default for its gradient and all-gather buckets (elements): the cap of ours.
DEEPSPEED_DEFAULT_BUCKET = 500_000_000
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000  # elements; ZeRO-3 keeps smaller parameters whole on every rank


def deepspeed_config(cfg, world_size: int, on_gpu: bool, hf_config=None) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg`` (before the user's overrides).

    With ``hf_config`` (the model's transformers config) the communication buffers are sized from
    the model (``zero_buffer_sizes``) instead of DeepSpeed's 5e8-element defaults; the memory
    estimator calls this with the same config, so it counts exactly the buffers that will exist.
    """
    stage = int(cfg.parallel.strategy[-1])
    t = cfg.train
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
    if hf_config is not None:
        zero.update(zero_buffer_sizes(cfg, hf_config, stage))
    if cfg.parallel.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.parallel.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": on_gpu and cfg.precision in ("bf16", "fp8")},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW / bitsandbytes optimizers
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def zero_buffer_sizes(cfg, hf_config, stage: int) -> dict[str, int]:
    """Bucket and ZeRO-3 prefetch/release sizes (in elements) derived from one decoder layer.

    DeepSpeed's defaults are absolute (5e8-element buckets: two 1 GB bf16 gradient buffers under
    overlap_comm whatever the model, even for LoRA). Sized by the layer instead:

    * ``reduce_bucket_size`` / ``allgather_bucket_size``: one layer's worth of gradients, so the
      reduction of layer k overlaps the backward of layer k-1 (capped at DeepSpeed's default).
    * ``stage3_prefetch_bucket_size``: the next whole layer is gathered while this one computes.
    * ``stage3_max_reuse_distance``: 2 layers. With activation checkpointing a layer is used by its
      recompute and then by its backward, less than two layers apart in DeepSpeed's trace, so it is
      gathered once for both; a smaller window would gather it a third time. DeepSpeed's 1e9 default
      also keeps the last forward layers gathered into the backward: memory the estimate would have
      to count, for no fewer gathers.
    * ``stage3_max_live_parameters``: current + prefetched + reused layer.
    * ``stage3_param_persistence_threshold``: norms, biases and LoRA adapters stay gathered (tiny,
      used in every layer: all-gathering them is pure latency); never below DeepSpeed's 1e5 default.
    """
    from trainer.memory import ModelShape

    shape = ModelShape.from_hf(hf_config)
    layer = shape.layer_params
    bucket = min(DEEPSPEED_DEFAULT_BUCKET, _round_up(layer, 512))  # all-gather buckets must be NCCL-aligned
    sizes = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if stage == 3:
        widest = max(max(io) for io in shape.layer_linears().values())
        adapter = cfg.lora.rank * widest if cfg.lora.enabled else 0
        sizes["stage3_param_persistence_threshold"] = max(DEEPSPEED_PERSISTENCE_THRESHOLD, 10 * shape.hidden, adapter)
        if not cfg.quant.load_in_4bit:
            # a bounded prefetch window over bitsandbytes' Linear4bit fails DeepSpeed 0.19's trace check
            # ("tracing error ... expected the next parameters"); NF4 bases keep DeepSpeed's defaults
            sizes.update({"stage3_prefetch_bucket_size": layer, "stage3_max_reuse_distance": 2 * layer,
                          "stage3_max_live_parameters": 3 * layer})
    return sizes


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def resolved_deepspeed_config(cfg, world_size: int, on_gpu: bool, hf_config=None) -> dict[str, Any]:
    """What ``deepspeed.initialize`` receives: the generated config with the user's JSON merged over it."""
    generated = deepspeed_config(cfg, world_size, on_gpu, hf_config)
    user = cfg.parallel.deepspeed_config
    return deep_merge(generated, load_user_config(user)) if user else generated


def host_adam(like: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam (``offload_optimizer`` steps on the host, vectorised) over the param groups and
    hyperparameters of the optimizer the trainer built (e.g. no decay on norms), so offloading changes
    where the step runs, not what it computes."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    d = like.defaults
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in like.param_groups]
    return DeepSpeedCPUAdam(groups, lr=d["lr"], betas=tuple(d["betas"]), eps=d["eps"], weight_decay=d["weight_decay"], adamw_mode=True)


def load_user_config(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"parallel.deepspeed_config={path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config={path!r} is not valid JSON: {e}") from None


class ZeroStrategy(DistributedStrategy):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.parallel.strategy
        self.stage = int(self.name[-1])
        self.lockstep_forward = self.stage == 3
        self._stepped = False

    def ds_config(self, hf_config=None) -> dict[str, Any]:
        return resolved_deepspeed_config(self.cfg, self.world_size, self.device.type == "cuda", hf_config)

    def wrap(self, model: torch.nn.Module, make_optimizer: OptimizerFactory) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        import deepspeed

        model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        config = self.ds_config(getattr(self.unwrap(model), "config", None))
        optimizer = make_optimizer(params)
        if "offload_optimizer" in config["zero_optimization"]:
            optimizer = host_adam(optimizer)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params, config=config,
                                               dist_init_required=False)
        # DeepSpeed's ZeRO optimizer steps `optimizer` on its fp32 partitions, so the torch
        # optimizer's param_groups still drive the learning rate: LR schedulers work unchanged.
        return engine, optimizer

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    def no_sync(self, model, is_last_micro_batch: bool) -> contextlib.AbstractContextManager:
        model.set_gradient_accumulation_boundary(is_last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, model) -> None:
        self.guard.observe_loss(loss)
        # our loss is already divided by the global normalizer: undo DeepSpeed's own /grad_accum
        # and its average over ranks (loss_scale = world size), leaving the exact sum
        model.backward(loss * self.loss_scale, scale_wrt_gas=False)

    def clip_grad_norm(self, model, max_norm: float) -> float:
        return self._step(model)  # max_norm is already in the DeepSpeed config (gradient_clipping)

    def optimizer_step(self, model, optimizer: torch.optim.Optimizer) -> None:
        if not self._stepped:
            self._step(model)
        self._stepped = False

    def _step(self, model) -> float:
        # only the loss can be checked before the step: DeepSpeed computes the norm inside it
        self.guard.check(self.rank)
        model.step()  # clips, steps and zeroes the gradients
        norm = model.get_global_grad_norm()
        self._stepped = True
        return float(norm) if norm is not None else 0.0

    # --- checkpoints ---------------------------------------------------------------------------
    def save_state(self, directory: Path, model, optimizer: torch.optim.Optimizer) -> None:
        model.save_checkpoint(str(directory), tag=TAG, exclude_frozen_parameters=is_peft(model.module))

    def load_state(self, directory: Path, model, optimizer: torch.optim.Optimizer) -> None:
        path, _ = model.load_checkpoint(str(directory), tag=TAG, load_module_strict=not is_peft(model.module),
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{TAG}' in {directory}")

    def consolidated_state_dict(self, model) -> dict[str, torch.Tensor]:
        """Full tensors of what an export needs (adapters for PEFT, all weights otherwise) on rank 0.

        Under ZeRO-3 each rank holds a slice of every parameter; reading ``p.data`` there gives an
        empty tensor (the ``Size([0])`` adapters of DeepSpeed#4295). ``GatheredParameters`` brings
        the full tensor back one parameter at a time, so peak memory stays one tensor.
        """
        module = model.module
        peft = is_peft(module)
        state: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            if peft and not p.requires_grad:
                continue
            if self.stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.is_main:
                        state[name] = p.detach().to("cpu", copy=True)
            elif self.is_main:
                state[name] = p.detach().to("cpu", copy=True)
        if not peft and self.is_main:  # buffers (none in HF LMs today) are never partitioned
            state.update({n: b.detach().cpu() for n, b in module.named_buffers() if n in module.state_dict()})
        return state

    def save_pretrained(self, model, directory: Path) -> None:
        state = self.consolidated_state_dict(model)
        if self.is_main:
            empty = [n for n, t in state.items() if t.numel() == 0]
            if empty:
                raise RuntimeError(f"export would write empty tensors (ZeRO-3 partitions not gathered): {empty[:3]}")
            model.module.save_pretrained(directory, state_dict=state, safe_serialization=True)
        self.barrier()

    def load_model_weights(self, model, directory: Path) -> None:
        from parallel.base import load_trainable_weights

        if self.stage == 3:
            import deepspeed

            params = [p for p in model.module.parameters() if p.requires_grad]
            # rank 0 loads into the gathered tensors; leaving the context re-partitions them to all ranks
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if self.is_main:
                    load_trainable_weights(model.module, directory)
        else:
            load_trainable_weights(model.module, directory)
        # the optimizer steps its own fp32 master partitions: copy the loaded weights into them
        model.optimizer.refresh_fp32_params()
