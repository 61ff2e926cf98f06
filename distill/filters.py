"""Quality filters for teacher-written rows: length, exact and near duplicates (MinHash), verifier, judge.

Each filter answers "why drop this row?" with a short reason (or None to keep), so the generator
can report its yield as counts per reason.
"""
from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

from trainer import tasks

_WORD = re.compile(r"\w+")
_PRIME = (1 << 31) - 1  # Mersenne prime: hash values and coefficients stay below 2^31, so a*x + b fits in uint64


def normalize(text: str) -> str:
    """Case, punctuation and spacing do not make two instructions different."""
    return " ".join(_WORD.findall(text.lower()))


def length_reason(text: str, min_chars: int, max_chars: int) -> str | None:
    n = len(text.strip())
    if n < min_chars:
        return "too_short"
    if n > max_chars:
        return "too_long"
    return None


def verify_reason(completion: str, answer: str | None) -> str | None:
    """Verifiable rows (arithmetic) must carry the exact answer; open-ended rows have none to check."""
    if answer is None:
        return None
    return None if tasks.is_correct(completion, answer) else "wrong_answer"


_SCORE = re.compile(r"[1-5]")


def parse_judge_score(text: str) -> int | None:
    """The first digit 1-5 of a judge's reply ("Score: 4/5" -> 4); None when there is none."""
    m = _SCORE.search(text)
    return int(m.group()) if m else None


class ExactDedup:
    """Drops a text whose normalized form was seen before."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def reason(self, text: str) -> str | None:
        key = hashlib.sha1(normalize(text).encode()).hexdigest()
        if key in self.seen:
            return "duplicate"
        self.seen.add(key)
        return None


class MinHashDedup:
    """Near-duplicate removal: MinHash signatures of word n-gram shingles, LSH bands to find candidates.

    Two texts are near-duplicates when the estimated Jaccard similarity of their shingle sets is at
    least ``threshold``. Band/row counts put the LSH S-curve's turn just below the threshold; the
    estimate is then checked on the candidates, so banding only decides what gets compared.
    """

    def __init__(self, threshold: float = 0.7, ngram: int = 3, num_perm: int = 64, seed: int = 0):
        self.threshold, self.ngram = threshold, ngram
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
        self.bands, self.rows = _bands_for(threshold, num_perm)
        self.buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []

    def shingles(self, text: str) -> set[int]:
        words = normalize(text).split()
        grams = [" ".join(words[i : i + self.ngram]) for i in range(max(1, len(words) - self.ngram + 1))]
        return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") % _PRIME for g in grams}

    def signature(self, text: str) -> np.ndarray:
        x = np.fromiter(self.shingles(text), dtype=np.uint64)
        return ((np.outer(x, self.a) + self.b) % _PRIME).min(axis=0)

    def similarity(self, text_a: str, text_b: str) -> float:
        return float((self.signature(text_a) == self.signature(text_b)).mean())

    def reason(self, text: str) -> str | None:
        sig = self.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for band, key in zip(self.buckets, keys) for j in band.get(key, ())}
        if any((self.signatures[j] == sig).mean() >= self.threshold for j in candidates):
            return "near_duplicate"
        for band, key in zip(self.buckets, keys):
            band[key].append(len(self.signatures))
        self.signatures.append(sig)
        return None


def _bands_for(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows = num_perm whose S-curve midpoint (1/b)^(1/r) is the highest at or below
    the threshold: pairs at the threshold then collide in some band almost surely (few missed near-duplicates),
    and the extra candidates this lets through are rejected by the signature check."""
    pairs = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
    below = [br for br in pairs if (1 / br[0]) ** (1 / br[1]) <= threshold]
    return max(below, key=lambda br: (1 / br[0]) ** (1 / br[1]))
