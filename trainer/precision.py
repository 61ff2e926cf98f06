"""Mixed precision schemes (``precision`` × ``train.mixed_precision``).

Both schemes keep fp32 master weights and fp32 optimizer states; they differ in where the bf16
copies of the weights come from.

``autocast`` (default)
    Parameters stay fp32 and the forward runs under bf16 autocast, which casts every weight to bf16
    at every use: once in the forward and again in the activation-checkpointing recompute, plus the
    cast of its gradient back to fp32 in the backward. Activations that are fp32 (the residual
    stream, RMSNorm outputs) are re-cast at every matmul that reads them.

``bf16_weights`` ("cast once")
    The model's parameters *are* the bf16 working copy and the run has no autocast: every matmul,
    norm and residual add reads bf16 tensors that are already bf16, so no cast runs in the forward,
    the recompute or the backward. The fp32 masters live in the optimizer
    (``trainer.optim.MasterWeightAdamW``): each step casts the bf16 gradients up once, updates the
    masters in fp32 (small updates are not rounded away) and writes the rounded weights back once.
    The numerics are those of pure-bf16 frameworks (torchtitan, Megatron without fp32 residuals):
    the residual stream is bf16, while RMSNorm, softmax and the loss still reduce in fp32. Gradients
    of one optimizer step accumulate in bf16 over micro-batches.

LoRA under autocast: PEFT casts each layer's input to the adapter dtype before the adapter
matmuls. With fp32 adapters that is a bf16 -> fp32 copy of a full activation per adapted layer,
which autocast then casts straight back to bf16 for the matmul (the profile's largest ``copy_``).
``keep_lora_inputs_in_compute_dtype`` turns that cast off: autocast already runs the adapter
matmuls in bf16, and only the rank-r adapter weights (tiny) get cast.
"""
from __future__ import annotations

import contextlib

import torch

MIXED_PRECISION_MODES = ("autocast", "bf16_weights")


def runs_in_bf16(precision: str) -> bool:
    """Whether the forward/backward compute in bf16 at all (fp8 runs its non-fp8 ops in bf16)."""
    return precision in ("bf16", "fp8")


def uses_autocast(precision: str, mixed_precision: str) -> bool:
    return runs_in_bf16(precision) and mixed_precision == "autocast"


def autocast_context(device: torch.device, precision: str, mixed_precision: str = "autocast") -> contextlib.AbstractContextManager:
    """bf16 autocast for the ``autocast`` scheme (fp8 GEMMs come from the float8 linears); else nothing."""
    if uses_autocast(precision, mixed_precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def keep_lora_inputs_in_compute_dtype(model: torch.nn.Module) -> int:
    """Stop PEFT from upcasting each LoRA layer's input to the fp32 adapter dtype; returns how many layers.

    Only valid under autocast, which then runs the adapter matmuls in bf16 on the bf16 input.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
            count += 1
    return count


def is_quantized(param: torch.Tensor) -> bool:
    """bitsandbytes NF4/FP4 weights: packed bytes whose dtype is storage, never to be cast."""
    return getattr(param, "quant_state", None) is not None or type(param).__name__ == "Params4bit"


def to_bf16_working_weights(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Cast every floating parameter of ``model`` to bf16 in place; returns fp32 masters of the trainable ones.

    The masters are taken *before* rounding (keyed by ``id(param)``), so an fp32 checkpoint or a
    random init loses nothing. Buffers are left alone: rotary ``inv_freq`` must stay fp32 for exact
    positions. Tied weights (embeddings = LM head) are one parameter and stay tied.
    """
    masters: dict[int, torch.Tensor] = {}
    for param in model.parameters():
        if not param.is_floating_point() or is_quantized(param):
            continue
        if param.requires_grad:
            masters[id(param)] = param.detach().float().clone()
        param.data = param.data.to(torch.bfloat16)
    return masters
