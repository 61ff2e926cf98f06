"""Write GGUF files that llama.cpp loads: model weights (F32 ... Q4_K_M) and LoRA adapters.

The container and the 32-block quantizers come from gguf-py; the K-quants are ours
(``export.kquants``), so Q4_K_M needs no llama.cpp build. Per-tensor types follow llama.cpp's
``llama-quant.cpp`` so a file we write is the file ``llama-quantize`` would have written.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q, LlamaFileType

from export import kquants
from export.gguf_names import gguf_arch, heads_for, layer_index, permute_heads, to_gguf_name
from trainer.config import ConfigError

# gguf.type -> (the type of 2-D weights before per-tensor rules, general.file_type)
FILE_TYPES = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}
# llama-quant.cpp tensor_type_fallback: a 256-block type whose row length is not a multiple of 256
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_QUANTIZED = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, n_layers: int, tied: bool) -> Q:
    """The GGML type of one tensor (GGUF name, torch-order shape) under file type ``ftype``."""
    base = FILE_TYPES[ftype][0]
    if len(shape) < 2 or name.endswith("_norm.weight") or name.endswith(".bias"):
        return Q.F32  # norms and biases are tiny and precision-critical; llama.cpp never quantizes them
    if base not in _QUANTIZED:
        return base
    new = base
    cols = shape[-1]
    kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # llama.cpp quantizes the output matrix harder-to-hurt: Q6_K unless the row length forbids it
        new = Q.Q8_0 if cols % gguf.QK_K else (new if new == Q.Q8_0 else Q.Q6_K)
    elif ftype == "q4_k_m" and kind in ("attn_v", "ffn_down") and use_more_bits(layer_index(name), n_layers):
        new = Q.Q6_K
    block = gguf.GGML_QUANT_SIZES[new][0]
    if cols % block:
        new = _FALLBACK.get(new, new)
        if cols % gguf.GGML_QUANT_SIZES[new][0]:
            new = Q.F16  # not even 32-divisible: llama.cpp keeps such a tensor in F16
    return new


def quantize(arr: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 [rows, cols] -> the bytes (or float array) GGUF stores for ``qtype``."""
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return kquants.QUANTIZERS[qtype.name](arr)
    if qtype in (Q.F32, Q.F16):
        return gguf.quants.quantize(arr, qtype)
    # gguf-py's block quantizer on the whole tensor at once (its quantize() loops over 16-row groups)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, block)
    return getattr(gguf.quants, qtype.name).quantize_blocks(blocks).reshape(*arr.shape[:-1], arr.shape[-1] // block * size)


@dataclass
class GGUFReport:
    path: str
    file_type: str
    n_params: int = 0
    n_bytes: int = 0
    types: dict[str, int] = field(default_factory=dict)  # GGML type name -> parameter count

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / max(self.n_params, 1)


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------
def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def add_model_metadata(w: gguf.GGUFWriter, cfg: dict, name: str) -> None:
    arch = gguf_arch(cfg)[0]
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"format=gguf: rope scaling {rope.get('rope_type')!r} is not supported by this exporter")
    w.add_name(name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(cfg["vocab_size"])
    assert arch  # the writer was created with it


def tokenizer_pre(tokens: list[str], cfg: dict, override: str) -> str:
    """llama.cpp's pre-tokenizer name. It hashes tokenizer outputs; we recognise the families we ship."""
    if override != "auto":
        return override
    if len(tokens) >= 49152 and tokens[:2] == ["<|endoftext|>", "<|im_start|>"]:
        return "smollm"  # SmolLM/SmolLM2 (and models fine-tuned from them) keep this vocabulary
    if cfg.get("model_type") in ("qwen2", "qwen3"):
        return "qwen2"
    if len(tokens) == 128256:
        return "llama-bpe"
    raise ConfigError("gguf.tokenizer_pre=auto cannot identify this tokenizer; set gguf.tokenizer_pre=<llama.cpp pre name> (e.g. gpt-2, llama-bpe)")


def add_tokenizer(w: gguf.GGUFWriter, tokenizer_dir: str | Path, cfg: dict, pre: str = "auto") -> None:
    """Vocabulary, token types, merges, special ids and chat template from a ``tokenizer.json`` dir."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"format=gguf needs a fast tokenizer: {path} is missing")
    spec = json.loads(path.read_text())
    if spec["model"]["type"] != "BPE":
        raise ConfigError(f"format=gguf supports byte-level BPE tokenizers; {path} is {spec['model']['type']}")
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    n_vocab = max(cfg["vocab_size"], max(by_id) + 1, max(added, default=-1) + 1)
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (vocab padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre(tokens, cfg, pre))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ConfigError(f"{path} has no BPE merges")
    special.add_to_gguf(w, quiet=True)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------
def _numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def write_gguf(out: str | Path, cfg: dict, tensors: Mapping[str, object], tokenizer_dir: str | Path, ftype: str,
               name: str = "model", tokenizer_pre_name: str = "auto",
               progress: Callable[[str], None] | None = None) -> GGUFReport:
    """Write an HF-named fp state dict as a GGUF model file at ``out`` (which is overwritten)."""
    if ftype not in FILE_TYPES:
        raise ConfigError(f"gguf.type={ftype!r} is not supported; choose one of: {', '.join(FILE_TYPES)}")
    arch, _ = gguf_arch(cfg)
    tied = bool(cfg.get("tie_word_embeddings")) or "lm_head.weight" not in tensors
    w = gguf.GGUFWriter(str(out), arch)
    add_model_metadata(w, cfg, name)
    w.add_file_type(FILE_TYPES[ftype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, tokenizer_dir, cfg, tokenizer_pre_name)
    report = GGUFReport(str(out), ftype)
    for hf_name, t in tensors.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gname = to_gguf_name(hf_name)
        arr = _numpy(t)
        if (n := heads_for(gname, cfg)) is not None:
            arr = permute_heads(arr, n)
        qtype = tensor_type(gname, arr.shape, ftype, cfg["num_hidden_layers"], tied)
        data = quantize(arr, qtype)
        w.add_tensor(gname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        report.n_params += arr.size
        report.n_bytes += data.nbytes
        report.types[qtype.name] = report.types.get(qtype.name, 0) + arr.size
        if progress:
            progress(gname)
    _finish(w)
    return report


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def write_gguf_adapter(out: str | Path, adapter_dir: str | Path, base_cfg: dict, ftype: str = "f32") -> GGUFReport:
    """A PEFT LoRA adapter as a llama.cpp adapter GGUF (``llama-server --lora``).

    A and B keep PEFT's shapes ([r, in] and [out, r]); the Q/K row permutation of the base is applied
    to B's output rows, which is exactly how it acts on the product B@A. ``adapter.lora.alpha`` is
    written so that llama.cpp's scale alpha/r equals PEFT's (rsLoRA's alpha/sqrt(r) folded in).
    """
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if acfg.get("use_dora"):
        raise ConfigError("format=gguf: DoRA adapters have no llama.cpp adapter form; export format=gguf from the merged model instead")
    if acfg.get("modules_to_save"):
        raise ConfigError(f"format=gguf: adapter has modules_to_save={acfg['modules_to_save']} (full tensors), which llama.cpp adapters cannot hold")
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise ConfigError("format=gguf: per-module rank_pattern/alpha_pattern cannot be expressed by one adapter.lora.alpha")
    if ftype not in ("f32", "f16", "bf16"):
        raise ConfigError(f"gguf.type={ftype!r}: LoRA adapter GGUFs are written as f32, f16 or bf16")
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    if acfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ConfigError(f"{adapter_dir} has no adapter_model.safetensors")
    state = load_file(str(weights_file))
    arch, _ = gguf_arch(base_cfg)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    qtype = FILE_TYPES[ftype][0]
    report = GGUFReport(str(out), ftype)
    for key in sorted(state):
        if ".lora_A." not in key:
            if ".lora_B." in key:
                continue
            raise ConfigError(f"format=gguf: adapter tensor {key!r} is not a LoRA factor (embeddings or extra modules are not supported)")
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        gname = to_gguf_name(module + ".weight")
        a = state[key].astype(np.float32)
        b = state[key.replace(".lora_A.", ".lora_B.")].astype(np.float32)
        if (n := heads_for(gname, base_cfg)) is not None:
            b = permute_heads(b, n)
        for suffix, arr in (("lora_a", a), ("lora_b", b)):
            data = quantize(arr, qtype)
            w.add_tensor(f"{gname}.{suffix}", data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            report.n_params += arr.size
            report.n_bytes += data.nbytes
        report.types[qtype.name] = report.n_params
    _finish(w)
    return report
