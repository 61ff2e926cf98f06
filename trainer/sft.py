"""Supervised fine-tuning: next-token cross-entropy on the trained (label != -100) tokens.

The model is run for its final hidden states only (``logits_to_keep=1`` asks HF for one position's
logits instead of all of them; a hook on the final norm reads the hidden states); the loss projects those hidden states through the LM head chunk by
chunk (``trainer.losses``), so the ``[tokens, vocab]`` logits never exist at once. Calling the
wrapped model's own forward keeps DDP/FSDP hooks and PEFT adapters in the path.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from trainer.losses import causal_lm_loss_sum, count_trained_tokens
from trainer.methods import LossOutput, Method, Run


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The final norm of an HF causal LM, plain, PEFT or inside a DDP/DeepSpeed ``.module`` (None if it has none)."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return getattr(decoder, "norm", None)


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head module of a possibly wrapped model (called as a module so sharded strategies gather it)."""
    return getattr(model, "module", model).get_output_embeddings()


def final_hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The normed last hidden state ``[B, T, H]`` of any HF causal LM (plain, PEFT or wrapped).

    Read by a forward hook on the final norm, not with ``output_hidden_states=True``: that flag makes
    transformers hook every decoder layer and attention module with output collectors that read a
    ``ContextVar``, which torch.compile cannot trace (a graph break inside every compiled layer), and
    keeps every layer's output alive until the loss is taken.
    """
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    norm = final_norm(model)
    if norm is None:  # an architecture without a ``norm`` attribute: HF's own capture
        return model(**kwargs, output_hidden_states=True).hidden_states[-1]
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return captured[-1]


def lm_loss(model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> LossOutput:
    """Summed next-token CE of a micro-batch (shared by SFT, evaluation and distillation's CE term)."""
    hidden = final_hidden_states(model, batch)
    loss_sum, _ = causal_lm_loss_sum(hidden, batch["labels"], head, chunk_size)
    return LossOutput(loss_sum=loss_sum, num_tokens=int(batch["input_ids"].numel()))


class SFTMethod(Method):
    name = "sft"

    def setup(self, run: Run) -> None:
        from trainer.data import PackedLoader

        cfg, s = self.cfg, run.strategy
        self.run = run
        self.train_examples, self.val_examples = self.build_data(run.tokenizer)
        self.pad_id = run.tokenizer.pad_token_id or 0
        self.loader = PackedLoader.for_run(self.train_examples, cfg, s.rank, s.world_size, self.pad_id)
        # the head is called as a module (not through .weight) so sharded strategies can gather it
        self.head = run.unwrapped.get_output_embeddings()

    def build_data(self, tokenizer) -> tuple[list, list]:
        """Train and validation ``Example``s (tests override this to feed hand-built examples)."""
        from trainer.data import build_examples

        return build_examples(self.cfg, tokenizer)

    def next_batch(self) -> dict[str, Any]:
        return next(self.loader)

    def normalizer(self, batch: dict[str, Any]) -> float:
        return float(count_trained_tokens(batch["labels"]))

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        return lm_loss(model, self.head, batch, self.cfg.train.loss_chunk_size)

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        """Token-weighted CE over the validation set (each example once, split over ranks)."""
        from trainer.data import iter_eval_batches

        if not self.val_examples:
            return {}
        cfg, s = self.cfg, run.strategy
        batches = list(iter_eval_batches(self.val_examples, cfg.train.micro_batch_size, cfg.train.seq_len, cfg.data.packing,
                                         rank=s.rank, world_size=s.world_size, pad_id=self.pad_id))
        if cfg.eval.max_batches:
            batches = batches[: cfg.eval.max_batches]
        if s.lockstep_forward:  # sharded params: every forward is a collective, so all ranks run the same count
            batches = batches[: int(s.all_reduce_min(len(batches)))]
        total, tokens = torch.zeros((), dtype=torch.float64), 0
        was_training = run.model.training
        run.model.eval()
        for batch in batches:
            batch = {k: v.to(run.device) for k, v in batch.items()}
            out = self.loss(run.model, batch)  # the trainer runs evaluate() under its autocast
            total += out.loss_sum.double().cpu()
            tokens += count_trained_tokens(batch["labels"])
        run.model.train(was_training)
        # reduce after the loop: ranks may hold a different number of batches
        total, tokens = float(s.all_reduce_sum(total)), float(s.all_reduce_sum(float(tokens)))
        if tokens == 0:
            return {}
        val_loss = total / tokens
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
