"""Procedurally generated tasks with exactly verifiable answers.

Shared by SFT data (``data.source=arithmetic``), engine evaluation (accuracy), GRPO rewards,
DPO pair generation and the distillation verifier, so "correct" means the same thing everywhere.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

SYSTEM_PROMPT = "You are a careful calculator. Reply with the final number only."
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # canonical integer string

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.question}]

    def chat(self) -> list[dict[str, str]]:
        """The full conversation with the reference answer (for SFT)."""
        return self.messages + [{"role": "assistant", "content": self.answer}]


def _operands(rng: random.Random, difficulty: int) -> tuple[int, int]:
    hi = {1: 9, 2: 20, 3: 99, 4: 999}.get(difficulty, 9999)
    return rng.randint(0, hi), rng.randint(0, hi)


def make_problem(rng: random.Random, difficulty: int = 1) -> Problem:
    """Difficulty 1: single digits, + and -. 2: up to 20, with *. 3: two digits. 4+: three-term expressions."""
    ops = ["+", "-"] if difficulty <= 1 else ["+", "-", "*"]
    a, b = _operands(rng, difficulty)
    op = rng.choice(ops)
    if op == "*" and difficulty >= 3:
        b = rng.randint(0, 12)  # keep products learnable
    expr = f"{a} {op} {b}"
    if difficulty >= 4:
        c = rng.randint(0, 99)
        op2 = rng.choice(["+", "-"])
        expr = f"{expr} {op2} {c}"
    value = eval(expr, {"__builtins__": {}})  # noqa: S307 - expr is built from integers and + - * only
    return Problem(question=f"What is {expr}?", answer=str(value))


def generate(n: int, seed: int = 0, difficulty: int = 1) -> list[Problem]:
    rng = random.Random(f"arithmetic-{seed}-{difficulty}")
    return [make_problem(rng, difficulty) for _ in range(n)]


def extract_answer(text: str) -> str | None:
    """The first integer in a completion (models often add words around it)."""
    m = _NUMBER.search(text.replace(",", ""))
    return str(int(m.group())) if m else None


def is_correct(completion: str, answer: str) -> bool:
    got = extract_answer(completion)
    return got is not None and got == str(int(answer))
