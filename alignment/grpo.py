"""GRPO with colocated rollouts on our engine, as a ``Method`` of the one training loop.

One *generation batch* per rank: ``grpo.prompts_per_batch`` prompts x ``grpo.group_size``
completions sampled by the in-process engine, scored by the reward functions, turned into
group-normalised advantages, shuffled and cut into ``grpo.updates_per_batch`` optimizer steps of
``train.grad_accum`` micro-batches each (the config check makes the numbers add up). After every
optimizer step the engine receives the policy's weights in place, and each new generation batch
first checks that the engine's log-probs of its sampled tokens equal the trainer's.

Per-token loss = policy loss (clipped ratio against the log-probs at sampling time) + kl_coef * KL
to the reference; aggregated by ``grpo.loss_agg`` into a loss sum over known units, so gradient
accumulation is exact. With one update per batch the ratio is exactly 1 and the old log-probs are
the current ones detached (no extra forward).
"""
from __future__ import annotations

import random
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from alignment import rewards as R
from alignment import rl
from alignment.reference import Reference, resolve_kind
from alignment.report import first_last, plot_curves, print_summary
from alignment.rollout import Rollout, check_parity, logprob_diff
from alignment.sequences import Document, rows_from_documents, token_logprobs
from trainer import tasks
from trainer.config import ConfigError
from trainer.methods import LossOutput, Method, Run

SEQUENCE_KEYS = ("input_ids", "position_ids", "doc_index", "mask", "advantages", "old_logp", "ref_logp")


class GRPOMethod(Method):
    name = "grpo"
    headline_metrics = ("reward_mean", "correct")

    def setup(self, run: Run) -> None:
        cfg, g = self.cfg, self.cfg.grpo
        self.run, self.device = run, run.device
        self.tokenizer = run.tokenizer
        rank, world = run.strategy.rank, run.strategy.world_size
        rows = self._prompt_rows()
        self.prompts = self._encode_prompts(rows)[rank::world]  # each rank rolls out its own prompts
        if not self.prompts:
            raise ValueError(f"rank {rank} has no prompts ({len(rows)} prompts over {world} ranks)")
        self.rewards = R.build_rewards(g)
        self.reference = Reference(resolve_kind(g.reference, cfg.lora.enabled), run.unwrapped, "grpo.reference") if g.kl_coef > 0 else None
        self.rollout = Rollout(cfg, run.device, kv_fraction=g.rollout_kv_fraction)
        self.rollout.sync(run.unwrapped, changed_only=False)  # QLoRA: the engine gets the dequantized NF4 base, not the fp checkpoint
        self.queue: deque[dict[str, Any]] = deque()
        self.epoch, self.cursor, self.rng = 0, 0, random.Random(f"grpo-{cfg.seed}-{rank}")
        self.order = self._epoch_order(0)
        self.rollout_metrics: dict[str, float] = {}
        self.eval_problems = tasks.generate(g.eval_problems, seed=cfg.seed + 7919, difficulty=cfg.data.difficulty)
        if run.strategy.is_main:
            print_summary("GRPO setup", [
                ("prompts (this rank)", str(len(self.prompts))), ("group size", str(g.group_size)),
                ("completions per generation", str(g.prompts_per_batch * g.group_size)),
                ("optimizer steps per generation", str(g.updates_per_batch)),
                ("rewards", ", ".join(f"{r.name} x{r.weight:g}" for r in self.rewards)),
                ("rollout engine KV cache", f"{self.rollout.kv_cache_gib:.2f} GiB"),
                ("loss", f"{g.policy_loss} / {g.loss_agg}" + (f" + {g.kl_coef:g} KL({g.kl_estimator})" if g.kl_coef > 0 else "")),
            ])

    # ------------------------------------------------------------------ prompts
    def _prompt_rows(self) -> list[dict[str, Any]]:
        data = self.cfg.data
        if data.source == "arithmetic":
            return [{"prompt": p.messages, "answer": p.answer} for p in tasks.generate(data.num_samples, seed=self.cfg.seed, difficulty=data.difficulty)]
        from trainer.data.sources import load_rows

        rows, _ = load_rows(data, self.cfg.seed)
        return rows

    def _encode_prompts(self, rows: list[dict[str, Any]]) -> list[tuple[list[int], dict[str, Any]]]:
        limit = self.cfg.train.seq_len - self.cfg.grpo.max_tokens
        out = []
        for i, row in enumerate(rows):
            prompt = row.get("prompt")
            if isinstance(prompt, list) and prompt:
                text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            elif isinstance(prompt, str) and prompt:
                ids = self.tokenizer(prompt)["input_ids"]
            else:
                raise ConfigError(f"data.source={self.cfg.data.source!r} row {i}: GRPO needs a 'prompt' (a string or a message list)")
            if len(ids) > limit:
                raise ConfigError(f"data.source={self.cfg.data.source!r} row {i}: prompt is {len(ids)} tokens > train.seq_len - grpo.max_tokens = {limit}")
            out.append((ids, row))
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.cfg.data.shuffle:
            random.Random(f"grpo-prompts-{self.cfg.seed}-{epoch}").shuffle(order)
        return order

    def _next_prompts(self, n: int) -> list[tuple[list[int], dict[str, Any]]]:
        picked = []
        while len(picked) < n:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._epoch_order(self.epoch)
            picked.append(self.prompts[self.order[self.cursor]])
            self.cursor += 1
        return picked

    # ------------------------------------------------------------------ rollouts
    def next_batch(self) -> dict[str, Any]:
        if not self.queue:
            self._generate()
        return self.queue.popleft()

    def _generate(self) -> None:
        from engine import SamplingParams

        g, start = self.cfg.grpo, time.perf_counter()
        prompts = self._next_prompts(g.prompts_per_batch)
        params = SamplingParams(n=g.group_size, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, logprobs=0)
        outputs = self.rollout.generate([ids for ids, _ in prompts], params)
        samples = [(out.prompt_token_ids, c) for out in outputs for c in out.outputs]  # group by group
        gen_s = time.perf_counter() - start

        # the engine must be sampling from the policy we are about to train
        check = samples[: g.parity_samples]
        with self.run.autocast():  # the trainer's numerics, as in the training step
            diff = logprob_diff(self.run.unwrapped, [(p, c.token_ids, [lp[t] for lp, t in zip(c.logprobs, c.token_ids)]) for p, c in check])
        check_parity(diff, g.max_logprob_diff, self.rollout.syncs)

        rows = [row for _, row in prompts for _ in range(g.group_size)]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        columns["completion_ids"] = [c.token_ids for _, c in samples]
        texts = [c.text for _, c in samples]
        by_fn = R.score(self.rewards, [r["prompt"] for r in rows], texts, columns)
        reward = torch.tensor(R.total(self.rewards, by_fn))
        advantages = rl.ADVANTAGES[g.advantage](reward, g.group_size, scale=g.scale_rewards)

        docs = [Document(list(p), list(c.token_ids)) for p, c in samples]
        width = max(map(len, docs))
        static = (len(docs), max(width, self.cfg.train.seq_len)) if self.cfg.train.compile else None  # one width: no recompiles
        batch = rows_from_documents(docs, seq_len=width, packing=False, pad_id=self.tokenizer.pad_token_id or 0, static_shape=static)
        batch["mask"] = (batch["doc_index"] >= 0).float()
        batch["advantages"] = advantages
        if g.updates_per_batch > 1:  # ratios move off 1 only when the same samples see several steps
            batch["old_logp"] = self._score(batch, lambda b: token_logprobs(self.run.unwrapped, b, g.temperature)[0])
        if self.reference is not None:
            batch["ref_logp"] = self._score(batch, lambda b: self.reference.token_logprobs(b, g.temperature))

        groups = reward.view(-1, g.group_size)
        lengths = [len(c.token_ids) for _, c in samples]
        self.rollout_metrics = {
            "reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
            **{f"reward/{name}": statistics.fmean(v) for name, v in by_fn.items()},
            "correct": statistics.fmean(float(tasks.is_correct(t, a)) for t, a in zip(texts, columns["answer"])) if "answer" in columns else None,
            "completion_len": statistics.fmean(lengths),
            "truncated": statistics.fmean(float(c.finish_reason == "length") for _, c in samples),
            "zero_signal_groups": float((groups.std(dim=1) == 0).float().mean()),
            "logprob_diff": diff, "generate_s": gen_s, "engine_kv_gib": self.rollout.kv_cache_gib,
        }
        self.rollout_metrics = {k: v for k, v in self.rollout_metrics.items() if v is not None}
        self._enqueue(batch)

    @torch.no_grad()
    def _score(self, batch: dict[str, torch.Tensor], fn) -> torch.Tensor:
        """Per-token log-probs of the whole generation batch, one micro-batch at a time, in eval mode."""
        model, mbs = self.run.unwrapped, self.cfg.train.micro_batch_size
        was_training = model.training
        model.eval()
        try:
            parts = []
            for s in range(0, batch["input_ids"].shape[0], mbs):
                part = {k: batch[k][s: s + mbs].to(self.device) for k in ("input_ids", "position_ids", "doc_index")}
                with self.run.autocast():
                    parts.append(fn(part).cpu())
            return torch.cat(parts)
        finally:
            model.train(was_training)

    def _enqueue(self, batch: dict[str, torch.Tensor]) -> None:
        n, mbs = batch["input_ids"].shape[0], self.cfg.train.micro_batch_size
        order = torch.tensor(self.rng.sample(range(n), n))  # each step sees a random share of the groups
        for s in range(0, n, mbs):
            idx = order[s: s + mbs]
            mb = {k: batch[k][idx] for k in SEQUENCE_KEYS if k in batch}
            positions = torch.arange(mb["doc_index"].shape[1])
            width = int(torch.where(mb["doc_index"] >= 0, positions, -1).max()) + 1
            self.queue.append({k: (v[:, :width] if v.dim() == 2 else v) for k, v in mb.items()})  # drop shared padding

    # ------------------------------------------------------------------ loss
    def normalizer(self, batch: dict[str, Any]) -> float:
        return rl.LOSS_AGGREGATIONS[self.cfg.grpo.loss_agg].units(batch["mask"], self.cfg.grpo.max_tokens)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        g = self.cfg.grpo
        batch = {k: v.to(self.device) for k, v in batch.items()}
        mask = batch["mask"]
        logp, entropy = token_logprobs(model, batch, g.temperature, with_entropy=True, chunk_size=self.cfg.train.loss_chunk_size)
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()
        clip_high = g.clip_eps if g.clip_eps_high is None else g.clip_eps_high
        per_token, clipped = rl.POLICY_LOSSES[g.policy_loss](logp, old, batch["advantages"], g.clip_eps, clip_high)
        metrics = {"clip_frac": rl.masked_mean(clipped.float(), mask), "entropy": rl.masked_mean(entropy, mask)}
        if "ref_logp" in batch:
            kl = rl.KL_ESTIMATORS[g.kl_estimator](logp, batch["ref_logp"])
            per_token = per_token + g.kl_coef * kl
            metrics["kl"] = rl.masked_mean(kl.detach(), mask)
        loss_sum = rl.LOSS_AGGREGATIONS[g.loss_agg].loss_sum(per_token, mask, g.max_tokens)
        return LossOutput(loss_sum, {**metrics, **self.rollout_metrics}, num_tokens=int(mask.sum()))

    def after_optimizer_step(self, run: Run, step: int) -> dict[str, float]:
        start = time.perf_counter()
        self.rollout.sync(run.unwrapped)
        return {"sync_s": time.perf_counter() - start}

    # ------------------------------------------------------------------ evaluation and report
    def evaluate(self, run: Run) -> dict[str, float]:
        """Greedy accuracy of the engine (synced to the policy) on held-out arithmetic problems."""
        from engine import SamplingParams

        if not self.eval_problems:
            return {}
        outs = self.rollout.llm.chat([p.messages for p in self.eval_problems], SamplingParams(temperature=0.0, max_tokens=self.cfg.grpo.max_tokens))
        right = sum(tasks.is_correct(o.outputs[0].text, p.answer) for o, p in zip(outs, self.eval_problems))
        totals = run.strategy.all_reduce_sum(torch.tensor([right, len(outs)], dtype=torch.float64, device=self.device)).cpu()
        return {"eval_accuracy": float(totals[0] / totals[1])}

    def state_dict(self) -> dict[str, Any]:
        # a resume restarts at a generation-batch boundary: the queued rollouts came from the old weights
        return {"epoch": self.epoch, "cursor": self.cursor, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.rng.setstate(_as_tuple(state["rng"]))
        self.order = self._epoch_order(self.epoch)
        self.queue.clear()
        self.rollout.sync(self.run.unwrapped, changed_only=False)  # resumed weights

    def finish(self, run: Run, history: list[dict[str, Any]]) -> None:
        if not run.strategy.is_main:
            return
        out = Path(run.output_dir)
        png = plot_curves(history, ["reward_mean", "correct", "completion_len", "kl" if self.reference else "entropy"], out / "reward.png",
                          f"GRPO ({self.cfg.grpo.loss_agg}, G={self.cfg.grpo.group_size})")
        rows = []
        for key in ("reward_mean", "correct", "reward_std", "completion_len", "entropy", "clip_frac", "kl", "logprob_diff", "eval_accuracy"):
            fl = first_last(history, key)
            if fl:
                rows.append((f"{key} (first -> last steps)", f"{fl[0]:.3f} -> {fl[1]:.3f}"))
        rows.append(("engine weight syncs", str(self.rollout.syncs)))
        if png:
            rows.append(("reward curve", str(png)))
        print_summary("GRPO summary", rows)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
