"""Llama-family decoder (Llama, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm), our own code.

Module names mirror HF's (``model.layers.N.self_attn...``) except the fused ``qkv_proj`` and
``gate_up_proj``, so the loader's name map is small. ``forward`` takes the flattened new tokens of
every scheduled sequence; the paged attention context says which sequence each belongs to.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.attention import PagedAttention
from engine.layers import Linear, RMSNorm, RotaryEmbedding, SiluAndMul, act_linear, linear_residual, norm_linear

if TYPE_CHECKING:  # the runtime import is local to projections(): it imports Triton, the CUDA path only
    from engine.kernels.gemv_tuning import Projection

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")

# The residual stream between blocks: ``(x, residual, stats)``. Either the block's output and the
# residual still to add (the next norm adds it: ``add_rms_norm``), or — when the block's last GEMV
# added it in its epilogue — ``(h, None, stats)`` with that GEMV's per-tile sums of h^2 for the norm.
Stream = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    eos_token_ids: list[int]

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        c = json.loads((path / "config.json").read_text())
        kind = c.get("model_type")
        if kind not in SUPPORTED:
            raise ValueError(f"{path}: model_type {kind!r} is not supported by the engine (supported: {', '.join(SUPPORTED)})")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {c.get('hidden_act')!r} is not supported (silu only)")
        # transformers 5 writes rope_parameters; older checkpoints have rope_theta + rope_scaling
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{path}: partial rotary embeddings are not supported")
        heads = c["num_attention_heads"]
        bias = bool(c.get("attention_bias", False))
        uses_window = c.get("sliding_window") and c.get("use_sliding_window", kind == "mistral")
        eos = c.get("eos_token_id")
        gen = path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        return cls(
            model_type=kind,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bias,
            o_bias=bias and kind != "qwen2",
            mlp_bias=bool(c.get("mlp_bias", False)),
            qk_norm=kind == "qwen3",
            sliding_window=c["sliding_window"] if uses_window else None,
            eos_token_ids=[e for e in (eos if isinstance(eos, list) else [eos]) if e is not None],
        )


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, first: bool = False):
        super().__init__()
        # The first layer's qkv GEMV lets the next kernel launch only after its own gdc_wait: once it
        # runs, every kernel before it — the previous step's, the input advance — has completed, so
        # every decode attention of the step may read the step's lengths, tables and cached K/V before
        # waiting for its qkv rows (EARLY_KV, engine/kernels/__init__.py). Once per step is enough;
        # per layer, the late trigger would delay each attention's launch behind a multi-wave GEMV.
        self.late_trigger = first
        q_size, kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.qkv_proj = Linear(a.hidden_size, q_size + 2 * kv_size, a.qkv_bias, [q_size, kv_size, kv_size])
        self.o_proj = Linear(q_size, a.hidden_size, a.o_bias)
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps) if a.qk_norm else None
        self.attn = PagedAttention(a.num_heads, a.num_kv_heads, a.head_dim, a.head_dim ** -0.5)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, stats: torch.Tensor | None, norm: RMSNorm,
                positions: torch.Tensor, rope: RotaryEmbedding) -> Stream:
        """The residual stream after attention (see ``Stream``); ``norm`` is the layer's input norm,
        applied to ``h + residual`` (fused into the qkv projection where it can be)."""
        qkv, residual = norm_linear(norm, self.qkv_proj, h, residual, stats, late_trigger=self.late_trigger)
        out = self.attn(qkv, positions, rope, self.q_norm, self.k_norm)  # q/k norm, RoPE, KV store, attention
        return linear_residual(self.o_proj, out.flatten(1), residual)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_up_proj = Linear(a.hidden_size, 2 * a.intermediate_size, a.mlp_bias, [a.intermediate_size] * 2)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, a.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, stats: torch.Tensor | None, norm: RMSNorm) -> Stream:
        """The residual stream after the MLP of ``norm(h + residual)``, the post-attention norm."""
        gate_up, residual = norm_linear(norm, self.gate_up_proj, h, residual, stats)
        return linear_residual(self.down_proj, gate_up, residual, self.act)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, first: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, first)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, stats: torch.Tensor | None, positions: torch.Tensor,
                rope: RotaryEmbedding) -> Stream:
        """Each residual add happens inside the following norm (``add_rms_norm``); at decode batch sizes
        on CUDA it runs in the epilogue of the GEMV before that norm and the norm inside the next
        projection's GEMV (see ``Stream``). The values are HF's either way."""
        h, residual, stats = self.self_attn(h, residual, stats, self.input_layernorm, positions, rope)
        return self.mlp(h, residual, stats, self.post_attention_layernorm)


class Decoder(nn.Module):
    def __init__(self, a: ModelArgs, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(a, first=i == 0) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(a.head_dim, max_positions, a.rope_theta, a.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h, residual, stats = self.embed_tokens(input_ids), None, None
        for layer in self.layers:
            h, residual, stats = layer(h, residual, stats, positions, self.rotary_emb)
        return self.norm(h) if residual is None else self.norm(h, residual)[0]


class CausalLM(nn.Module):
    def __init__(self, a: ModelArgs, max_positions: int | None = None):
        super().__init__()
        self.args = a
        self.model = Decoder(a, max_positions or a.max_position_embeddings)
        self.lm_head = Linear(a.hidden_size, a.vocab_size)
        if a.tie_word_embeddings:  # one storage: an update through either name changes both
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] of the new tokens (logits are taken only where needed)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def projections(self) -> list["Projection"]:
        """Every projection with the op before it, which a GEMV prologue may fold in (the runner
        tunes the GEMV per projection group)."""
        from engine.kernels.gemv_tuning import Projection  # imports Triton: only on the CUDA path

        def after_norm(norm: RMSNorm, linear: Linear) -> Projection:
            return Projection(linear, "add_rms_norm", lambda x, r: norm_linear(norm, linear, x, r), norm.weight, norm.eps)

        def plain(linear: Linear) -> Projection:
            return Projection(linear, "none", lambda x, r: linear(x))

        out = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            out += [after_norm(layer.input_layernorm, attn.qkv_proj), plain(attn.o_proj),
                    after_norm(layer.post_attention_layernorm, mlp.gate_up_proj),
                    Projection(mlp.down_proj, "silu_mul", lambda x, r, mlp=mlp: act_linear(mlp.act, mlp.down_proj, x))]
        return [p for p in out + [plain(self.lm_head)] if type(p.linear) is Linear]  # a swapped-in (AWQ) module keeps its own path

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]
