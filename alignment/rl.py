"""GRPO building blocks as registered pure functions over tensors (verl ``core_algos`` style).

Four registries, each selected by a ``grpo.*`` key:
- ``ADVANTAGES`` (``grpo.advantage``): rewards [N] grouped by prompt -> advantages [N].
- ``POLICY_LOSSES`` (``grpo.policy_loss``): per-token surrogate loss and a clipped-token mask.
- ``KL_ESTIMATORS`` (``grpo.kl_estimator``): per-token estimate of KL(policy || reference).
- ``LOSS_AGGREGATIONS`` (``grpo.loss_agg``): how per-token losses become the loss *sum* of a
  micro-batch and the *units* it is averaged over (known before the forward, so gradient
  accumulation stays exact: see trainer/methods.py).

Shapes: ``logp, old_logp, ref_logp, mask`` are [N, T] over completion tokens (mask 1 on real
tokens); ``advantages`` is [N]. Rows are ordered group by group (G consecutive rows per prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
LOSS_AGGREGATIONS: dict[str, "Aggregation"] = {}


def _register(registry: dict, name: str):
    def wrap(fn):
        registry[name] = fn
        return fn

    return wrap


def register_advantage(name: str):
    return _register(ADVANTAGES, name)


def register_policy_loss(name: str):
    return _register(POLICY_LOSSES, name)


def register_kl(name: str):
    return _register(KL_ESTIMATORS, name)


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------
@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Reward minus its group's mean, divided by the group's std when ``scale`` (Shao et al. 2024).

    A group whose completions all earn the same reward gets zero advantage: it carries no signal.
    """
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Leave-one-out baseline (Ahmadian et al. 2024): each reward minus the mean of the *other* G-1."""
    groups = rewards.view(-1, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    centred = groups - baseline
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------
@register_policy_loss("clip")
def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token: -min(r A, clip(r, 1-eps_low, 1+eps_high) A).

    Returns (loss [N, T], clipped [N, T]) where ``clipped`` marks tokens whose gradient the clip removed.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


# ---------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020), with x = ref/policy ratio
# ---------------------------------------------------------------------------------------------
@register_kl("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@register_kl("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """x - log x - 1 with x = pi_ref/pi: unbiased, non-negative, low variance (the GRPO paper's choice)."""
    log_ratio = (ref_logp - logp).clamp(-20, 20)  # exp overflow guard on wildly off-policy tokens
    return torch.exp(log_ratio) - log_ratio - 1


# ---------------------------------------------------------------------------------------------
# Loss aggregation: loss_sum(per_token, mask) / units(mask) summed over the accumulation window
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Aggregation:
    loss_sum: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (per_token, mask, max_tokens) -> scalar
    units: Callable[[torch.Tensor, int], float]  # (mask, max_tokens) -> what the sum is divided by

    def __call__(self, per_token: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
        """The loss averaged over this batch alone (convenience for tests and single-batch use)."""
        return self.loss_sum(per_token, mask, max_tokens) / self.units(mask, max_tokens)


def register_loss_agg(name: str, loss_sum, units) -> None:
    LOSS_AGGREGATIONS[name] = Aggregation(loss_sum, units)


# GRPO paper: mean over each sequence's tokens, then mean over sequences (long answers weigh less per token).
register_loss_agg(
    "grpo",
    lambda x, m, _: ((x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).sum(),
    lambda m, _: float(m.shape[0]),
)
# Dr. GRPO (Liu et al. 2025): token sums divided by a constant (the completion budget): no length bias.
register_loss_agg("dr_grpo", lambda x, m, max_tokens: (x * m).sum() / max_tokens, lambda m, _: float(m.shape[0]))
# DAPO (Yu et al. 2025): mean over every token of the batch.
register_loss_agg("dapo", lambda x, m, _: (x * m).sum(), lambda m, _: float(m.sum()))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))
