"""Activation checkpointing as a pass over the decoder layers (``train.activation_checkpointing``).

Modes:
    none       keep every activation (fastest, most memory)
    full       every decoder layer keeps only its input; the rest is recomputed in backward
    selective  every ``train.ac_every_k``-th layer is checkpointed, the others keep activations
    offload    activations are kept but moved to host memory (``save_on_cpu``) during the forward

The pass replaces each layer's bound ``forward`` rather than wrapping the module, so parameter
names, ``state_dict`` keys and PEFT adapter names are untouched (exports and resumes need no key
remapping). It must run *before* ``fully_shard``: FSDP2 unshards a layer in its pre-backward hook,
so the recompute (which calls the plain forward, not ``__call__``) sees full parameters.
"""
from __future__ import annotations

import functools
import types
from collections import Counter

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective", "offload")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of any HF causal LM (plain, PEFT-wrapped or compiled).

    The blocks are the children of the largest ``ModuleList`` whose entries share one class; that
    holds for every HF decoder-only architecture and needs no per-model attribute paths.
    """
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            kinds = Counter(type(m) for m in module)
            if len(kinds) == 1:
                best = list(module)
    if not best:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of identical blocks")
    return best


def checkpointed_layer_indices(num_layers: int, mode: str, every_k: int) -> list[int]:
    """Which layers recompute their activations: all for ``full``, every k-th for ``selective``."""
    if mode == "full":
        return list(range(num_layers))
    if mode == "selective":
        return [i for i in range(num_layers) if i % every_k == every_k - 1]
    return []


def apply_activation_checkpointing(model: torch.nn.Module, cfg) -> list[int]:
    """Apply ``cfg.train.activation_checkpointing`` to ``model`` in place; returns the affected layer indices."""
    mode, every_k = cfg.train.activation_checkpointing, cfg.train.ac_every_k
    if mode not in AC_MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r}; choose one of {AC_MODES}")
    if mode == "none":
        return []
    layers = decoder_layers(model)
    if mode == "offload":
        # pinned host buffers make the device->host copies asynchronous; pinning needs a GPU
        pin = torch.cuda.is_available()
        for layer in layers:
            _replace_forward(layer, functools.partial(_offloaded_forward, pin_memory=pin))
        return list(range(len(layers)))
    chosen = checkpointed_layer_indices(len(layers), mode, every_k)
    wrapper = functools.partial(_checkpointed_forward, recompute_all=cfg.train.compile)
    for i in chosen:
        _replace_forward(layers[i], wrapper)
    return chosen


def apply_mlp_token_chunks(model: torch.nn.Module, chunks: int) -> int:
    """Run every decoder layer's MLP over its tokens in ``chunks`` slices (``train.mlp_token_chunks``).

    A SwiGLU MLP treats tokens independently, and its ``[tokens, intermediate]`` buffers (gate, up,
    their product, and their gradients in the backward) are the largest of a layer: slicing the tokens
    divides them by ``chunks`` at the same FLOPs. Under a compiled, checkpointed layer the backward
    then works slice by slice too. Returns the number of MLPs wrapped (0 for ``chunks == 1``).
    """
    if chunks <= 1:
        return 0
    layers = decoder_layers(model)
    missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
    if missing:
        raise ValueError(f"train.mlp_token_chunks={chunks} needs decoder layers with an `mlp` submodule; "
                         f"{type(layers[missing[0]]).__name__} has none (layers {missing[:4]}...): set train.mlp_token_chunks=1")
    for layer in layers:
        mlp = layer.mlp
        if getattr(mlp, "_crucible_token_chunks", 0):
            continue
        mlp._crucible_token_chunks = chunks
        # a bound method of one shared function (not a partial per layer): torch.compile guards on the
        # function's identity, so every layer keeps sharing one compiled graph
        mlp.forward = types.MethodType(_token_chunked_forward, mlp)
    return len(layers)


def _token_chunked_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    slices = torch.tensor_split(flat, min(mlp._crucible_token_chunks, max(flat.shape[0], 1)))
    out = torch.cat([type(mlp).forward(mlp, piece) for piece in slices])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _replace_forward(layer: torch.nn.Module, wrapper) -> None:
    if getattr(layer, "_crucible_ac", False):  # idempotent: a second pass must not nest checkpoints
        return
    original = layer.forward
    layer.forward = functools.partial(wrapper, original)
    layer._crucible_ac = True


def _must_recompute(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_RECOMPUTE


def _recompute_all_contexts():
    return create_selective_checkpoint_contexts(_must_recompute)


def _checkpointed_forward(original, *args, recompute_all: bool = False, **kwargs):
    # use_reentrant=False: works when no input requires grad (frozen LoRA base, first layer),
    # supports keyword arguments, and composes with FSDP2 and torch.compile.
    if not torch.is_grad_enabled():
        return original(*args, **kwargs)
    if recompute_all:
        # Under torch.compile a plain checkpoint only *prefers* recomputation: the partitioner may
        # still save what it deems expensive to recompute, and with bitsandbytes' NF4 matmuls (opaque
        # custom ops) a compiled Llama-1B QLoRA step peaked at 8.0 GiB against 2.5 GiB eager. An
        # explicit policy makes every op in the layer recompute, as the eager checkpoint does.
        return checkpoint(original, *args, use_reentrant=False, context_fn=_recompute_all_contexts, **kwargs)
    return checkpoint(original, *args, use_reentrant=False, **kwargs)


def _offloaded_forward(original, *args, pin_memory: bool, **kwargs):
    with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
        return original(*args, **kwargs)
