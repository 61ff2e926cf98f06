"""The engine core: requests in, one scheduled forward + sampling per ``step()``, outputs out."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import count

import torch

from engine.config import EngineConfig
from engine.loader import load_named_tensors, materialize_gguf
from engine.model import ModelArgs
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampler import sample, top_logprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import Batch, Scheduler
from engine.sequence import Sequence

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # exact fp32 on CPU (bf16 matmuls are slow there), bf16 on GPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, model: str, dtype: str | torch.dtype = "auto", tokenizer: str | None = None,
                 device: str | None = None, skip_tokenizer_init: bool = False, **engine_options):
        from transformers import AutoTokenizer

        from trainer.models import resolve_model_path

        self.config = EngineConfig(**engine_options)
        self.config.check(None)
        path = materialize_gguf(model) if str(model).endswith(".gguf") else resolve_model_path(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        args = ModelArgs.from_hf_dir(path)
        self.max_model_len = self.config.max_model_len or args.max_position_embeddings
        if args.sliding_window:  # no sliding-window attention: keep every sequence inside the window
            self.max_model_len = min(self.max_model_len, args.sliding_window)
        self.runner = ModelRunner(path, self.config, self.dtype, self.device, self.max_model_len)
        # a sequence must always fit in the whole cache, or preemption could never make room for it
        self.max_model_len = min(self.max_model_len, self.runner.num_blocks * self.config.block_size)
        self.scheduler = Scheduler(self.config, self.runner.num_blocks)
        # skip_tokenizer_init: token ids in, token ids out (benchmarks of random-init models have no tokenizer)
        self.tokenizer = None if skip_tokenizer_init else AutoTokenizer.from_pretrained(tokenizer or path)
        tokenizer_eos = {getattr(self.tokenizer, "eos_token_id", None)} - {None}
        self.eos_token_ids = sorted(set(args.eos_token_ids) | tokenizer_eos)
        self.vocab_size = args.vocab_size
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator(self.device).manual_seed(self.config.seed)
        self._ids = count()

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    adapter_id: int = 0) -> str:
        """Queue a request; a prompt that can never run raises ValueError naming the problem."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        if self.tokenizer is None and (text is not None or params.stop):
            raise ValueError("text prompts and stop strings need a tokenizer (the engine was built with skip_tokenizer_init)")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate_prompt(ids)
        seqs = [Sequence(request_id, i, ids, params, None if params.seed is None else params.seed + i,
                         self.config.block_size, adapter_id) for i in range(params.n)]
        seqs[0].forks = seqs[1:]  # siblings start once the first has the prompt in cache
        self.requests[request_id] = Request(request_id, text, ids, seqs)
        self.scheduler.add(seqs[0])
        return request_id

    def _validate_prompt(self, ids: list[int]) -> None:
        c = self.config
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len={self.max_model_len} leaves no room to generate")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size})")
        if -(-(len(ids) + 1) // c.block_size) > self.runner.num_blocks:
            raise ValueError(f"prompt has {len(ids)} tokens but the KV cache holds only {self.runner.num_blocks * c.block_size}")
        if not c.enable_chunked_prefill and len(ids) > c.max_num_batched_tokens:
            raise ValueError(f"prompt has {len(ids)} tokens > max_num_batched_tokens={c.max_num_batched_tokens} "
                             "and chunked prefill is off")

    def abort(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id).seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def is_finished(self, request_id: str) -> bool:
        return self.requests[request_id].finished

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- the step
    def step(self) -> list[str]:
        """Run one scheduled forward; returns the ids of requests that changed."""
        # The engine's numerics are its own dtype's: a caller's autocast (the trainer's, during GRPO or
        # distillation evaluation) must not recast its matmuls or its KV writes.
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            return self._step()

    def _step(self) -> list[str]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("the scheduler could not schedule any sequence (KV cache too small for the waiting prompt)")
        steps = self._plan_decode_steps(batch.seqs) if batch.is_decode else 1
        if steps > 1:
            return self._multi_step_decode(batch, steps)
        hidden = self.runner.forward(batch)
        sample_seqs, sample_rows, prompt_jobs = [], [], []
        row = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            if seq.wants_prompt_logprobs:
                end = min(start + n, seq.num_prompt_tokens - 1)  # logits at p score prompt token p + 1
                if start == 0:
                    seq.partial_prompt_logprobs = []
                if end > start:
                    prompt_jobs.append((seq, row, start, end))
            if start + n == len(seq):
                sample_seqs.append(seq)
                sample_rows.append(row + n - 1)
            row += n
        self.scheduler.advance(batch)
        for job in prompt_jobs:
            self._prompt_logprobs(hidden, *job)
        for seq in batch.seqs:
            if seq.wants_prompt_logprobs and seq.num_computed_tokens >= seq.num_prompt_tokens:
                seq.prompt_logprobs = [None] + seq.partial_prompt_logprobs
        if sample_seqs:
            self._sample(hidden, sample_seqs, sample_rows)
        self._launch_ahead()
        return sorted({s.request_id for s in batch.seqs})

    def _multi_step_decode(self, batch: Batch, steps: int) -> list[str]:
        """``steps`` greedy decode steps of the batch in one go (``engine.decode_steps``): the runner
        feeds each step's argmax to the next on the device; here every step is accounted for in order,
        as ``steps`` single steps would be. A sequence that stops at step i ignores the rest (their K/V
        went to positions past its end, in its own blocks, which it frees)."""
        tokens = self.runner.decode_steps(batch.seqs, steps, next_steps=self._plan_next_round(batch.seqs, steps)).tolist()
        for j, seq in enumerate(batch.seqs):
            self._accept_round(seq, [step_tokens[j] for step_tokens in tokens])
        self._launch_ahead()
        return sorted({s.request_id for s in batch.seqs})

    def _accept_round(self, seq: Sequence, tokens: list[int]) -> None:
        """A multi-step round's tokens for one sequence, up to and including the first that stops it.
        The GPU idles while the host books a round, so without stop strings (which need the text after
        every token) the stop is found first and the tokens are booked at once, not step by step."""
        if seq.params.stop:
            for token in tokens:
                if seq.is_finished:
                    return
                self.scheduler.advance(Batch([seq], [1]))
                seq.token_ids.append(token)
                self._check_stop(seq, token)
            return
        take = self._tokens_until_stop(seq, tokens)
        self.scheduler.advance(Batch([seq], [take]))  # each step computed the K/V of its input token
        seq.token_ids.extend(tokens[:take])
        self._check_stop(seq, tokens[take - 1])

    def _tokens_until_stop(self, seq: Sequence, tokens: list[int]) -> int:
        """How many of ``tokens`` a sequence without stop strings takes: through the first one on which
        ``_check_stop`` would finish it, else all."""
        p = seq.params
        outputs, length = seq.num_output_tokens, len(seq)
        for i, token in enumerate(tokens, 1):
            if self._stop_token(p, outputs + i, token) or self._at_length(p, outputs + i, length + i):
                return i
        return len(tokens)

    def _plan_decode_steps(self, seqs: list[Sequence]) -> int:
        """How many greedy steps the decode of ``seqs`` runs back to back (1: an ordinary step), with the
        blocks for all of them allocated. More than one only when every sequence is plain greedy (the
        device's argmax is its token), nothing waits to be admitted (it would wait the extra steps),
        and the free blocks cover every sequence's next positions; never past the longest remaining
        ``max_tokens`` or any sequence's ``max_model_len``."""
        if self.config.decode_steps <= 1 or self.scheduler.waiting or not all(self._plain_greedy(s) and not s.forks for s in seqs):
            return 1
        steps = self._round_length(seqs)
        if steps <= 1 or not self._allocate_ahead(seqs, steps - 1):  # positions up to len + steps - 2
            return 1
        return steps

    def _plan_next_round(self, seqs: list[Sequence], steps: int) -> int:
        """Steps of the round after this one that the runner may queue before this round's tokens are
        read (``engine.pipeline_rounds``; 0: none): the round ``_plan_decode_steps`` will plan if no
        sequence stops in this one, with its blocks allocated now — through the position after it,
        whose slot the round's last step computes on the device for the round after."""
        if not (self.config.pipeline_rounds and self.runner.graphs) or self.scheduler.waiting:
            return 0
        nxt = self._round_length(seqs, ahead=steps)
        if nxt < 2 or not self._allocate_ahead(seqs, steps + nxt):
            return 0
        return nxt

    def _round_length(self, seqs: list[Sequence], ahead: int = 0) -> int:
        """Steps of a multi-step round of ``seqs`` that starts ``ahead`` tokens from now: at most
        ``decode_steps``, never past the longest remaining ``max_tokens`` or any sequence's ``max_model_len``."""
        return min(self.config.decode_steps, self.runner.max_decode_steps,
                   max(s.params.max_tokens - s.num_output_tokens - ahead for s in seqs),
                   min(self.max_model_len - len(s) - ahead + 1 for s in seqs))

    def _allocate_ahead(self, seqs: list[Sequence], extra: int) -> bool:
        """Grow every sequence's blocks to hold ``len(seq) + extra`` tokens — all of them, or none (False)
        when the free blocks do not cover them."""
        bm = self.scheduler.block_manager
        need = sum(max(0, s.num_blocks_for(len(s) + extra) - len(s.block_table)) for s in seqs)
        if need > bm.num_free_blocks:
            return False
        for s in seqs:
            bm.allocate(s, len(s) + extra)
        return True

    @staticmethod
    def _plain_greedy(seq: Sequence) -> bool:
        """The sequence's next token is the argmax of its logits: greedy, no penalties or logprobs,
        past ``min_tokens`` (no EOS masking), no prompt logprobs still to compute."""
        p = seq.params
        return (p.greedy and not p.needs_penalties and p.logprobs is None and seq.num_output_tokens >= p.min_tokens
                and not seq.wants_prompt_logprobs)

    def _launch_ahead(self) -> None:
        """When the next step is sure to be a decode of exactly the running sequences (nothing waits
        to be admitted, every running sequence has its one new token), queue its replay now: the GPU
        runs it while the caller reads outputs and the scheduler prepares the same batch. A multi-step
        decode's blocks are allocated first, so the queued replay carries the complete block tables."""
        sched = self.scheduler
        if sched.waiting or not sched.running:
            return
        seqs = list(sched.running)
        if any(s.num_uncomputed_tokens != 1 or s.wants_prompt_logprobs for s in seqs):
            return
        if self.runner.graphs:
            self._plan_decode_steps(seqs)
        self.runner.launch_ahead(seqs)

    def _prompt_logprobs(self, hidden: torch.Tensor, seq: Sequence, row: int, start: int, end: int) -> None:
        logprobs = self.runner.logits(hidden, list(range(row, row + end - start))).log_softmax(-1)
        targets = torch.tensor(seq.token_ids[start + 1:end + 1], device=logprobs.device)
        seq.partial_prompt_logprobs += top_logprobs(logprobs, targets, seq.params.prompt_logprobs)

    def _sample(self, hidden: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        want = [s.params.logprobs is not None for s in seqs]
        raw = None
        tokens = self._device_greedy_tokens(hidden, seqs, rows) if not any(want) else None
        if tokens is None:
            logits = self.runner.logits(hidden, rows)
            raw = logits.log_softmax(-1) if any(want) else None  # before the sampler edits logits in place
            tokens = sample(logits, seqs, self.eos_token_ids, self.generator)
        if raw is not None:
            n_top = max(s.params.logprobs or 0 for s in seqs)
            entries = top_logprobs(raw, torch.tensor(tokens, device=raw.device), n_top)
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.forks and seq.num_output_tokens == 0:
                for child in seq.forks:
                    child.prompt_logprobs = seq.prompt_logprobs
                    self.scheduler.fork(seq, child)
                seq.forks = []
            seq.token_ids.append(token)
            if want[i]:
                entry = dict(list(entries[i].items())[:1 + seq.params.logprobs])
                seq.output_logprobs.append(entry)
                seq.cumulative_logprob += entry[token]
            self._check_stop(seq, token)

    def _device_greedy_tokens(self, hidden: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> list[int] | None:
        """Greedy tokens a replayed decode graph already took (its argmax): one read, the step's only
        sync. None when a row needs the sampler (non-greedy, penalties, min_tokens masking)."""
        if not all(self._plain_greedy(s) for s in seqs):
            return None
        tokens = self.runner.greedy_tokens(hidden, rows)
        return None if tokens is None else tokens.tolist()

    def _stop_token(self, p, num_outputs: int, token: int) -> bool:
        """``token``, the ``num_outputs``-th output, ends the sequence: a stop token or EOS, once
        ``min_tokens`` are out. One rule for ``_check_stop`` and for multi-step rounds."""
        return num_outputs >= p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids))

    def _at_length(self, p, num_outputs: int, length: int) -> bool:
        """The sequence has its ``max_tokens`` outputs or fills ``max_model_len``."""
        return num_outputs >= p.max_tokens or length >= self.max_model_len

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if self._stop_token(p, seq.num_output_tokens, token):  # stop_reason: the stop token's id, None for EOS
            return self.scheduler.finish(seq, "stop", token if token in p.stop_token_ids else None)
        if p.stop and seq.num_output_tokens >= p.min_tokens:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=p.skip_special_tokens)
            hits = [(text.find(s), s) for s in p.stop if s in text]
            if hits:
                at, stop = min(hits)
                seq.text = text[:at + len(stop)] if p.include_stop_str_in_output else text[:at]
                return self.scheduler.finish(seq, "stop", stop)
        if self._at_length(p, seq.num_output_tokens, len(seq)):
            self.scheduler.finish(seq, "length")

    # ---------------------------------------------------------------- outputs
    def output(self, request_id: str) -> RequestOutput:
        """The request's current state; a finished request is forgotten once read."""
        req = self.requests[request_id]
        outputs = []
        for seq in req.seqs:
            if seq.stop_reason in seq.params.stop:
                text = seq.text
            elif self.tokenizer is None:
                text = ""
            else:
                text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            ))
        if req.finished:
            del self.requests[request_id]
        return RequestOutput(request_id, req.prompt, list(req.prompt_token_ids), outputs,
                             req.seqs[0].prompt_logprobs, req.finished)

    def stats(self) -> dict[str, float]:
        return self.scheduler.stats()

    # ---------------------------------------------------------------- training hooks
    def update_weights(self, named_tensors) -> int:
        """Copy trainer tensors (HF or PEFT-merged names) into the model in place; returns how many."""
        if self.has_unfinished():
            raise RuntimeError("update_weights needs an idle engine: finish or abort the running requests first")
        items = named_tensors.items() if hasattr(named_tensors, "items") else named_tensors
        written = load_named_tensors(self.runner.model, items)
        self.scheduler.block_manager.reset_prefix_cache()  # cached KV came from the old weights
        return len(written)
