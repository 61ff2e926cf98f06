"""Prompt+completion documents -> model rows, and per-token log-probs back out of the model.

DPO and GRPO both score *completions*: a document is ``prompt_ids + completion_ids`` and only the
completion tokens carry a loss. ``rows_from_documents`` lays documents into rows, packed several to
a row with restarting position ids when ``packing`` (attention stays inside a document, see
trainer/data/packing.py for why the model must be called with ``model_inputs``), or one per row.
``doc_index[r, t]`` names the document whose completion token sits at row ``r``, position ``t``
(-1 elsewhere), so per-token log-probs fold back into per-document sums with one ``index_add``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.data.packing import model_inputs, pack_bfd


@dataclass(frozen=True)
class Document:
    prompt_ids: list[int]
    completion_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def rows_from_documents(docs: list[Document], seq_len: int, packing: bool, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids``, ``doc_index`` [R, T] with T the longest row (<= seq_len when packing)."""
    rows = pack_bfd([len(d) for d in docs], seq_len) if packing else [[i] for i in range(len(docs))]
    rows.sort(key=min)  # deterministic row order: by first document
    width = max(sum(len(docs[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    doc_index = torch.full((len(rows), width), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
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
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(input_ids[:, t] | input_ids[:, :t]) at every position t >= 1 (0 at t = 0), shape [R, T].

    Logits are divided by ``temperature`` first so GRPO scores the distribution it sampled from.
    Entropy (no gradient) is returned for logging when asked.
    """
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch["input_ids"][:, 1:]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = F.pad(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), (1, 0))
    return F.pad(logp, (1, 0)), entropy


def sum_by_document(per_token: torch.Tensor, doc_index: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Sum of ``per_token`` over each document's completion tokens -> [num_docs]."""
    mask = doc_index >= 0
    out = per_token.new_zeros(num_docs)
    return out.index_add(0, doc_index[mask], per_token[mask])


def completion_lengths(doc_index: torch.Tensor, num_docs: int) -> torch.Tensor:
    return torch.bincount(doc_index[doc_index >= 0], minlength=num_docs)
