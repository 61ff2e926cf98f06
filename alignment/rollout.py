"""The colocated rollout engine: our paged-attention ``LLM`` in the trainer's process, kept in sync.

Each rank owns one engine on its own device and samples its own prompts. After every optimizer
step the policy's weights are copied into the engine in place (``LLM.update_weights``; no reload,
no disk). For LoRA only the adapted projections change, and they are sent *merged*:
``W + scaling * B @ A`` computed on the fly (the 4-bit base of QLoRA dequantized first), so the
engine never needs adapter support and the trainer's modules are never mutated.

Trust but verify: ``check_parity`` re-scores sampled completions with the trainer and compares with
the log-probs the engine reported while sampling. Stale or wrongly mapped weights (the silent
failure colocated RL is known for) stop the run instead of quietly training off-policy.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from alignment.sequences import Document, rows_from_documents, token_logprobs
from trainer.config import ConfigError


class EngineOutOfSync(RuntimeError):
    """The engine's log-probs disagree with the trainer's: its weights are not the policy's."""


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A plain full tensor: gathers FSDP2 DTensors, dequantizes bitsandbytes 4-bit weights."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    if getattr(t, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(t.data, t.quant_state)
    return t.detach()


def _hf_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def merged_lora_weight(module: torch.nn.Module) -> torch.Tensor:
    """W + sum over active adapters of scaling * B @ A, in the base weight's layout."""
    weight = _dense(module.get_base_layer().weight).float()
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a, b = _dense(module.lora_A[name].weight).float(), _dense(module.lora_B[name].weight).float()
        weight = weight + module.scaling[name] * (b @ a)
    return weight


@torch.no_grad()
def policy_weights(model: torch.nn.Module, changed_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for the engine. ``changed_only``: what an optimizer step can change (the
    LoRA-adapted projections, or every trainable parameter of a full fine-tune); else everything."""
    lora = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")}
    if any(getattr(m, "use_dora", {}).get(a) for m in lora.values() for a in m.active_adapters):
        raise ConfigError("lora.use_dora=true: DoRA weights cannot be merged for the rollout engine yet; use plain LoRA for GRPO")
    for name, module in lora.items():
        yield _hf_name(name) + ".weight", merged_lora_weight(module)
    covered = {f"{n}.base_layer.weight" for n in lora}
    for name, p in model.named_parameters():
        if "lora_" in name or name in covered or (changed_only and (lora or not p.requires_grad)):
            continue
        yield _hf_name(name), _dense(p)


class Rollout:
    """One engine per rank, loaded from the policy's checkpoint directory and synced from the policy.

    ``kv_fraction`` (GPU only) caps the engine's KV cache at that share of *total* GPU memory. The
    engine alone would take ``engine.gpu_memory_utilization`` of the memory minus what is in use at
    its start, i.e. memory the trainer's optimizer states and activations need a moment later.
    """

    def __init__(self, cfg, device: torch.device, kv_fraction: float | None = None):
        from engine import LLM
        from engine.llm_engine import resolve_dtype

        from trainer.models import resolve_model_path

        if cfg.model.init == "random":
            raise ConfigError("model.init=random: the rollout engine loads the policy's checkpoint directory; save the model and point model.path at it")
        model_dir = resolve_model_path(cfg.model.path)
        options = {f.name: getattr(cfg.engine, f.name) for f in dataclasses.fields(cfg.engine) if f.name not in ("dtype", "adapter")}
        options["seed"] = cfg.engine.seed + cfg.seed + int(getattr(device, "index", 0) or 0)
        if device.type == "cuda" and kv_fraction is not None:
            weight_bytes = checkpoint_numel(model_dir) * resolve_dtype(cfg.engine.dtype, device).itemsize
            options["gpu_memory_utilization"] = kv_capped_utilization(kv_fraction, weight_bytes, cfg.engine.gpu_memory_utilization, device)
        self.llm = LLM(model=model_dir, dtype=cfg.engine.dtype, device=str(device), **options)
        self.syncs = 0

    @property
    def kv_cache_gib(self) -> float:
        """Size of the engine's KV cache (what the colocated engine adds to the trainer's memory, beyond its weights)."""
        kv = self.llm.engine.runner.kv_cache
        return kv.numel() * kv.element_size() / 2**30

    def sync(self, model: torch.nn.Module, changed_only: bool = True) -> int:
        """Copy the policy's weights into the engine; returns how many tensors were written."""
        written = self.llm.update_weights(policy_weights(model, changed_only))
        self.syncs += 1
        return written

    def generate(self, prompt_ids: list[list[int]], params) -> list:
        outputs = self.llm.generate(prompt_ids, params)
        errors = [o.error for o in outputs if o.error]
        if errors:
            raise RuntimeError(f"rollout engine rejected {len(errors)} prompt(s): {errors[0]}")
        return outputs


def checkpoint_numel(model_dir: str) -> int:
    """Elements of every tensor in a checkpoint directory's safetensors files (read from their headers)."""
    import math
    from pathlib import Path

    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def kv_capped_utilization(kv_fraction: float, engine_weight_bytes: int, ceiling: float, device: torch.device) -> float:
    """The ``gpu_memory_utilization`` under which the engine's KV cache is at most ``kv_fraction`` of total memory.

    The engine gives its KV cache ``total * utilization`` minus what is in use when it measures: memory
    outside this process, this process's live tensors (the trainer's model), its own weights and its
    warm-up step. Counting all but the warm-up now and adding the cap makes the cache the cap minus
    the warm-up's small peak. ``ceiling`` (engine.gpu_memory_utilization) still bounds the total.
    """
    torch.cuda.empty_cache()  # the allocator's cached blocks are not "in use"
    free, total = torch.cuda.mem_get_info(device)
    return min(ceiling, (total - free + engine_weight_bytes + kv_fraction * total) / total)


@torch.no_grad()
def logprob_diff(model: torch.nn.Module, samples: list[tuple[list[int], list[int], list[float]]]) -> float:
    """Mean |engine - trainer| log-prob over the sampled tokens of (prompt_ids, completion_ids, engine_logprobs)."""
    docs = [Document(p, c) for p, c, _ in samples]
    batch = rows_from_documents(docs, seq_len=max(map(len, docs)), packing=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: the engine has none
    try:
        trainer_lp = token_logprobs(model, {k: v.to(device) for k, v in batch.items()})[0].cpu()
    finally:
        model.train(was_training)
    mask = batch["doc_index"] >= 0
    engine_lp = torch.tensor([lp for _, _, lps in samples for lp in lps], dtype=trainer_lp.dtype)
    return float((trainer_lp[mask] - engine_lp).abs().mean())


def check_parity(diff: float, threshold: float, syncs: int) -> None:
    if diff > threshold:
        raise EngineOutOfSync(
            f"rollout engine and trainer disagree after weight sync #{syncs}: mean |log-prob diff| = {diff:.4f} > "
            f"grpo.max_logprob_diff={threshold} on the sampled tokens; the engine is not sampling from the policy "
            f"(stale or wrongly mapped weights). Raise grpo.max_logprob_diff only for a known precision gap (e.g. bf16 engine)."
        )
