"""Logits -> next tokens: penalties, min-tokens masking, temperature, top-k/top-p/min-p, sampling.

Processing follows vLLM's order. Reported logprobs are those of the model's raw distribution.
Sampling is ``argmax(probs / E)`` with E ~ Exp(1) per token (equivalent to drawing from probs, no
sync-heavy multinomial). A seeded request draws E from its own generator, so its tokens never depend
on the rest of the batch; unseeded rows share one batched draw.
"""
from __future__ import annotations

import torch

from engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.needs_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:  # CTRL/HF: over prompt and output tokens
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        outputs = seq.output_token_ids
        if outputs and (p.presence_penalty or p.frequency_penalty):  # OpenAI: over generated tokens only
            counts = torch.bincount(torch.tensor(outputs, device=logits.device), minlength=row.numel()).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def mask_min_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> torch.Tensor:
    for i, seq in enumerate(seqs):
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_ids)
            if banned:
                logits[i, banned] = float("-inf")
    return logits


def filter_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Per-row filters on temperature-scaled logits; top_k 0 = off, top_p 1 = off, min_p 0 = off."""
    vocab = logits.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)
        drop = ranks[None, :] >= k[:, None]
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked before it already reach top_p (always keep the first)
        # (rows without top_p skip this: an fp32 cumsum over a large vocabulary can round up to 1 early)
        drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int], generator: torch.Generator) -> list[int]:
    """logits: [n, vocab] fp32 (modified in place) -> one token id per sequence."""
    if any(s.params.needs_penalties for s in seqs):
        logits = apply_penalties(logits, seqs)
    if any(s.num_output_tokens < s.params.min_tokens for s in seqs):
        logits = mask_min_tokens(logits, seqs, eos_ids)
    greedy = [s.params.greedy for s in seqs]
    if all(greedy):
        return logits.argmax(dim=-1).tolist()
    dev = logits.device
    temperature = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=dev)
    scaled = logits / temperature[:, None]
    if any(s.params.top_k > 0 or s.params.top_p < 1 or s.params.min_p > 0 for s in seqs):  # known on the host: no sync
        scaled = filter_top_k_top_p_min_p(
            scaled,
            torch.tensor([s.params.top_k for s in seqs], device=dev),
            torch.tensor([s.params.top_p for s in seqs], device=dev),
            torch.tensor([s.params.min_p for s in seqs], device=dev),
        )
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for i, s in enumerate(seqs):
        if s.generator is not None:  # seeded: CPU generator, so results match across devices and batches
            noise[i] = torch.empty(probs.shape[-1]).exponential_(generator=s.generator).to(dev)
    sampled = (probs / noise).argmax(dim=-1)
    greedy_t = torch.tensor(greedy, device=dev)
    return torch.where(greedy_t, logits.argmax(dim=-1), sampled).tolist()


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, n: int) -> list[dict[int, float]]:
    """logprobs: [rows, vocab]; chosen: [rows] -> per row {chosen: lp, top-n ids: lp}."""
    picked = logprobs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    out = [{c: p} for c, p in zip(chosen.tolist(), picked)]
    if n > 0:
        values, ids = logprobs.topk(n, dim=-1)
        for row, vs, ts in zip(out, values.tolist(), ids.tolist()):
            for t, v in zip(ts, vs):
                row.setdefault(t, v)
    return out
