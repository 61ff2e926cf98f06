"""GRPO reward functions: a registry of built-ins plus any user function by dotted path.

A reward function has TRL's signature, so functions written for TRL work unchanged:

    def my_reward(prompts: list, completions: list[str], **columns) -> list[float]

``columns`` holds the prompt rows' other fields repeated per completion (``answer`` for the
arithmetic task) plus ``completion_ids``. ``grpo.rewards`` maps names (``correct``) or dotted paths
(``mypkg.rewards:brevity``) to weights; the total reward is the weighted sum. Built-ins are
registered as *factories* of the GRPO config so they can read their options (``format_pattern``).
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from trainer import tasks
from trainer.config import ConfigError

RewardFn = Callable[..., list[float]]
REWARDS: dict[str, Callable[[Any], RewardFn]] = {}


def register_reward(name: str):
    def wrap(factory: Callable[[Any], RewardFn]) -> Callable[[Any], RewardFn]:
        REWARDS[name] = factory
        return factory

    return wrap


@register_reward("correct")
def correct_reward(cfg) -> RewardFn:
    """1 when the first integer of the completion equals the row's ``answer`` (trainer/tasks.py)."""

    def correct(prompts, completions, answer, **_):
        return [float(tasks.is_correct(c, a)) for c, a in zip(completions, answer)]

    return correct


@register_reward("format")
def format_reward(cfg) -> RewardFn:
    """1 when the completion matches ``grpo.format_pattern`` at its start (``re.match``; end it with ``$``
    to demand a full match). The default, an integer first, is what the arithmetic prompt asks for."""
    pattern = re.compile(cfg.format_pattern)

    def format_(prompts, completions, **_):
        return [float(pattern.match(c) is not None) for c in completions]

    return format_


@register_reward("length")
def length_reward(cfg) -> RewardFn:
    """-(completion tokens / grpo.max_tokens): a penalty in [-1, 0] for long answers."""

    def length(prompts, completions, completion_ids, **_):
        return [-len(ids) / cfg.max_tokens for ids in completion_ids]

    return length


@dataclass
class Reward:
    name: str
    weight: float
    fn: RewardFn


def build_rewards(cfg) -> list[Reward]:
    """``grpo.rewards`` -> callables; unknown names and unimportable paths fail at setup, naming the key."""
    out = []
    for name, weight in cfg.rewards.items():
        if name in REWARDS:
            fn = REWARDS[name](cfg)
        elif ":" in name:
            module, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"grpo.rewards: cannot load reward function {name!r}: {e}") from None
            if not callable(fn):
                raise ConfigError(f"grpo.rewards: {name!r} is not callable")
        else:
            raise ConfigError(f"grpo.rewards: unknown reward {name!r}; built-ins: {', '.join(REWARDS)}, or a function as pkg.module:fn")
        out.append(Reward(name, float(weight), fn))
    return out


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it."""


def score(rewards: list[Reward], prompts: list, completions: list[str], columns: dict[str, list]) -> dict[str, list[float]]:
    """Every reward function's values for the batch, by name; a failing function stops the run by name."""
    out = {}
    for r in rewards:
        try:
            values = r.fn(prompts=prompts, completions=completions, **columns)
        except Exception as e:
            raise RewardError(f"reward function {r.name!r} raised {type(e).__name__}: {e}") from e
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise RewardError(f"reward function {r.name!r} returned {len(values)} values for {len(completions)} completions")
        out[r.name] = [_number(r.name, v) for v in values]
    return out


def _number(name: str, value: Any) -> float:
    try:
        x = float(value)  # numpy and 0-d torch scalars too
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise RewardError(f"reward function {name!r} returned {value!r}; rewards must be finite numbers")
    return x


def total(rewards: list[Reward], values: dict[str, list[float]]) -> list[float]:
    n = len(next(iter(values.values())))
    return [sum(r.weight * values[r.name][i] for r in rewards) for i in range(n)]
