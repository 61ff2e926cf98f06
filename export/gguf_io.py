"""Read GGUF files back into HF terms: config dict + fp32 state dict (+ tokenizer), adapters too.

This is the loader the engine uses for GGUF models (dequantize-on-load), and the verifier's way
back from an exported file. It undoes everything the writer did: dequantization (gguf-py, which
covers the K-quants), the llama Q/K row permutation, and GGUF's tensor names.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from export.gguf_names import GGUF_TO_HF_TYPE, heads_for, to_hf_name, unpermute_heads


# ---------------------------------------------------------------------------------------------
# A minimal GGUF v2/v3 parser. gguf-py's GGUFReader builds a numpy view per array element, which
# takes tens of seconds on a 49k-token vocabulary; this reads the same file in well under a second.
# ---------------------------------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first)
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray  # raw bytes of the tensor, memory-mapped


@dataclass
class GGUFFile:
    fields: dict[str, Any]
    tensors: list[TensorInfo]

    def get(self, key: str, default=None):
        return self.fields.get(key, default)


def parse_gguf(path: str | Path) -> GGUFFile:
    buf = np.memmap(str(path), dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    pos = 0

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, mv, pos)
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        s = bytes(mv[pos:pos + n]).decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, n = take("<I"), take("<Q")
            if etype in _NP:  # numeric arrays in one read
                arr = np.frombuffer(mv, dtype=_NP[etype], count=n, offset=pos)
                pos += arr.nbytes
                return arr.tolist()
            return [value(etype) for _ in range(n)]
        return take(_SCALARS[vtype])

    if bytes(mv[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    n_tensors, n_kv = take("<Q"), take("<Q")
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(take("<I")), take("<Q")))
    align = int(fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    start = (pos + align - 1) // align * align
    tensors = []
    for name, shape, qtype, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        tensors.append(TensorInfo(name, shape, qtype, buf[start + offset:start + offset + nbytes]))
    return GGUFFile(fields, tensors)


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Raw GGUF tensor data -> float32, flat. gguf-py's block decoders, called on the whole tensor
    at once (its ``quants.dequantize`` walks 16 rows at a time, ~10x slower on embeddings)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data).view(np.float32).reshape(-1)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data).view(np.float16).astype(np.float32).reshape(-1)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, block_bytes)
    return getattr(gguf.quants, qtype.name).dequantize_blocks(blocks).astype(np.float32, copy=False).reshape(-1)


def _dequantize(t: TensorInfo) -> np.ndarray:
    return dequantize(t.data, t.qtype).reshape(t.shape)


def gguf_config(reader: GGUFFile) -> dict:
    """The HF ``config.json`` dict equivalent of a GGUF model's metadata."""
    arch = reader.get("general.architecture")
    if arch not in GGUF_TO_HF_TYPE:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_TO_HF_TYPE)}")

    def key(name, default=None):
        return reader.get(f"{arch}.{name}", default)

    hidden, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // n_head)))
    names = {t.name for t in reader.tensors}
    tokens = reader.get("tokenizer.ggml.tokens") or []
    model_type = GGUF_TO_HF_TYPE[arch]
    cfg = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(key("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "vocab_size": int(key("vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": reader.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": reader.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": reader.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if model_type == "qwen2":
        cfg["attention_bias"] = True
    return cfg


def read_gguf_model(path: str | Path, with_tokenizer: bool = False) -> tuple[dict, dict[str, torch.Tensor], object | None]:
    """``(hf_config_dict, {hf_name: fp32 tensor}, tokenizer or None)`` from a GGUF model file.

    Tied models get no ``lm_head.weight`` (HF ties it to the embedding). The tokenizer, when asked
    for, is rebuilt by transformers' GGUF tokenizer converter from the file's own metadata.
    """
    reader = parse_gguf(path)
    if reader.get("general.type", "model") != "model":
        raise ValueError(f"{path} is a GGUF {reader.get('general.type')!r} file, not a model")
    cfg = gguf_config(reader)
    state = {}
    for t in reader.tensors:
        arr = _dequantize(t)
        if (n := heads_for(t.name, cfg)) is not None:
            arr = unpermute_heads(arr, n)
        state[to_hf_name(t.name)] = torch.from_numpy(np.array(arr, dtype=np.float32))  # own, writable copy
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        p = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return cfg, state, tokenizer


def read_gguf_adapter(path: str | Path, base_cfg: dict) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(alpha, {hf_module_name: (A [r, in], B [out, r])})`` from a LoRA adapter GGUF, B un-permuted."""
    reader = parse_gguf(path)
    if reader.get("general.type") != "adapter" or reader.get("adapter.type") != "lora":
        raise ValueError(f"{path} is not a LoRA adapter GGUF")
    alpha = float(reader.get("adapter.lora.alpha"))
    factors: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, suffix = t.name.rsplit(".", 1)
        factors.setdefault(base, {})[suffix] = _dequantize(t)
    out = {}
    for base, ab in factors.items():
        b = ab["lora_b"]
        if (n := heads_for(base, base_cfg)) is not None:
            b = unpermute_heads(b, n)
        out[to_hf_name(base).removesuffix(".weight")] = (torch.from_numpy(np.array(ab["lora_a"])), torch.from_numpy(np.array(b)))
    return alpha, out
