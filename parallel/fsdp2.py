"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer states sharded.

One FSDP unit per decoder layer plus the root (embeddings, final norm, head), as torchtitan does.
Full fine-tuning, LoRA (the frozen base is sharded too, adapters train) and QLoRA (the NF4 storage
is sharded like any tensor, which is why ``quant.quant_storage`` must equal the parameter dtype:
FSDP2 all-gathers a unit's parameters as one buffer of one dtype).

Checkpoints use ``torch.distributed.checkpoint``: each rank writes its shards, so a resume may use
a different world size, and ``parallel.async_checkpoint`` overlaps the write with training.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from parallel.activation import decoder_layers
from parallel.base import OptimizerFactory, is_peft, read_safetensors_dir, to_peft_fqns
from parallel.distributed import DistributedStrategy

SHARDED_DIR = "sharded"


class FSDP2Strategy(DistributedStrategy):
    name = "fsdp2"
    lockstep_forward = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self._pending_save = None  # the future of an async checkpoint still being written

    def mixed_precision(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.device.type == "cuda" and self.cfg.precision in ("bf16", "fp8"):
            # bf16 all-gathers and compute; gradients reduced in fp32 so summing ranks loses nothing
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def wrap(self, model: torch.nn.Module, make_optimizer: OptimizerFactory) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        from parallel.fp8 import maybe_apply_fp8

        maybe_apply_fp8(model, self.cfg)  # before sharding: float8 linears shard their own weights
        offload = self.cfg.parallel.offload == "params"
        if not offload:
            model.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        common = dict(mesh=mesh, mp_policy=self.mixed_precision(),
                      offload_policy=CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offload else OffloadPolicy())
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=self.cfg.parallel.reshard_after_forward, **common)
        # the root's parameters are used first in forward and last in backward: never reshard them
        fully_shard(model, reshard_after_forward=False, **common)
        return model, make_optimizer([p for p in model.parameters() if p.requires_grad])

    # Gradient sync stays on for every micro-batch: skipping the reduce-scatter would keep
    # unsharded gradients alive across the window, which is the memory FSDP exists to save.

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if isinstance(norm, DTensor):  # per-shard partial norms -> one global norm
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        value = float(norm)
        self.guard.observe_grad_norm(value)
        return value

    # --- checkpoints ---------------------------------------------------------------------------
    def _options(self, model: torch.nn.Module) -> StateDictOptions:
        # a LoRA base is reloaded from model.path on resume; only trained weights are checkpointed
        # (and loading must then not demand the frozen ones)
        peft = is_peft(model)
        return StateDictOptions(ignore_frozen_params=peft, strict=not peft)

    def wait_for_checkpoint(self) -> None:
        if self._pending_save is not None:
            self._pending_save.result()
            self._pending_save = None

    def save_state(self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.wait_for_checkpoint()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self._options(model))
        state, target = {"model": model_sd, "optimizer": optim_sd}, str(Path(directory) / SHARDED_DIR)
        if self.cfg.parallel.async_checkpoint:
            self._pending_save = dcp.async_save(state, checkpoint_id=target)
        else:
            dcp.save(state, checkpoint_id=target)

    def load_state(self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        options = self._options(model)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))  # reshards to this world size
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)

    def save_pretrained(self, model: torch.nn.Module, directory: Path) -> None:
        """Gather full tensors to rank 0 (on CPU) and write a plain HF / PEFT directory."""
        self.wait_for_checkpoint()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=is_peft(model))
        state = get_model_state_dict(model, options=options)  # a collective: every rank calls it
        if self.is_main:
            model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        self.barrier()

    def load_model_weights(self, model: torch.nn.Module, directory: Path) -> None:
        state = read_safetensors_dir(directory)
        if is_peft(model):
            state = to_peft_fqns(state, model)
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def teardown(self) -> None:
        self.wait_for_checkpoint()
        super().teardown()
