"""Preference pairs: ``prompt/chosen/rejected`` rows -> token ids, and the built-in ``arithmetic_pairs``.

Rows come in two shapes (TRL's):
- text: ``{"prompt": str, "chosen": str, "rejected": str}``; completions get the eos token appended.
- chat: ``{"prompt": [messages], "chosen": [assistant messages] | str, "rejected": ...}``, rendered
  with the chat template; the completion is what the template adds after the generation prompt,
  up to and including the stop token.

Bad rows (missing field, identical chosen and rejected, a prompt over ``dpo.max_prompt_len``) stop
the run naming the row, or are skipped and counted with ``data.on_error=skip``. Completions that do
not fit ``train.seq_len`` after their prompt lose their tail (counted).

``data.source=arithmetic_pairs`` builds pairs from the model's *own* answers: the colocated engine
samples ``dpo.pair_samples`` answers per problem (trainer/tasks.py) and a correct answer is paired
with an incorrect one. If the model never gets a problem right, the reference answer is the chosen
side (so the pairs still teach); if it always does, the problem is skipped (nothing to prefer).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.sequences import Document
from trainer import tasks
from trainer.config import ConfigError
from trainer.data.formats import RowError, validate_chat

BUILTIN_PAIRS = "arithmetic_pairs"


@dataclass(frozen=True)
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def documents(self) -> tuple[Document, Document]:
        return Document(self.prompt_ids, self.chosen_ids), Document(self.prompt_ids, self.rejected_ids)


@dataclass
class PairStats:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows (data.on_error=skip)
    truncated: int = 0
    generated: dict[str, int] = field(default_factory=dict)  # arithmetic_pairs: how pairs were made


class PairEncoder:
    def __init__(self, tokenizer, max_prompt_len: int, seq_len: int):
        self.tok, self.max_prompt_len, self.seq_len = tokenizer, max_prompt_len, seq_len
        self.eos = tokenizer.eos_token_id

    def encode(self, row: dict[str, Any], stats: PairStats) -> Pair:
        for key in ("prompt", "chosen", "rejected"):
            if row.get(key) in (None, "", []):
                raise RowError("missing field", f"missing '{key}'")
        if row["chosen"] == row["rejected"]:
            raise RowError("identical pair", "chosen and rejected are identical (no preference to learn)")
        if isinstance(row["prompt"], list):
            prompt_ids, chosen, rejected = self._chat(row)
        else:
            prompt_ids = self.tok(_str(row, "prompt"))["input_ids"]
            chosen, rejected = (self.tok(_str(row, k), add_special_tokens=False)["input_ids"] + [self.eos] for k in ("chosen", "rejected"))
        if len(prompt_ids) > self.max_prompt_len:
            raise RowError("prompt too long", f"prompt is {len(prompt_ids)} tokens > dpo.max_prompt_len={self.max_prompt_len}")
        room = self.seq_len - len(prompt_ids)
        if len(chosen) > room or len(rejected) > room:
            stats.truncated += 1
            chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            raise RowError("identical pair", "chosen and rejected tokenize to the same completion (after truncation)")
        return Pair(prompt_ids, chosen, rejected)

    def _chat(self, row: dict) -> tuple[list[int], list[int], list[int]]:
        prompt = row["prompt"]
        if isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
            raise RowError("prompt ends with assistant", "the prompt's last message is an assistant turn; the answer goes in chosen/rejected")
        prompt_ids = None
        out = []
        for key in ("chosen", "rejected"):
            value = row[key]
            turns = [{"role": "assistant", "content": value}] if isinstance(value, str) else list(value)
            full, _ = validate_chat(prompt + turns)  # checks the prompt's messages as well as the answer's
            prompt_ids = prompt_ids or self._render(full[: len(prompt)], add_generation_prompt=True)
            ids = self._render(full)
            if ids[: len(prompt_ids)] != prompt_ids:
                raise RowError("template mismatch", f"the chat template renders the prompt differently inside prompt+{key}")
            completion = ids[len(prompt_ids):]
            if self.eos in completion:  # train up to the stop token, not the newline the template writes after it
                completion = completion[: len(completion) - completion[::-1].index(self.eos)]
            out.append(completion)
        return prompt_ids, out[0], out[1]

    def _render(self, messages, add_generation_prompt: bool = False) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.tok(text, add_special_tokens=False)["input_ids"]


def _str(row: dict, key: str) -> str:
    if not isinstance(row[key], str):
        raise RowError("not a string", f"'{key}' is {type(row[key]).__name__}; use strings, or a message list for a chat prompt")
    return row[key]


def encode_pairs(rows: list[dict], encoder: PairEncoder, source: str, on_error: str) -> tuple[list[Pair], PairStats]:
    stats = PairStats(rows=len(rows))
    pairs = []
    for i, row in enumerate(rows):
        try:
            pairs.append(encoder.encode(row, stats))
        except RowError as e:
            if on_error == "raise":
                raise ConfigError(f"data.source={source!r} row {i}: {e} (data.on_error=skip drops bad rows)") from None
            stats.skipped[e.kind] += 1
    if not pairs:
        raise ConfigError(f"data.source={source!r}: no usable preference pairs ({dict(stats.skipped)} skipped)")
    return pairs, stats


def load_pair_rows(cfg, engine_factory=None) -> tuple[list[dict], dict[str, int]]:
    """Rows of ``data.source``: a file/dir (jsonl, json, parquet, csv, saved dataset) or ``arithmetic_pairs``."""
    if cfg.data.source == BUILTIN_PAIRS:
        return arithmetic_pairs(cfg, engine_factory())
    from trainer.data.sources import load_rows

    if cfg.data.source in ("arithmetic", "chat", "shakespeare") or cfg.data.source.startswith("text:"):
        raise ConfigError(f"data.source={cfg.data.source!r} has no preference pairs; DPO needs prompt/chosen/rejected rows or {BUILTIN_PAIRS!r}")
    rows, _ = load_rows(cfg.data, cfg.seed)
    return rows, {}


def arithmetic_pairs(cfg, llm) -> tuple[list[dict], dict[str, int]]:
    """Sample the policy's answers to arithmetic problems and pair a right one with a wrong one."""
    from engine import SamplingParams

    d = cfg.dpo
    problems = tasks.generate(cfg.data.num_samples, seed=cfg.seed, difficulty=cfg.data.difficulty)
    params = SamplingParams(n=d.pair_samples, temperature=d.pair_temperature, max_tokens=d.pair_max_tokens, seed=cfg.seed)
    outputs = llm.chat([p.messages for p in problems], params, use_tqdm=True)
    rows, counts = [], Counter()
    for problem, out in zip(problems, outputs):
        answers = list(dict.fromkeys(c.text.strip() for c in out.outputs if c.text.strip()))  # distinct, in order
        right = [a for a in answers if tasks.is_correct(a, problem.answer)]
        wrong = [a for a in answers if not tasks.is_correct(a, problem.answer)]
        if not wrong:
            counts["skipped (always right)"] += 1
            continue
        counts["chosen: own answer" if right else "chosen: reference answer"] += 1
        rows.append({"prompt": problem.messages, "chosen": right[0] if right else problem.answer, "rejected": wrong[0]})
    counts["problems"] = len(problems)
    counts["sampled accuracy (%)"] = round(100 * sum(
        tasks.is_correct(c.text, p.answer) for p, o in zip(problems, outputs) for c in o.outputs) / (len(problems) * d.pair_samples))
    return rows, dict(counts)


def save_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
