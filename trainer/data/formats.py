"""Rows -> ``Example``s: format detection, row validation, chat loss masks, truncation.

Three formats, one output: ``Example(input_ids, labels)`` with ``labels == -100`` where no loss is
taken. The first label of every example is always -100: it has no context to be predicted from
(the model shifts labels internally, so it is never used unpacked), and in a packed row it would
otherwise be "predicted" by the previous document's last token.

- chat: ``[{"role", "content"}, ...]`` rendered with the tokenizer's chat template. The loss covers
  every assistant turn's content up to and including the stop token (``<|im_end|>`` for SmolLM2);
  what the template writes after the stop token (a newline) and the next turn's header are not
  trained. Spans come from rendering prefixes: the assistant turn ``i`` is the text between
  ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``; both must be
  prefixes of the full rendering, which is exactly the prefix-consistency a multi-turn chat needs.
- prompt_completion: ``{"prompt", "completion"}`` strings (loss on the completion, eos appended), or
  message lists (TRL's conversational form), which become a chat trained on the completion only.
- text: loss on every token; each document (eos appended) is cut into ``seq_len`` windows.

Examples longer than ``seq_len`` keep their head (the prompt) and lose the tail; one whose first
``seq_len`` tokens hold no trained token at all is dropped. Both are counted in the report.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from trainer.config import ConfigError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("text", "prompt_completion", "chat")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE (-100) = no loss

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class RowError(ValueError):
    """A bad data row: ``kind`` groups the skip counts, the message says exactly what is wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class TemplateError(ConfigError):
    """The chat template cannot give a trustworthy loss mask (not a problem of one row)."""


@dataclass
class EncodeStats:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # kind -> rows skipped (data.on_error=skip)
    truncated: int = 0  # longer than seq_len, tail cut
    dropped_too_long: int = 0  # longer than seq_len with nothing trained in the head
    windows: int = 0  # text: seq_len windows cut from documents


# --------------------------------------------------------------------------------------------
# Format detection and row validation
# --------------------------------------------------------------------------------------------
def detect_format(columns: Iterable[str], requested: str, text_field: str, chat_field: str) -> str:
    columns = list(columns)
    if requested != "auto":
        return requested
    if chat_field in columns:
        return "chat"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if text_field in columns:
        return "text"
    raise ConfigError(
        f"data.format=auto cannot tell the format from the columns {columns}: expected '{chat_field}' (chat, "
        f"data.chat_field), 'prompt'+'completion', or '{text_field}' (text, data.text_field); set data.format"
    )


def _messages(value: Any, what: str = "messages") -> list[dict[str, str]]:
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError("invalid JSON", f"{what} is not valid JSON ({e.msg})") from None
    if value is None:
        raise RowError("missing field", f"missing '{what}'")
    if not isinstance(value, list) or not value:
        raise RowError("not a message list", f"{what} must be a non-empty list of {{role, content}} (got {type(value).__name__})")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError("malformed message", f"{what}[{j}] must be a mapping with 'role' and 'content' (got {m!r:.80})")
        if m["role"] not in ROLES:
            raise RowError("unknown role", f"{what}[{j}] has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError("non-string content", f"{what}[{j}] content is {type(m['content']).__name__}, expected a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError("empty assistant turn", f"{what}[{j}] is an empty assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in value]  # drop extra keys (name, tool_calls...)


def validate_chat(messages: Any) -> tuple[list[dict[str, str]], list[int]]:
    """Checked messages and the indices of the assistant turns to train on."""
    messages = _messages(messages)
    trained = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if not trained:
        raise RowError("no assistant turn", "no assistant turn to train on")
    if trained[0] == 0:
        raise RowError("starts with assistant", "the conversation starts with an assistant turn (nothing to condition on)")
    return messages, trained


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError("missing field", f"missing '{key}'")
    if not isinstance(value, str):
        raise RowError("non-string field", f"'{key}' is {type(value).__name__}, expected a string")
    return value


# --------------------------------------------------------------------------------------------
# Chat: assistant spans by prefix rendering
# --------------------------------------------------------------------------------------------
def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raise_exception(): the template rejects this conversation
        raise RowError("rejected by chat template", f"the chat template rejects this conversation: {e}") from None


def chat_spans(tokenizer, messages, trained: list[int], stop_token: str | None, strict: bool) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans to train on (one per trained assistant turn).

    ``strict`` (data.template_check) requires the stop token inside every span; otherwise a span
    without it is trained as rendered. Prefix inconsistency is always an error: no mask can be
    trusted when the rendered history changes as the conversation grows.
    """
    full = render(tokenizer, messages)
    spans = []
    for j in trained:
        before = render(tokenizer, messages[:j], add_generation_prompt=True)
        after = full if j == len(messages) - 1 else render(tokenizer, messages[: j + 1])
        if not (after.startswith(before) and full.startswith(after)):
            which = "the generation prompt" if not after.startswith(before) else "later turns"
            raise TemplateError(
                f"chat template is not prefix-consistent: message {j} (assistant) renders differently once {which} "
                f"are added, so its loss mask cannot be located; fix the template (data.template_check)"
            )
        start, end = len(before), len(after)
        stop_at = full.rfind(stop_token, start, end) if stop_token else -1
        if stop_at >= 0:
            end = stop_at + len(stop_token)  # the newline a template writes after the stop token is not trained
        elif strict:
            raise TemplateError(
                f"chat template leaves the stop token {stop_token!r} outside the assistant span (message {j} renders "
                f"as {full[start:len(after)]!r:.120}): the model would never learn to stop; fix the template, set "
                f"data.stop_token, or data.template_check=false"
            )
        spans.append((start, end))
    return full, spans


def labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """A token is trained when it starts inside a span (a token merged across a boundary belongs to the left)."""
    labels = [IGNORE] * len(ids)
    k = 0
    for t, (s, _) in enumerate(offsets):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if spans[k][0] <= s < spans[k][1]:
            labels[t] = ids[t]
    return labels


# --------------------------------------------------------------------------------------------
# Encoders: rows of one format -> Examples
# --------------------------------------------------------------------------------------------
@dataclass
class Encoder:
    tokenizer: Any
    fmt: str
    seq_len: int
    text_field: str = "text"
    chat_field: str = "messages"
    stop_token: str | None = None
    strict_template: bool = True
    on_error: str = "raise"
    stats: EncodeStats = field(default_factory=EncodeStats)
    _offset: int = 0

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ConfigError(f"data.format={self.fmt!r} is not one of: auto, {', '.join(FORMATS)}")
        self.stop_token = self.stop_token or self.tokenizer.eos_token
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ConfigError("the tokenizer has no eos token; set model.tokenizer to one that has")

    def encode(self, rows: list[dict], offset: int = 0) -> list[Example]:
        """Examples of ``rows``; ``offset`` is the index of ``rows[0]`` in the source (for error messages)."""
        self.stats.rows += len(rows)
        self._offset = offset
        if self.fmt == "chat":
            return self._chat(list(enumerate(rows)))
        return {"prompt_completion": self._prompt_completion, "text": self._text}[self.fmt](rows)

    def _bad(self, index: int, err: RowError) -> None:
        if self.on_error == "raise":
            raise ConfigError(f"data row {index + self._offset}: {err}; fix the row or set data.on_error=skip") from None
        self.stats.skipped[err.kind] += 1

    # chat --------------------------------------------------------------------------------------
    def _chat(self, indexed_rows: list[tuple[int, dict]]) -> list[Example]:
        """Rows hold ``chat_field``, or ``__chat__ = (messages, trained turn indices)`` prepared by another format."""
        texts, spans = [], []
        for i, row in indexed_rows:
            try:
                messages, trained = row["__chat__"] if "__chat__" in row else validate_chat(row.get(self.chat_field))
                full, row_spans = chat_spans(self.tokenizer, messages, trained, self.stop_token, self.strict_template)
            except RowError as e:
                self._bad(i, e)
                continue
            texts.append(full)
            spans.append(row_spans)
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)  # the template adds bos itself
        return self._finish(
            [(ids, labels_from_spans(ids, offs, sp)) for ids, offs, sp in zip(enc["input_ids"], enc["offset_mapping"], spans)]
        )

    # prompt / completion ----------------------------------------------------------------------
    def _prompt_completion(self, rows: list[dict]) -> list[Example]:
        as_chat, plain = [], []
        for i, row in enumerate(rows):
            try:
                prompt, completion = row.get("prompt"), row.get("completion")
                if isinstance(prompt, list) or isinstance(completion, list):  # conversational: a chat trained on the completion
                    p, c = _messages(prompt, "prompt"), _messages(completion, "completion")
                    trained = [len(p) + j for j, m in enumerate(c) if m["role"] == "assistant"]
                    if not trained:
                        raise RowError("no assistant turn", "the completion holds no assistant turn to train on")
                    as_chat.append((i, {"__chat__": (p + c, trained)}))
                    continue
                prompt, completion = _text(row, "prompt"), _text(row, "completion")
                if not completion.strip():
                    raise RowError("empty completion", "'completion' is empty")
                plain.append((prompt, completion))
            except RowError as e:
                self._bad(i, e)
        examples = self._chat(as_chat) if as_chat else []
        if plain:
            prompts = self.tokenizer([p for p, _ in plain], add_special_tokens=True)["input_ids"]
            completions = self.tokenizer([c for _, c in plain], add_special_tokens=False)["input_ids"]
            pairs = []
            for p, c in zip(prompts, completions):
                c = c if c and c[-1] == self.eos_id else c + [self.eos_id]
                pairs.append((p + c, [IGNORE] * len(p) + c))
            examples += self._finish(pairs)
        return examples

    # text ------------------------------------------------------------------------------------
    def _text(self, rows: list[dict]) -> list[Example]:
        docs = []
        for i, row in enumerate(rows):
            try:
                text = _text(row, self.text_field)
                if not text.strip():
                    raise RowError("empty text", f"'{self.text_field}' is empty")
                docs.append(text)
            except RowError as e:
                self._bad(i, e)
        examples = []
        for ids in self.tokenizer(docs, add_special_tokens=True)["input_ids"] if docs else []:
            ids = ids + [self.eos_id]
            for s in range(0, len(ids), self.seq_len):
                window = ids[s : s + self.seq_len]
                if len(window) >= 2:  # a single token has nothing to predict
                    examples.append(Example(window, [IGNORE] + window[1:]))
        self.stats.windows += len(examples)
        return examples

    def _finish(self, pairs: list[tuple[list[int], list[int]]]) -> list[Example]:
        out = []
        for ids, labels in pairs:
            labels = [IGNORE] + labels[1:]
            if len(ids) > self.seq_len:
                ids, labels = ids[: self.seq_len], labels[: self.seq_len]
                if all(label == IGNORE for label in labels):
                    self.stats.dropped_too_long += 1
                    continue
                self.stats.truncated += 1
            out.append(Example(ids, labels))
        return out
