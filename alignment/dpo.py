"""DPO and its family (IPO, hinge, robust/cDPO, SimPO, ORPO) as a ``Method`` of the one training loop.

A micro-batch is ``train.micro_batch_size`` preference pairs; their 2B documents (prompt+chosen,
prompt+rejected) are packed into rows with restarting position ids (``data.packing``) or padded one
per row. The loss sum is over pairs and the normalizer is the pair count, so accumulation and
sharding leave the loss unchanged (trainer/methods.py). Pairs are sharded over ranks.

Reference log-probs (``dpo.reference``): a frozen copy, the LoRA-disabled base, or ``precomputed``
once at setup (cached in ``<output_dir>/ref_logps.pt``, reused on resume when the data matches)
after which no reference model is kept at all. Reference-free losses build none.
"""
from __future__ import annotations

import gc
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch

from alignment import losses as L
from alignment.pairs import BUILTIN_PAIRS, PairEncoder, encode_pairs, load_pair_rows, save_rows
from alignment.reference import Reference, resolve_kind
from alignment.report import first_last, plot_curves, print_summary, series
from alignment.sequences import rows_from_documents, sum_by_document, token_logprobs
from trainer.methods import LossOutput, Method, Run
from trainer.metrics import read_history


class DPOMethod(Method):
    name = "dpo"
    headline_metrics = ("accuracy", "margin")

    def setup(self, run: Run) -> None:
        cfg, strategy = self.cfg, run.strategy
        self.run, self.device = run, run.device
        self.pad_id = run.tokenizer.pad_token_id or 0
        rows, generated = self._rows(run)
        encoder = PairEncoder(run.tokenizer, cfg.dpo.max_prompt_len, cfg.train.seq_len)
        pairs, stats = encode_pairs(rows, encoder, cfg.data.source, cfg.data.on_error)
        random.Random(cfg.seed).shuffle(pairs)
        n_val = int(len(pairs) * cfg.data.val_fraction)
        self.val_all, train_all = pairs[:n_val], pairs[n_val:]
        rank, world = strategy.rank, strategy.world_size
        self.train, self.val = train_all[rank::world], self.val_all[rank::world]
        if not self.train:
            raise ValueError(f"rank {rank} has no training pairs ({len(train_all)} pairs over {world} ranks)")
        self.reference, self.ref_cache = None, None
        if L.needs_reference(cfg.dpo.loss):
            kind = cfg.dpo.reference
            if kind == "precomputed":
                self.ref_cache = self._precomputed(run)
            else:
                self.reference = Reference(resolve_kind(kind, cfg.lora.enabled), run.unwrapped, "dpo.reference")
        self.epoch, self.cursor = 0, 0
        self.order = self._epoch_order(0)
        self.initial_val = self.evaluate(run)  # the untrained policy (setup runs before any resume loads weights)
        if strategy.is_main:
            if self.initial_val:
                write_start_record(Path(run.output_dir) / "metrics.jsonl", self.initial_val)
            info = [("pairs (train / val)", f"{len(train_all)} / {len(self.val_all)}"), ("rows skipped", str(sum(stats.skipped.values()))),
                    ("completions truncated", str(stats.truncated)), ("loss", cfg.dpo.loss),
                    ("reference", "none (reference-free)" if not L.needs_reference(cfg.dpo.loss) else cfg.dpo.reference)]
            info += [(k, str(v)) for k, v in generated.items()]
            print_summary("DPO data", info)

    def _rows(self, run: Run) -> tuple[list[dict], dict[str, int]]:
        """Rows from data.source; the built-in pairs are sampled once on rank 0 and broadcast."""
        cfg, strategy = self.cfg, run.strategy
        if cfg.data.source != BUILTIN_PAIRS:
            return load_pair_rows(cfg)
        rows, generated = None, {}
        if strategy.is_main:
            rows, generated = load_pair_rows(cfg, engine_factory=lambda: _synced_engine(cfg, run))
            save_rows(rows, Path(run.output_dir) / "pairs.jsonl")
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the sampling engine's KV cache is no longer needed
        return strategy.broadcast_object((rows, generated))

    # ------------------------------------------------------------------ batches
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train)))
        if self.cfg.data.shuffle:
            random.Random(f"dpo-{self.cfg.seed}-{epoch}").shuffle(order)
        return order

    def next_batch(self) -> dict[str, Any]:
        picked = []
        while len(picked) < self.cfg.train.micro_batch_size:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._epoch_order(self.epoch)
            picked.append(self.order[self.cursor])
            self.cursor += 1
        return self._collate(self.train, picked, None if self.ref_cache is None else self.ref_cache["train"])

    def _collate(self, pairs: list, idx: list[int], ref: torch.Tensor | None) -> dict[str, Any]:
        docs = [d for i in idx for d in pairs[i].documents()]  # chosen, rejected, chosen, ...
        t = self.cfg.train
        static = (2 * len(idx), t.seq_len) if t.compile else None  # a chosen and a rejected row per pair at most
        batch = rows_from_documents(docs, t.seq_len, self.cfg.data.packing, self.pad_id, static_shape=static)
        batch["lengths"] = torch.tensor([len(d.completion_ids) for d in docs])
        if ref is not None:
            batch["ref_logps"] = ref[idx].reshape(-1)
        return batch

    def normalizer(self, batch: dict[str, Any]) -> float:
        return batch["lengths"].numel() / 2  # pairs

    # ------------------------------------------------------------------ loss
    def _pair_logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> L.PairLogps:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        n_docs = batch["lengths"].numel()
        logp = token_logprobs(model, batch, chunk_size=self.cfg.train.loss_chunk_size)[0]
        sums = sum_by_document(logp, batch["doc_index"], n_docs)
        ref = batch.get("ref_logps")
        if ref is None and self.reference is not None:
            ref = sum_by_document(self.reference.token_logprobs(batch), batch["doc_index"], n_docs)
        lengths = batch["lengths"].to(sums.dtype)
        return L.PairLogps(sums[0::2], sums[1::2], lengths[0::2], lengths[1::2],
                           None if ref is None else ref[0::2].to(sums.dtype), None if ref is None else ref[1::2].to(sums.dtype))

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        lp = self._pair_logps(model, batch)
        per_pair = L.PREFERENCE_LOSSES[self.cfg.dpo.loss](lp, self.cfg.dpo)
        return LossOutput(per_pair.sum(), _metrics(lp, self.cfg.dpo), num_tokens=int(batch["input_ids"].numel()))

    # ------------------------------------------------------------------ reference cache
    @torch.no_grad()
    def _precomputed(self, run: Run) -> dict[str, torch.Tensor]:
        """Reference log-probs of every pair, computed once (policy with adapters off, or as it is at setup)."""
        from tqdm.auto import tqdm

        path = Path(run.output_dir) / f"ref_logps.rank{run.strategy.rank}.pt"
        key = _fingerprint(self.cfg, self.train, self.val)
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            if cached.get("fingerprint") == key:
                return cached
        policy = run.unwrapped
        ref = Reference("lora_disabled", policy, "dpo.reference") if hasattr(policy, "disable_adapter") else None
        out: dict[str, Any] = {"fingerprint": key}
        for split, pairs in (("train", self.train), ("val", self.val)):
            values = torch.zeros(len(pairs), 2)
            step = self.cfg.train.micro_batch_size
            for start in tqdm(range(0, len(pairs), step), desc=f"reference log-probs ({split})", disable=not run.strategy.is_main):
                idx = list(range(start, min(start + step, len(pairs))))
                batch = {k: v.to(self.device) for k, v in self._collate(pairs, idx, None).items()}
                with run.autocast():  # the numerics the training step compares against
                    lp = ref.token_logprobs(batch) if ref is not None else _eval_logprobs(policy, batch)
                values[start: start + len(idx)] = sum_by_document(lp, batch["doc_index"], 2 * len(idx)).view(-1, 2).float().cpu()
            out[split] = values
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
        return out

    # ------------------------------------------------------------------ evaluation and report
    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        if not self.val_all:
            return {}
        model = run.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # loss, correct, margin, pairs
        step = self.cfg.train.micro_batch_size
        try:
            for start in range(0, len(self.val), step):
                idx = list(range(start, min(start + step, len(self.val))))
                batch = self._collate(self.val, idx, None if self.ref_cache is None else self.ref_cache["val"])
                lp = self._pair_logps(model, batch)
                chosen, rejected = L.implicit_rewards(lp, self.cfg.dpo)
                per_pair = L.PREFERENCE_LOSSES[self.cfg.dpo.loss](lp, self.cfg.dpo)
                totals += torch.tensor([per_pair.sum().item(), (chosen > rejected).sum().item(), (chosen - rejected).sum().item(), len(idx)],
                                       dtype=torch.float64)
        finally:
            model.train(was_training)
        totals = run.strategy.all_reduce_sum(totals.to(self.device)).cpu()
        n = max(float(totals[3]), 1.0)
        return {"val_loss": float(totals[0]) / n, "val_accuracy": float(totals[1]) / n, "val_margin": float(totals[2]) / n}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.order = self._epoch_order(self.epoch)

    def finish(self, run: Run, history: list[dict[str, Any]]) -> None:
        if not run.strategy.is_main:
            return
        png = plot_curves(history, ["loss", "accuracy", "margin", "val_accuracy"], Path(run.output_dir) / "preference.png",
                          f"{self.cfg.dpo.loss} preference optimisation")
        rows = []
        for key in ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected"):
            fl = first_last(history, key)
            if fl:
                rows.append((f"train {key} (first -> last steps)", f"{fl[0]:.3f} -> {fl[1]:.3f}"))
        for key in ("val_loss", "val_accuracy", "val_margin"):  # step 0 (before training) -> the loop's last validation
            _, values = series(history, key)
            if len(values) >= 2:
                rows.append((f"{key} (step 0 -> end)", f"{values[0]:.3f} -> {values[-1]:.3f}"))
        if png:
            rows.append(("curves", str(png)))
        print_summary("DPO summary", rows)


def write_start_record(path: Path, val: dict[str, float]) -> None:
    """Put ``{"step": 0, **val}`` first in metrics.jsonl, so the file (and the curves) show where accuracy started.

    The loop logs from step 1 and opens metrics.jsonl only after setup; its logger keeps the records
    at or before the step it starts from (step 0 on a fresh run, the checkpoint's on a resume), so
    this one stays. Records of an earlier run in the same directory past step 0 are left for the
    logger to keep or drop as it does for any resume.
    """
    later = [r for r in read_history(path) if r.get("step", 0) > 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, **val}, *later]))


def _metrics(lp: L.PairLogps, cfg) -> dict[str, float]:
    chosen, rejected = (r.detach() for r in L.implicit_rewards(lp, cfg))
    return {
        "accuracy": float((chosen > rejected).float().mean()),
        "margin": float((chosen - rejected).mean()),
        "reward_chosen": float(chosen.mean()),
        "reward_rejected": float(rejected.mean()),
        "logp_chosen": float(lp.chosen.detach().mean()),
        "logp_rejected": float(lp.rejected.detach().mean()),
    }


def _eval_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return token_logprobs(model, batch)[0]
    finally:
        model.train(was_training)


def _fingerprint(cfg, train: list, val: list) -> str:
    h = hashlib.sha256(f"{cfg.model.path}|{cfg.dpo.reference}|{cfg.lora.enabled}".encode())
    for p in train + [None] + val:
        h.update(repr(None if p is None else (p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    return h.hexdigest()[:16]


def _synced_engine(cfg, run: Run):
    """A rollout engine holding exactly the policy's current weights (QLoRA base and adapters included)."""
    from alignment.rollout import Rollout

    rollout = Rollout(cfg, run.device)
    rollout.sync(run.unwrapped, changed_only=False)
    return rollout.llm
