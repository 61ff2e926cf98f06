"""The teacher side of logit KD: final hidden states, an online frozen teacher, and the offline top-k cache.

Both models are run for their *final hidden states* (captured at the final norm, with the logits
cut to one position), because the [tokens, vocab] logits are made later, a chunk at a time, by
``distill.losses.chunked_kd_loss``.

The offline cache holds, for every trained position of every training example, the teacher's top-k
token ids (int32) and log-probs (fp16), made in one pass. Examples are found again inside packed
micro-batches by a hash of their tokens: documents in a packed row start where position ids
restart at 0, and ``trainer.data`` never splits an example across rows.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trainer.config import ConfigError
from trainer.sft import final_hidden_states, output_head

IGNORE = -100


# --------------------------------------------------------------------------------------------
# Hidden states and trained positions
# --------------------------------------------------------------------------------------------
def trained_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T-1], targets [N]): positions t whose next token t+1 is trained, and those tokens.

    A position never predicts across a packed document boundary (where position ids restart), even
    if a data source trains a document's first token.
    """
    nxt = batch["labels"][:, 1:]
    mask = (nxt != IGNORE) & (batch["position_ids"][:, 1:] != 0)
    return mask, nxt[mask]


# --------------------------------------------------------------------------------------------
# Online teacher
# --------------------------------------------------------------------------------------------
def load_teacher(cfg, device: torch.device) -> torch.nn.Module:
    """The frozen teacher: bf16 on GPU under bf16 runs, fp32 otherwise; NF4 when distill.teacher_quant=nf4."""
    from transformers import AutoModelForCausalLM

    from trainer.models import bnb_config, resolve_model_path

    dtype = torch.bfloat16 if device.type == "cuda" and cfg.precision != "fp32" else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": cfg.model.attn_implementation}
    if cfg.distill.teacher_quant == "nf4":
        kwargs.update(quantization_config=bnb_config(cfg), device_map={"": device})
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.distill.teacher), **kwargs)
    if cfg.distill.teacher_quant != "nf4":
        teacher.to(device)
    return teacher.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Offline top-k cache
# --------------------------------------------------------------------------------------------
def example_key(input_ids: Sequence[int]) -> int:
    digest = hashlib.blake2b(np.asarray(input_ids, dtype=np.int32).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class TopKCache:
    """Teacher top-k log-probs per trained position, for a fixed list of examples."""

    def __init__(self, ids: torch.Tensor, logp: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, meta: dict[str, str]):
        self.ids, self.logp, self.offsets, self.meta = ids, logp, offsets, meta
        self.index = {int(k): i for i, k in enumerate(keys.tolist())}

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        keys = torch.tensor(sorted(self.index, key=self.index.get), dtype=torch.int64)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"ids": self.ids, "logp": self.logp, "offsets": self.offsets, "keys": keys}, str(tmp), metadata=self.meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "TopKCache":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in ("ids", "logp", "offsets", "keys")}
            meta = f.metadata() or {}
        return cls(tensors["ids"], tensors["logp"], tensors["offsets"], tensors["keys"], meta)

    def lookup(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (ids, log-probs) for the batch's trained positions, in ``trained_positions`` order."""
        ids, logp = [], []
        mask, _ = trained_positions(batch)
        for row in range(batch["input_ids"].shape[0]):
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
            for s, e in zip(starts[:-1], starts[1:]):
                if not mask[row, s : e - 1].any():
                    continue  # padding, or a document without trained tokens
                key = example_key(batch["input_ids"][row, s:e].tolist())
                if key not in self.index:
                    raise RuntimeError(
                        "a training example is missing from the teacher top-k cache (the data changed since it was built); "
                        "delete distill.cache_path to rebuild it"
                    )
                i = self.index[key]
                lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
                ids.append(self.ids[lo:hi])
                logp.append(self.logp[lo:hi])
        return torch.cat(ids), torch.cat(logp)


@torch.no_grad()
def build_topk_cache(teacher: torch.nn.Module, examples: Sequence, k: int, device: torch.device, meta: dict[str, str],
                     tokens_per_batch: int = 4096, chunk_size: int = 512, progress=None) -> TopKCache:
    """One teacher pass over ``examples`` (one per row, length-sorted to limit padding), keeping top-k log-probs."""
    from trainer.data import collate

    vocab = output_head(teacher).weight.shape[0]
    if k > vocab:
        raise ConfigError(f"distill.topk={k} exceeds the teacher's vocabulary ({vocab})")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    per_example: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    start = 0
    while start < len(order):
        width = len(examples[order[start]])
        end = start
        while end < len(order) and (end - start + 1) * len(examples[order[end]]) <= max(tokens_per_batch, width):
            end += 1
        group = order[start:end]
        batch = {k_: v.to(device) for k_, v in collate([[examples[i]] for i in group]).items()}
        hidden = final_hidden_states(teacher, batch)[:, :-1]
        mask, _ = trained_positions(batch)
        head = output_head(teacher)
        for row, i in enumerate(group):
            h = hidden[row][mask[row]]
            parts = [torch.log_softmax(head(h[c : c + chunk_size]).float(), -1).topk(k, -1) for c in range(0, h.shape[0], chunk_size)]
            top_logp = torch.cat([p.values for p in parts]) if parts else torch.zeros(0, k)
            top_ids = torch.cat([p.indices for p in parts]) if parts else torch.zeros(0, k, dtype=torch.long)
            per_example[i] = (top_ids.to(torch.int32).cpu(), top_logp.to(torch.float16).cpu())
        if progress is not None:
            progress(len(group))
        start = end
    counts = [per_example[i][0].shape[0] for i in range(len(examples))]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int64)
    ids = torch.cat([per_example[i][0] for i in range(len(examples))])
    logp = torch.cat([per_example[i][1] for i in range(len(examples))])
    keys = torch.tensor([example_key(e.input_ids) for e in examples], dtype=torch.int64)
    return TopKCache(ids, logp, offsets, keys, {**meta, "k": str(k)})
