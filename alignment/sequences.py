"""Prompt+completion documents -> model rows, and per-token log-probs back out of the model.

DPO and GRPO both score *completions*: a document is ``prompt_ids + completion_ids`` and only the
completion tokens carry a loss. ``rows_from_documents`` lays documents into rows, packed several to
a row with restarting position ids when ``packing`` (attention stays inside a document, see
trainer/data/packing.py for why the model is called with position ids and no KV cache), or one per row.
``doc_index[r, t]`` names the document whose completion token sits at row ``r``, position ``t``
(-1 elsewhere), so per-token log-probs fold back into per-document sums with one ``index_add``.

Log-probs come from the final hidden states through the LM head a chunk of tokens at a time (whole
``[tokens, vocab]`` fp32 logits of a packed batch are gigabytes: with them a DPO step of 16 pairs x
512 tokens on SmolLM2's 49K vocabulary peaked at 12 GiB), and only at the positions that are scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.data.packing import pack_bfd
from trainer.losses import Head
from trainer.sft import final_hidden_states, output_head

DEFAULT_CHUNK = 1024  # tokens per LM-head chunk when the caller has no train.loss_chunk_size at hand


@dataclass(frozen=True)
class Document:
    prompt_ids: list[int]
    completion_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def rows_from_documents(docs: list[Document], seq_len: int, packing: bool, pad_id: int = 0,
                        static_shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids``, ``doc_index`` [R, T] with T the longest row (<= seq_len when packing).

    ``static_shape=(rows, width)`` pads the batch to exactly that shape (``train.compile``: compiled
    layers then see one shape and never recompile); padding rows score nothing (``doc_index`` -1).
    """
    rows = pack_bfd([len(d) for d in docs], seq_len) if packing else [[i] for i in range(len(docs))]
    rows.sort(key=min)  # deterministic row order: by first document
    width = max(sum(len(docs[i]) for i in row) for row in rows)
    n_rows = len(rows)
    if static_shape is not None:
        if n_rows > static_shape[0] or width > static_shape[1]:
            raise ValueError(f"a batch of {n_rows} rows x {width} tokens does not fit the static shape {static_shape} "
                             "(train.compile pads every batch to train.seq_len)")
        n_rows, width = static_shape
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    doc_index = torch.full((n_rows, width), -1, dtype=torch.long)
    position_ids = torch.arange(width).repeat(n_rows, 1)  # padding rows: one "document" of pads, never scored
    for r, row in enumerate(rows):
        t = 0
        for i in sorted(row):
            d = docs[i]
            ids = d.prompt_ids + d.completion_ids
            input_ids[r, t : t + len(ids)] = torch.tensor(ids)
            position_ids[r, t : t + len(ids)] = torch.arange(len(ids))
            doc_index[r, t + len(d.prompt_ids) : t + len(ids)] = i
            t += len(ids)
        position_ids[r, t:] = torch.arange(width - t)  # padding: its own "document", never attended to
    return {"input_ids": input_ids, "position_ids": position_ids, "doc_index": doc_index}


def token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                   with_entropy: bool = False, chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(input_ids[:, t] | input_ids[:, :t]) at every scored position t, 0 elsewhere; shape [R, T].

    Scored positions are the completion tokens (``doc_index >= 0``) when the batch has a doc index,
    else every t >= 1: prompts and padding cost no LM-head FLOPs. Logits are divided by
    ``temperature`` first so GRPO scores the distribution it sampled from. Entropy (no gradient) is
    returned for logging when asked. ``model`` may be wrapped (DDP, FSDP2, PEFT): its forward runs
    for the final hidden states only, and the LM head is applied ``chunk_size`` tokens at a time.
    """
    hidden = final_hidden_states(model, batch)
    scored = _scored_positions(batch)
    logp, entropy = chunked_token_logprobs(hidden[:, :-1][scored], batch["input_ids"][:, 1:][scored], output_head(model),
                                           chunk_size, temperature, with_entropy)
    return _to_rows(logp, scored), None if entropy is None else _to_rows(entropy, scored)


def chunked_token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk_size: int, temperature: float = 1.0,
                           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``targets [N]`` under ``head(hidden [N, H]) / temperature`` (and entropies), in fp32.

    At most ``chunk_size`` rows of ``[N, vocab]`` logits exist at once (``chunk_size <= 0``: all at once).
    With grad, each chunk runs under ``checkpoint``: the forward keeps only the chunk's hidden slice
    and the backward recomputes its logits, so the full fp32 logits never exist in either pass.
    """
    n = hidden.shape[0]
    if n == 0:  # keep the graph connected: DDP expects every parameter that took part to get a grad
        empty = hidden.sum() * 0.0 + hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.detach() if with_entropy else None
    step = n if chunk_size <= 0 else chunk_size
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for start in range(0, n, step):
        args = (hidden[start: start + step], targets[start: start + step], head, temperature, with_entropy)
        # use_reentrant=False: the head may be frozen or tied to the embeddings (see trainer/losses.py)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if recompute else _chunk_logprobs(*args))
    logp = torch.cat([p[0] for p in parts])
    return logp, torch.cat([p[1] for p in parts]) if with_entropy else None


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: Head, temperature: float,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(hidden).float()  # fp32 softmax even under bf16 autocast
    if temperature != 1.0:
        logits = logits / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = log_z - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


def _scored_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[R, T-1] bool: position t+1 is a token whose log-prob is wanted (its predictor sits at t)."""
    if "doc_index" in batch:
        return batch["doc_index"][:, 1:] >= 0
    return torch.ones_like(batch["input_ids"][:, 1:], dtype=torch.bool)


def _to_rows(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per-token values [N] back into [R, T] rows (0 at position 0 and at unscored positions), differentiably."""
    mask = F.pad(scored, (1, 0), value=False)
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def sum_by_document(per_token: torch.Tensor, doc_index: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Sum of ``per_token`` over each document's completion tokens -> [num_docs]."""
    mask = doc_index >= 0
    out = per_token.new_zeros(num_docs)
    return out.index_add(0, doc_index[mask], per_token[mask])


def completion_lengths(doc_index: torch.Tensor, num_docs: int) -> torch.Tensor:
    return torch.bincount(doc_index[doc_index >= 0], minlength=num_docs)
