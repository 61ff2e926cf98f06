"""FP8 training as a pass: swap eligible ``nn.Linear`` layers for torchao ``Float8Linear``.

Recipes (``parallel.fp8_recipe``): ``tensorwise`` (one scale per tensor; with FSDP2 the weights
are all-gathered in FP8, halving that traffic) and ``rowwise`` (one scale per row: more accurate,
slightly slower). Master weights, optimizer states and the gradient reduction stay in higher
precision; only the GEMMs run in FP8.

Skipped automatically: the LM head (its logits feed a softmax over the whole vocabulary and are
precision-sensitive), layers whose dimensions are not multiples of 16 (``torch._scaled_mm``
requires it) and small layers, where the cost of computing scales outweighs the faster GEMM.
With LoRA the frozen base linears run in FP8 and the rank-r adapters stay in bf16.

torchao is imported only here, lazily: CPU installs do not have it and config validation already
refuses ``precision=fp8`` without a compute-capability 8.9+ GPU.
"""
from __future__ import annotations

import torch

MIN_FP8_DIM = 1024  # below this on either side, FP8 GEMMs are not faster than bf16 on H100 (torchao's measurements)
FP8_ALIGNMENT = 16


def fp8_eligible(fqn: str, module: torch.nn.Module) -> bool:
    """Whether the linear at ``fqn`` should run in FP8."""
    if not isinstance(module, torch.nn.Linear):
        return False
    name = fqn.rsplit(".", 1)[-1]
    if name == "lm_head" or "lora_" in fqn:
        return False
    k, n = module.in_features, module.out_features
    if k % FP8_ALIGNMENT or n % FP8_ALIGNMENT:
        return False
    return min(k, n) >= MIN_FP8_DIM


def apply_fp8(model: torch.nn.Module, cfg) -> list[str]:
    """Convert ``model``'s eligible linears to float8 training in place; returns their names."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise RuntimeError("precision=fp8 needs torchao: pip install torchao (GPU machines only)") from None
    recipe = cfg.parallel.fp8_recipe
    config = Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and cfg.parallel.strategy == "fsdp2":
        # all-gather the weight already cast to fp8 (one scale per tensor makes that exact)
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    converted: list[str] = []

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        ok = fp8_eligible(fqn, module)
        if ok:
            converted.append(fqn)
        return ok

    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    if not converted:
        raise RuntimeError("precision=fp8 found no linear layer large enough for FP8 (all dims < "
                           f"{MIN_FP8_DIM} or not multiples of {FP8_ALIGNMENT}); use precision=bf16 for this model")
    return converted


def maybe_apply_fp8(model: torch.nn.Module, cfg) -> list[str]:
    """``apply_fp8`` once, when ``precision=fp8`` (strategies call this before sharding)."""
    if cfg.precision != "fp8" or getattr(model, "_crucible_fp8", False):
        return []
    converted = apply_fp8(model, cfg)
    model._crucible_fp8 = True
    return converted
