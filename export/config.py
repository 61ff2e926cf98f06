"""Config sections ``export.*``, ``gguf.*``, ``awq.*`` and ``verify.*`` (with ``run=``, ``format=``, ``output_dir=``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.config import ConfigError

FORMATS = ("merged", "awq", "gguf")


@dataclass
class ExportConfig:
    name: str | None = None  # artifact name (default: the source directory's name)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # merged weights; auto = the base model's dtype
    qlora: Literal["auto", "true", "false"] = "auto"  # merge into the dequantized NF4 base; auto reads the run's quant.*
    overwrite: bool = False  # replace an existing artifact at the output path

    def check(self, cfg) -> None:
        if cfg.format is not None and cfg.format not in FORMATS:
            raise ConfigError(f"format={cfg.format!r} is not supported; choose one of: {', '.join(FORMATS)}")


@dataclass
class GGUFConfig:
    type: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"] = "q8_0"
    tokenizer_pre: str = "auto"  # llama.cpp pre-tokenizer name; auto recognises SmolLM, Qwen2 and Llama-3 vocabularies
    adapter: bool = True  # for adapter sources, also write the LoRA as a llama.cpp adapter GGUF (f32/f16/bf16)


@dataclass
class AWQConfig:
    group_size: int = 128  # input channels per scale/zero group
    group_fallback: bool = True  # use 64/32 when group_size does not divide every layer (SmolLM2: hidden 576)
    n_grid: int = 20  # alpha grid for the scale search
    clip: bool = True  # per-group clipping search (q/k excluded)
    calib_data: str = "shakespeare"  # shakespeare | chat | arithmetic | text:<file> | dataset path
    calib_samples: int = 32  # calibration sequences
    calib_seq_len: int = 512
    search_tokens: int = 2048  # tokens scored per alpha candidate (statistics use all calibration tokens)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where calibration runs; auto = cuda when present (the saved files are the same)

    def check(self, cfg) -> None:
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("awq.device=cuda but no CUDA device is visible; use awq.device=auto or cpu")
        if self.group_size not in (32, 64, 128, 256):
            raise ConfigError(f"awq.group_size={self.group_size} must be one of 32, 64, 128, 256")
        for key in ("n_grid", "calib_samples", "calib_seq_len", "search_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"awq.{key} must be > 0 (got {getattr(self, key)})")


@dataclass
class VerifyConfig:
    enabled: bool = True  # load the artifact back and compare with its source
    strict: bool = True  # exit non-zero when a check fails
    backend: Literal["auto", "transformers", "engine", "llama_cpp"] = "auto"  # auto: llama_cpp for gguf when installed
    data: str = "shakespeare"  # held-out text (plays from the other end of the corpus than calibration)
    num_seqs: int = 4
    seq_len: int = 256
    greedy_tokens: int = 16

    def check(self, cfg) -> None:
        if self.backend == "llama_cpp" and cfg.format not in (None, "gguf"):
            raise ConfigError(f"verify.backend=llama_cpp only reads GGUF files, not format={cfg.format}")
        for key in ("num_seqs", "seq_len", "greedy_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"verify.{key} must be > 0 (got {getattr(self, key)})")
