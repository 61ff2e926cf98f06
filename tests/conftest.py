"""Shared fixtures: the embedded model directory and tiny random models of each supported architecture."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF directory (converted once, cached)."""
    from trainer.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


def make_tiny_model_dir(out: Path, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """A random-init model of ``arch`` (llama | mistral | qwen2 | qwen3) with the SmolLM2 tokenizer, saved as HF."""
    import transformers
    from trainer.models import resolve_model_path

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[arch]
    sizes = dict(TINY_SIZES, vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=arch != "mistral",
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch in ("qwen2", "qwen3", "llama"):
        sizes["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"]
    sizes.update(overrides)
    config = getattr(transformers, cls)(**sizes)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init so random models produce varied, non-degenerate tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[tuple, str] = {}

    def make(arch: str = "llama", seed: int = 0, **overrides) -> str:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_tiny_model_dir(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, seed, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: a second intra-op thread only adds contention (and 10x slowdowns under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
