"""Config sections ``engine.*`` (the inference engine) and ``serve.*`` (the HTTP server)."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ConfigError


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block (also the prefix-cache granularity)
    num_blocks: int = 512  # CPU KV budget in blocks; on GPU the budget comes from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the engine may use (weights + activations + KV)
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunks + decodes)
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True  # split long prompts across steps, mixed with decodes
    enforce_eager: bool = False  # GPU: skip CUDA-graph capture of decode steps
    gemv: bool = True  # GPU: Triton GEMV for projections at <= 8 rows (tuned against cuBLAS at start-up)
    pdl: bool = True  # GPU (Hopper+): programmatic dependent launch of the decode-path Triton kernels (engine/kernels)
    launch_ahead: bool = True  # GPU graphs: queue the next decode step before step() returns (hides host time)
    # greedy decode steps run back to back on the device per engine step, each feeding its argmax to the
    # next, tokens read once at the end (vLLM's multi-step scheduling): the host's share of a step is
    # paid once per decode_steps tokens. Only when every running sequence is plain greedy and nothing waits.
    decode_steps: int = 16
    # GPU graphs: queue the next multi-step round before reading the current one's tokens, so the host's
    # booking of a round overlaps the next round on the GPU (the queued round is discarded, its work
    # wasted, if the batch changes: a sequence stops, a request arrives). Off by default: on an H100 it
    # measured -5 % to +2.5 % per token at batch 1 (BENCHMARKS.md, session 9), not worth the wasted rounds
    pipeline_rounds: bool = False
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16 on GPU)
    attention_backend: str = "auto"  # auto (triton on GPU, torch on CPU) | torch | triton
    adapter: str | None = None  # eval: PEFT adapter dir merged into the base weights at load time
    seed: int = 0  # seeds requests that set no seed of their own
    enable_lora: bool = False  # serve unmerged LoRA adapters (engine/lora.py); serve turns it on when lora.adapters is set
    max_loras: int = 4  # adapter slots resident at once (base model excluded)
    max_lora_rank: int = 16  # largest adapter rank a slot holds; smaller ranks are zero-padded
    max_cpu_loras: int | None = None  # adapters kept loaded in CPU memory (LRU) beyond the slots; None = every registered one

    def check(self, cfg) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_loras", "max_lora_rank",
                     "decode_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"engine.{name} must be > 0 (got {getattr(self, name)})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"engine.gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"):
            raise ConfigError(f"engine.dtype={self.dtype!r} is not allowed; choose one of: auto, fp32, bf16, fp16")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"engine.attention_backend={self.attention_backend!r} is not allowed; choose one of: auto, torch, triton")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"engine.max_model_len must be > 0 (got {self.max_model_len})")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"engine.max_cpu_loras={self.max_cpu_loras} must be >= engine.max_loras={self.max_loras} "
                              "(every adapter in a GPU slot also has its CPU copy)")


@dataclass
class ServeConfig:
    max_waiting: int = 256  # requests allowed to wait for a batch slot; beyond that new ones get 429 + Retry-After
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <api_key>"
    served_model_name: str | None = None  # the base model's id in /v1/models and `model` (default: model.path)
    drain_timeout_s: float = 30.0  # on shutdown: stop admitting, let in-flight requests finish for at most this long
    log_requests: bool = False  # uvicorn access log

    def check(self, cfg) -> None:
        if self.max_waiting < 0:
            raise ConfigError(f"serve.max_waiting must be >= 0 (got {self.max_waiting})")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"serve.drain_timeout_s must be >= 0 (got {self.drain_timeout_s})")
        if cfg is None:
            return
        adapters = cfg.lora.adapters  # more than engine.max_loras is fine: the rest wait in CPU memory (LRU)
        if self.served_model_name is not None and self.served_model_name in adapters:
            raise ConfigError(f"lora.adapters: adapter name {self.served_model_name!r} is serve.served_model_name (the base model)")
