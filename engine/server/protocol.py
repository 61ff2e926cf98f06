"""OpenAI request bodies (pydantic), the error body, and the response/chunk builders.

Requests are validated strictly on type (a wrong type is a 400, never a 500) and loosely on
membership: unknown fields are ignored, as OpenAI-compatible servers do, so clients that send
extras keep working. Responses are plain dicts in OpenAI's shapes.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams


class APIError(Exception):
    """An error the client caused (or may retry), rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "BadRequestError", param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code if code is not None else status
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints, including vLLM's extras (top_k, min_p, ...)."""
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
                stop=self.stop, stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos, logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e).removeprefix("SamplingParams: ")) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False  # echoing the prompt back is not supported


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) or self.content is None else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text or ""}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True


class LoadLoRARequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)


# ------------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(request_id: str, obj: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": choices, **extra}


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, float]], top: int, offset: int) -> dict:
    """The legacy completions shape: parallel lists of tokens, their logprobs, top alternatives, offsets."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e[t] for t, e in zip(token_ids, entries)],
        "top_logprobs": [{tokenizer.decode([k]): v for k, v in _top(e, top)} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, float]], top: int) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [dict(item(t, e[t]), top_logprobs=[item(k, v) for k, v in _top(e, top)])
                        for t, e in zip(token_ids, entries)]}


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def finish_reason(out: CompletionOutput) -> str | None:
    # the engine says "abort" for requests it dropped; OpenAI clients know only stop/length
    return None if out.finish_reason is None else ("length" if out.finish_reason == "length" else "stop")
