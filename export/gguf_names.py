"""What HF and GGUF call the same things: architectures, tensor names, the llama Q/K permutation.

Shared by the writer (``gguf_export``) and the reader (``gguf_io``) so the two stay inverses.
"""
from __future__ import annotations

import re

import numpy as np

from trainer.config import ConfigError

# HF model_type -> (GGUF architecture, whether q/k rows are permuted for llama.cpp's interleaved RoPE).
# HF llama/mistral rotate the two halves of each head (NEOX order); llama.cpp's "llama" arch rotates
# adjacent pairs, so convert_hf_to_gguf reorders q/k rows. qwen2/qwen3 use NEOX rope in llama.cpp too.
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
GGUF_TO_HF_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_arch(hf_config: dict) -> tuple[str, bool]:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHS:
        raise ConfigError(f"format=gguf does not support model_type={model_type!r}; supported: {', '.join(ARCHS)}")
    return ARCHS[model_type]


def to_gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = _HF_LAYER.match(hf_name)
    if not m or m.group(2) not in _LAYER:
        raise ConfigError(f"tensor {hf_name!r} has no GGUF name (unsupported module for this architecture)")
    return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"


def to_hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_INV:
        return _GLOBAL_INV[gguf_name]
    m = _GGUF_LAYER.match(gguf_name)
    if not m or m.group(2) not in _LAYER_INV:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart")
    return f"model.layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}.{m.group(3)}"


def layer_index(gguf_name: str) -> int | None:
    m = _GGUF_LAYER.match(gguf_name)
    return int(m.group(1)) if m else None


def permute_heads(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate-half) q/k rows -> llama.cpp (interleaved pairs); works on weights, biases and LoRA B."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_heads(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_for(gguf_name: str, hf_config: dict) -> int | None:
    """How many heads to permute a tensor by (None when it is not permuted)."""
    if not gguf_arch(hf_config)[1]:
        return None
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    n_head = hf_config["num_attention_heads"]
    if kind == "attn_q":
        return n_head
    if kind == "attn_k":
        return hf_config.get("num_key_value_heads") or n_head
    return None
