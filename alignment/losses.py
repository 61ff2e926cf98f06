"""Preference losses: small registered pure functions over sequence log-probabilities.

Every loss takes a ``PairLogps`` (policy and, where used, reference log-probs of the chosen and
rejected completions, summed over completion tokens) and the ``dpo`` config section, and returns
one loss per pair. Adding a variant is one decorated function:

    @register_preference_loss("mine")
    def mine(lp: PairLogps, cfg) -> torch.Tensor: ...

Reference-free losses (SimPO, ORPO) are registered with ``reference_free=True`` so no reference
model is built for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    chosen: torch.Tensor  # [P] policy log p(chosen | prompt), summed over completion tokens
    rejected: torch.Tensor  # [P]
    chosen_tokens: torch.Tensor  # [P] completion lengths (for length-normalised losses)
    rejected_tokens: torch.Tensor  # [P]
    ref_chosen: torch.Tensor | None = None  # [P] same under the frozen reference
    ref_rejected: torch.Tensor | None = None

    def logratio_delta(self) -> torch.Tensor:
        """(log pi/ref)(chosen) - (log pi/ref)(rejected): the DPO implicit-reward margin divided by beta."""
        return (self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected)

    def mean_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Average per-token log-probs of chosen and rejected (length-normalised)."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


PreferenceLoss = Callable[[PairLogps, object], torch.Tensor]
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}
REFERENCE_FREE: set[str] = set()


def register_preference_loss(name: str, reference_free: bool = False) -> Callable[[PreferenceLoss], PreferenceLoss]:
    def wrap(fn: PreferenceLoss) -> PreferenceLoss:
        PREFERENCE_LOSSES[name] = fn
        if reference_free:
            REFERENCE_FREE.add(name)
        return fn

    return wrap


def needs_reference(loss: str) -> bool:
    return loss not in REFERENCE_FREE


@register_preference_loss("sigmoid")
def sigmoid_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * margin)."""
    return -F.logsigmoid(cfg.beta * lp.logratio_delta())


@register_preference_loss("cdpo")
def conservative_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """cDPO: DPO against labels flipped with probability ``label_smoothing`` (a smoothed BCE)."""
    z, eps = cfg.beta * lp.logratio_delta(), cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register_preference_loss("robust")
def robust_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): the unbiased estimator of the clean loss under label noise."""
    z, eps = cfg.beta * lp.logratio_delta(), cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register_preference_loss("hinge")
def hinge_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """SLiC-style hinge on the implicit-reward margin."""
    return torch.relu(1 - cfg.beta * lp.logratio_delta())


@register_preference_loss("ipo")
def ipo_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """IPO (Azar et al. 2023): regress the margin to 1/(2 beta).

    Log-ratios are averaged per token rather than summed, as the IPO authors did in their
    experiments (and TRL does): a summed margin makes the squared loss scale with length.
    """
    chosen = (lp.chosen - lp.ref_chosen) / lp.chosen_tokens.clamp(min=1)
    rejected = (lp.rejected - lp.ref_rejected) / lp.rejected_tokens.clamp(min=1)
    return (chosen - rejected - 1 / (2 * cfg.beta)) ** 2


@register_preference_loss("simpo", reference_free=True)
def simpo_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """SimPO (Meng et al. 2024): length-normalised log-probs as the reward, a target margin gamma, no reference."""
    chosen, rejected = lp.mean_token()
    z = cfg.beta * (chosen - rejected) - cfg.simpo_gamma
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register_preference_loss("orpo", reference_free=True)
def orpo_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """ORPO (Hong et al. 2024): NLL of the chosen answer + beta * odds-ratio penalty, no reference.

    odds(y) = p / (1 - p) with p the per-token geometric-mean probability. The NLL term is the
    per-sequence token mean, so each pair weighs the same whatever its length.
    """
    chosen, rejected = lp.mean_token()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return -chosen - cfg.beta * F.logsigmoid(log_odds)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of log 2 (Maechler 2012)."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def implicit_rewards(lp: PairLogps, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards logged as rewards/chosen and rewards/rejected.

    beta * log(pi/ref) for reference-based losses; beta * mean-token log-prob for reference-free ones
    (the quantity SimPO and ORPO actually push apart).
    """
    if lp.ref_chosen is None:
        chosen, rejected = lp.mean_token()
        return cfg.beta * chosen, cfg.beta * rejected
    return cfg.beta * (lp.chosen - lp.ref_chosen), cfg.beta * (lp.rejected - lp.ref_rejected)
