"""The model's building blocks, written to match HF numerics exactly in fp32 (RoPE, RMSNorm in fp32)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.context import get_context


class Linear(nn.Module):
    """Every projection of the model. A fused projection (qkv, gate/up) lists its parts in
    ``output_sizes`` so loaders can write each HF weight into its slice. ``adapter`` is the hook for
    batched multi-LoRA serving: a callable ``(x, y, adapter_ids) -> y + delta`` reading the per-token
    adapter index from the step context. ``gemv`` (set by the model runner on CUDA, ``engine.gemv``)
    holds the Triton GEMV config per decode batch size; None, or a batch it does not cover, is cuBLAS."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, output_sizes: list[int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = output_sizes or [out_features]
        assert sum(self.output_sizes) == out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.adapter = None
        self.gemv = None  # engine.kernels.gemv_tuning.GemvPlan

    def shard(self, tensor: torch.Tensor, part: int) -> torch.Tensor:
        """The rows of ``tensor`` (this layer's weight or bias) that hold fused part ``part``."""
        start = sum(self.output_sizes[:part])
        return tensor.narrow(0, start, self.output_sizes[part])

    def gemv_config(self, x: torch.Tensor):
        """The GEMV config for input ``x`` ([rows, K] with contiguous rows), or None for cuBLAS."""
        if self.gemv is None or x.dim() != 2 or x.stride(-1) != 1:
            return None
        return self.gemv.config_for(x.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.gemv_config(x)
        if config is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            from engine.kernels.gemv import gemv

            y = gemv(x, self.weight, self.bias, config, self.gemv.workspace)
        if self.adapter is not None:
            y = self.adapter(x, y, get_context().adapter_ids)
        return y


def _prologue_config(linear: nn.Module, x: torch.Tensor):
    """A GEMV config when the op before ``linear`` may run in the kernel's prologue: not for an
    adapter (its delta needs the op's output) nor a module a loader swapped in (AWQ)."""
    if not isinstance(linear, Linear) or linear.adapter is not None:
        return None
    return linear.gemv_config(x)


def norm_linear(norm: "RMSNorm", linear: Linear, x: torch.Tensor, residual: torch.Tensor | None,
                stats: torch.Tensor | None = None, late_trigger: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(norm(x + residual)), x + residual)`` (no residual: ``(linear(norm(x)), x)``). At
    decode batch sizes on CUDA one GEMV kernel does it all: the add and the norm run in its prologue.
    ``stats`` (from ``linear_residual``): x already holds the residual, and the GEMV that added it
    left its sums of squares, so the norm needs no statistics kernel of its own. ``late_trigger``: see
    ``engine.kernels.gemv.gemv`` (the other paths launch nothing early: cuBLAS and the compiled norm use no PDL)."""
    config = _prologue_config(linear, x)
    if config is not None:
        from engine.kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias, config, linear.gemv.workspace, "add_rms_norm", residual,
                    norm.weight, norm.eps, stats=stats, late_trigger=late_trigger)
    h, residual = (norm(x), x) if residual is None else norm(x, residual)
    return linear(h), residual


def linear_residual(linear: Linear, x: torch.Tensor, residual: torch.Tensor | None,
                    act: "SiluAndMul | None" = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The projection that ends a block (o_proj; down_proj of ``act(x)``) and the residual stream after it:
    ``(y, residual, None)``, the add left to the next norm — or, at decode batch sizes on CUDA,
    ``(y + residual, None, stats)``: the GEMV adds the residual in its epilogue and leaves the sums of
    squares the next norm needs (``norm_linear(..., stats=)``), one kernel per norm fewer."""
    config = _prologue_config(linear, x) if residual is not None and residual.is_contiguous() else None
    if config is None:
        return (linear(x) if act is None else act_linear(act, linear, x)), residual, None
    from engine.kernels.gemv import gemv

    h, stats = gemv(x, linear.weight, linear.bias, config, linear.gemv.workspace, "none" if act is None else "silu_mul",
                    add_residual=residual)
    return h, None, stats


def act_linear(act: "SiluAndMul", linear: Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(silu(gate) * up)`` of a gate/up output ``x``; on CUDA at decode batch sizes the
    activation runs in the GEMV's prologue."""
    config = _prologue_config(linear, x)
    if config is not None:
        from engine.kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias, config, linear.gemv.workspace, "silu_mul")
    return linear(act(x))


# The elementwise chains are pure functions so the GPU path can swap in torch.compile'd versions
# (one fused kernel each instead of 5-10 launches); the CPU reference runs them eagerly.
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # HF order of operations: normalize in fp32, cast back, then scale.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; return rms_norm(h), h``: the residual add fused into the next norm."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def apply_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
               q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
               eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q, k [T, heads, D]; with ``q_weight``/``k_weight``, Qwen3's per-head RMSNorm first.
    The torch backend's path (torch.compile'd on CUDA) and the reference of the Triton backend's
    fused norm + RoPE + KV-store kernel (engine/kernels/rope_kv.py), which rounds alike."""
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    cos = cos_table[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D], cast like HF before multiplying
    sin = sin_table[positions].unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def compile_fused_ops(model: nn.Module) -> None:
    """Give every norm, rotary and activation module torch.compile'd (fused) versions of its functions."""
    # emulate_precision_casts: round bf16 intermediates (the residual sum, the cast before scaling) as
    # eager does, so graph-replayed and eager steps agree bit for bit and both match HF's rounding
    compiled = {fn: torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
                for fn in (rms_norm, add_rms_norm, apply_rope, silu_and_mul)}
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fn, module.add_fn = compiled[rms_norm], compiled[add_rms_norm]
        elif isinstance(module, (RotaryEmbedding, SiluAndMul)):
            module.fn = compiled[module.fn]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.fn, self.add_fn = rms_norm, add_rms_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)``."""
        if residual is None:
            return self.fn(x, self.weight, self.eps)
        return self.add_fn(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.fn = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, computed exactly as transformers does (default and llama3 scaling)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        freqs = torch.arange(max_positions).float()[:, None] * rope_inv_freq(head_dim, theta, scaling)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # fp32 table, like HF's per-call computation
        # [max_positions, head_dim] fp32, read directly by the Triton backend's fused RoPE kernel
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.fn = apply_rope

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: "RMSNorm | None" = None,
                k_norm: "RMSNorm | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        if q_norm is None:
            return self.fn(positions, q, k, self.cos, self.sin)
        return self.fn(positions, q, k, self.cos, self.sin, q_norm.weight, k_norm.weight, q_norm.eps)
