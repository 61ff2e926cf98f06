"""Config sections ``dpo.*`` and ``grpo.*``.

Loss names, advantage estimators and reward names are checked against their registries here, so a
typo fails at load time with the list of valid choices instead of deep inside a training step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trainer.config import ConfigError


@dataclass
class DPOConfig:
    loss: str = "sigmoid"  # a registered preference loss: sigmoid | ipo | hinge | robust | cdpo | simpo | orpo
    beta: float = 0.1  # inverse temperature of the implicit reward (SimPO: ~2.0; ORPO: the odds-ratio weight lambda)
    label_smoothing: float = 0.0  # robust/cdpo: assumed probability that a pair's label is flipped, in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: target reward margin
    reference: Literal["auto", "copy", "lora_disabled", "precomputed"] = "auto"  # auto: lora_disabled with LoRA, else copy
    max_prompt_len: int = 256  # tokens; longer prompts are an error naming the row (completions are truncated to train.seq_len)
    # data.source=arithmetic_pairs: pairs built from the model's own samples (see alignment/pairs.py)
    pair_samples: int = 6  # answers sampled per problem
    pair_max_tokens: int = 12  # completion budget of each sampled answer
    pair_temperature: float = 1.0

    def check(self, cfg) -> None:
        from alignment.losses import PREFERENCE_LOSSES

        if self.loss not in PREFERENCE_LOSSES:
            raise ConfigError(f"dpo.loss={self.loss!r} is not a registered preference loss; choose one of: {', '.join(PREFERENCE_LOSSES)}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0 (got {self.beta})")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if cfg.train.method != "dpo":
            return
        if self.reference == "lora_disabled" and not cfg.lora.enabled:
            raise ConfigError("dpo.reference=lora_disabled needs lora.enabled=true (the reference is the base under the adapter)")
        if self.max_prompt_len >= cfg.train.seq_len:
            raise ConfigError(f"dpo.max_prompt_len={self.max_prompt_len} must be < train.seq_len={cfg.train.seq_len} to leave room for completions")


@dataclass
class GRPOConfig:
    group_size: int = 8  # completions sampled per prompt (G)
    prompts_per_batch: int = 4  # prompts per generation batch on each rank
    updates_per_batch: int = 1  # optimizer steps taken on each generation batch (>1: ratios move off 1 and clipping matters)
    max_tokens: int = 8  # completion budget
    temperature: float = 1.0
    top_p: float = 1.0
    rewards: dict[str, float] = field(default_factory=lambda: {"correct": 1.0, "format": 0.5})  # name or pkg.module:fn -> weight
    format_pattern: str = r"\s*-?\d+"  # reward "format": re.match at the completion's start (end with $ for a full match)
    advantage: str = "grpo"  # registered advantage estimator: grpo | rloo
    scale_rewards: bool = True  # divide group-centred rewards by the group std (off: Dr. GRPO)
    policy_loss: str = "clip"  # registered policy loss
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO clip-higher; None = clip_eps
    loss_agg: str = "dapo"  # grpo (sequence mean of token means) | dr_grpo (token sum / max_tokens) | dapo (token mean)
    kl_coef: float = 0.0  # weight of KL(policy || reference); 0 = no reference model at all
    kl_estimator: str = "k3"  # k1 | k2 | k3 (Schulman's unbiased, always >= 0)
    reference: Literal["auto", "copy", "lora_disabled"] = "auto"  # used only when kl_coef > 0
    max_logprob_diff: float = 0.05  # stop when engine and trainer log-probs of sampled tokens differ by more (mean |diff|)
    parity_samples: int = 4  # completions re-scored by the trainer for that check
    eval_problems: int = 64  # held-out problems scored greedily by the engine at evaluate()
    rollout_kv_fraction: float = 0.1  # GPU: the colocated engine's KV cache takes at most this share of total memory (the trainer needs the rest)

    def check(self, cfg) -> None:
        from alignment import rl

        for key, registry in (("advantage", rl.ADVANTAGES), ("policy_loss", rl.POLICY_LOSSES),
                              ("loss_agg", rl.LOSS_AGGREGATIONS), ("kl_estimator", rl.KL_ESTIMATORS)):
            if getattr(self, key) not in registry:
                raise ConfigError(f"grpo.{key}={getattr(self, key)!r} is not registered; choose one of: {', '.join(registry)}")
        for key in ("group_size", "prompts_per_batch", "updates_per_batch", "max_tokens", "parity_samples"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"grpo.{key} must be > 0 (got {getattr(self, key)})")
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be >= 2: advantages compare completions within a group (got {self.group_size})")
        if self.temperature <= 0:
            raise ConfigError(f"grpo.temperature must be > 0 for sampling (got {self.temperature})")
        if not 0.0 < self.rollout_kv_fraction < 1.0:
            raise ConfigError(f"grpo.rollout_kv_fraction must be in (0, 1) (got {self.rollout_kv_fraction})")
        if not self.rewards:
            raise ConfigError("grpo.rewards is empty; give at least one, e.g. grpo.rewards=correct=1.0")
        if cfg.train.method != "grpo":
            return
        sequences = self.prompts_per_batch * self.group_size
        per_update = cfg.train.micro_batch_size * cfg.train.grad_accum
        if sequences != per_update * self.updates_per_batch:
            raise ConfigError(
                f"grpo.prompts_per_batch*grpo.group_size={sequences} completions must equal train.micro_batch_size*train.grad_accum"
                f"*grpo.updates_per_batch={per_update * self.updates_per_batch}: each optimizer step takes an equal share of a generation batch"
            )
        if self.kl_coef > 0 and self.reference == "lora_disabled" and not cfg.lora.enabled:
            raise ConfigError("grpo.reference=lora_disabled needs lora.enabled=true")
