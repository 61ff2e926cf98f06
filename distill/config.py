"""Config sections ``distill.*`` (teacher -> student training) and ``synth.*`` (teacher-written data)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.config import ConfigError


@dataclass
class DistillConfig:
    teacher: str = "smollm2-135m-instruct"  # alias or HF dir of the (frozen) teacher
    # --- student -------------------------------------------------------------------------------
    student: Literal["model", "prune_every_k"] = "model"  # model: cfg.model as built (e.g. init=random + sizes); prune_every_k: warm start from teacher layers
    keep_every_k: int = 2  # prune_every_k: keep ceil(L/k) teacher layers, spread evenly, first and last included
    # --- loss ----------------------------------------------------------------------------------
    teacher_logits: Literal["online", "offline", "none"] = "online"  # online: teacher forward each step; offline: cached top-k; none: data-based (CE only)
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"  # a name registered in distill.losses
    jsd_beta: float = 0.5  # jsd: weight of the teacher in the mixture (0 < beta < 1)
    temperature: float = 1.0  # softens both distributions; the KD term is scaled by T^2
    ce_weight: float = 0.0  # loss = (1 - ce_weight) * KD + ce_weight * CE on dataset tokens
    chunk_size: int = 512  # tokens per lm_head projection chunk (full-vocab logits exist for one chunk at a time)
    teacher_quant: Literal["none", "nf4"] = "none"  # online teacher stored NF4 (bitsandbytes), uses quant.* settings
    teacher_sharded: bool = False  # wrap the frozen teacher with the run's strategy (fsdp2/zero3 shard it)
    topk: int = 64  # offline: teacher log-probs kept per token
    cache_path: str | None = None  # offline: top-k file; default <output_dir>/teacher_topk.safetensors (built once if missing)
    # --- on-policy (GKD) -----------------------------------------------------------------------
    on_policy_ratio: float = 0.0  # lambda: share of micro-batches sampled by the student through the engine
    on_policy_max_new_tokens: int = 64
    on_policy_temperature: float = 1.0
    engine_memory_utilization: float = 0.3  # GPU share of the student's sampling engine (it sits beside training)
    # --- pipeline ------------------------------------------------------------------------------
    generate_if_missing: bool = True  # setup runs synth generation when data.source == synth.output does not exist yet
    evaluate: bool = True  # finish(): student-before / student-after / teacher table and PNG
    eval_num_texts: int = 16  # held-out texts for perplexity and teacher agreement
    eval_num_problems: int = 32  # arithmetic problems for accuracy
    eval_max_new_tokens: int = 24

    def check(self, cfg) -> None:
        if cfg.train.method != "distill":
            return
        if self.keep_every_k < 1:
            raise ConfigError(f"distill.keep_every_k must be >= 1 (got {self.keep_every_k})")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ConfigError(f"distill.jsd_beta={self.jsd_beta} must be strictly between 0 and 1 (use loss=forward_kl or reverse_kl for the ends)")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0 (got {self.temperature})")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ConfigError(f"distill.ce_weight must be in [0, 1] (got {self.ce_weight})")
        if not 0.0 <= self.on_policy_ratio <= 1.0:
            raise ConfigError(f"distill.on_policy_ratio must be in [0, 1] (got {self.on_policy_ratio})")
        if self.chunk_size <= 0 or self.topk <= 0:
            raise ConfigError(f"distill.chunk_size and distill.topk must be > 0 (got {self.chunk_size}, {self.topk})")
        if self.on_policy_ratio > 0 and self.teacher_logits != "online":
            raise ConfigError(
                f"distill.on_policy_ratio={self.on_policy_ratio} needs distill.teacher_logits=online: the teacher must score the student's fresh samples"
            )
        if self.on_policy_ratio > 0 and cfg.lora.enabled:
            raise ConfigError("distill.on_policy_ratio > 0 needs lora.enabled=false: the engine is synced with full student weights")
        if self.student == "prune_every_k" and cfg.lora.enabled:
            raise ConfigError("distill.student=prune_every_k trains the pruned student fully; set lora.enabled=false")


@dataclass
class SynthConfig:
    teacher: str | None = None  # model writing the data; default distill.teacher
    output: str = "data/synth.jsonl"  # JSONL chat rows with lineage (load with data.source=<output>)
    seeds: str = "builtin"  # builtin | path to a JSONL/text file of seed instructions (one per row: {"instruction": ...})
    num_instructions: int = 64  # open-ended instructions the teacher invents from the seeds
    num_arithmetic: int = 64  # verifiable tasks (trainer.tasks arithmetic); answers checked by the verifier
    arithmetic_difficulty: int = 1
    examples_per_prompt: int = 3  # seed instructions shown in each self-instruct prompt
    instruction_temperature: float = 1.0
    response_temperature: float = 0.3
    top_p: float = 0.95
    max_instruction_tokens: int = 48
    max_response_tokens: int = 128
    batch_size: int = 32  # prompts per engine call (the progress bar advances per batch)
    # --- filters -------------------------------------------------------------------------------
    min_instruction_chars: int = 12
    max_instruction_chars: int = 300
    min_response_chars: int = 1
    max_response_chars: int = 1200
    near_dup_threshold: float = 0.7  # estimated Jaccard of word n-gram shingles at which a row is a near-duplicate (1 disables)
    ngram: int = 3
    num_perm: int = 64  # MinHash permutations (more = tighter Jaccard estimate)
    verify: bool = True  # drop arithmetic rows whose answer is wrong
    judge: bool = False  # the teacher rates each response 1-5; keep >= judge_min_score
    judge_min_score: int = 3
    # --- mix -----------------------------------------------------------------------------------
    real_source: str | None = None  # real rows to mix in: arithmetic | path to JSONL chat rows
    real_fraction: float = 0.0  # share of the output that is real data
    seed: int = 0

    def check(self, cfg) -> None:
        if not 0.0 <= self.real_fraction < 1.0:
            raise ConfigError(f"synth.real_fraction must be in [0, 1) (got {self.real_fraction})")
        if self.real_fraction > 0 and not self.real_source:
            raise ConfigError(f"synth.real_fraction={self.real_fraction} needs synth.real_source (arithmetic or a JSONL path)")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ConfigError(f"synth.near_dup_threshold must be in (0, 1] (got {self.near_dup_threshold})")
        if self.num_instructions < 0 or self.num_arithmetic < 0 or self.num_instructions + self.num_arithmetic == 0:
            raise ConfigError("synth.num_instructions + synth.num_arithmetic must be > 0")
        if self.batch_size <= 0 or self.examples_per_prompt <= 0 or self.ngram <= 0 or self.num_perm <= 0:
            raise ConfigError("synth.batch_size, synth.examples_per_prompt, synth.ngram and synth.num_perm must be > 0")
        if not 1 <= self.judge_min_score <= 5:
            raise ConfigError(f"synth.judge_min_score must be in 1..5 (got {self.judge_min_score})")
