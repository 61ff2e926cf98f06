"""The offline API, shaped like vLLM's ``LLM``: generate, chat, stream, score, update_weights."""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence as Seq

import torch

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    """``LLM(model="smollm2-135m-instruct")`` or any Llama-family HF directory; engine options
    (``block_size``, ``num_blocks``, ``max_num_seqs``, ``enable_prefix_caching``...) are EngineConfig fields."""

    def __init__(self, model: str, dtype: str | torch.dtype = "auto", tokenizer: str | None = None,
                 device: str | None = None, skip_tokenizer_init: bool = False, **engine_options):
        self.engine = LLMEngine(model, dtype=dtype, tokenizer=tokenizer, device=device,
                                skip_tokenizer_init=skip_tokenizer_init, **engine_options)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts (text, token ids, or ``{"prompt_token_ids": [...]}``) to completion, in order.
        A request that cannot run comes back with ``.error`` set; the others still run."""
        final: dict[str, RequestOutput] = {}
        for out in self._run(prompts, sampling_params, use_tqdm, stream=False):
            final[out.request_id] = out
        return [final[i] for i in sorted(final, key=int)]

    def stream(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """Yield each request's cumulative output every step it advances (the last one has ``finished``)."""
        yield from self._run(prompts, sampling_params, use_tqdm=False, stream=True)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(ids, sampling_params, use_tqdm)
        for out, text in zip(outputs, prompts):
            out.prompt = text
        return outputs

    def score(self, prompts: Prompt | Seq[Prompt]) -> list[list[float | None]]:
        """Per-token log-probabilities of each prompt under the model (None for the first token)."""
        outputs = self.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
        scores = []
        for out in outputs:
            if out.error:
                raise ValueError(f"score: {out.error}")
            scores.append([None if lp is None else lp[t] for lp, t in zip(out.prompt_logprobs, out.prompt_token_ids)])
        return scores

    def update_weights(self, named_tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Take new weights from the trainer in place (HF names, PEFT-merged or wrapped names accepted)."""
        return self.engine.update_weights(named_tensors)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    # ----------------------------------------------------------------
    def _run(self, prompts, sampling_params, use_tqdm: bool, stream: bool) -> Iterator[RequestOutput]:
        """Add the requests and step until all finish, yielding finished outputs (and, when streaming,
        every intermediate one: building outputs copies token lists, so it is skipped otherwise)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        if engine.requests:
            raise RuntimeError("the engine already has requests in flight; one generate/stream at a time")
        ids = [str(i) for i in range(len(prompts))]  # generate() returns outputs in this order
        pending = set()
        for request_id, prompt, p in zip(ids, prompts, params):
            if isinstance(prompt, dict):
                prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
            try:
                engine.add_request(prompt, p, request_id=request_id)
                pending.add(request_id)
            except ValueError as e:
                yield RequestOutput(request_id, prompt if isinstance(prompt, str) else None,
                                    [] if isinstance(prompt, str) else list(prompt or []), finished=True, error=str(e))
        progress = _progress(len(pending), use_tqdm)
        try:
            while engine.has_unfinished():
                for request_id in engine.step():
                    if request_id not in pending:
                        continue
                    if engine.is_finished(request_id):
                        pending.discard(request_id)
                        progress.update(1)
                        yield engine.output(request_id)
                    elif stream:
                        yield engine.output(request_id)
        finally:  # a consumer that stops streaming early must not leave requests holding KV blocks
            for request_id in pending:
                engine.abort(request_id)
            progress.close()


class _NoProgress:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="req")
