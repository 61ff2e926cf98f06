"""What ``generate`` returns: vLLM-shaped request outputs."""
from __future__ import annotations

from dataclasses import dataclass, field

# one dict per position: token id -> logprob (the chosen token plus the top-n)
Logprobs = list[dict[int, float]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: Logprobs | None = None
    finish_reason: str | None = None  # stop | length | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None  # None for the first prompt token
    finished: bool = False
    error: str | None = None  # set instead of raising, so one bad request never fails a batch
