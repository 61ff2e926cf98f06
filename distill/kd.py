"""``train.method=distill``: teacher -> student in the one training loop.

setup: synthesize the dataset if it is missing, warm-start the student (prune_every_k), build the
data, load the teacher (online, NF4 or sharded) or its top-k cache (offline), and an engine
holding the student when on-policy batches are asked for.

Each micro-batch is a dataset batch or, with probability ``distill.on_policy_ratio`` (lambda), an
on-policy batch: the student samples completions through the engine and the teacher scores them
(GKD). The loss is summed over trained tokens (the normalizer), so accumulation stays exact:
    (1 - ce_weight) * KD(teacher || student, T) * T^2 + ce_weight * CE   (CE on dataset tokens only)
after_optimizer_step pushes the student's weights into the engine; finish() evaluates
student-before, student-after and teacher.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch

from distill.losses import KDSpec, TeacherSide, chunked_kd_loss
from distill.teacher import TopKCache, build_topk_cache, load_teacher, trained_positions
from trainer.config import ConfigError
from trainer.methods import LossOutput, Method, Run
from trainer.sft import final_hidden_states, output_head


class DistillMethod(Method):
    name = "distill"
    headline_metrics = ("kd", "ce")

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.distill
        self.spec = KDSpec(d.loss, d.temperature, d.jsd_beta)
        self.teacher = self.cache = self.llm = None
        self.rng = random.Random(f"distill-{cfg.seed}")

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self, run: Run) -> None:
        from trainer.data import PackedLoader, build_examples

        cfg, d, strategy = self.cfg, self.cfg.distill, run.strategy
        self.run = run
        self._ensure_dataset(run)
        self.student_init = self._prepare_student(run)
        self.train_examples, self.val_examples = build_examples(cfg, run.tokenizer)
        self.loader = PackedLoader.for_run(self.train_examples, cfg, strategy.rank, strategy.world_size, run.tokenizer.pad_token_id)
        self.rng = random.Random(f"distill-{cfg.seed}-{strategy.rank}")
        if d.teacher_logits != "none":
            self._check_vocabulary(run)
        if d.teacher_logits == "online":
            self.teacher = load_teacher(cfg, run.device)
            if d.teacher_sharded:
                self.teacher, _ = strategy.wrap(self.teacher, lambda params: None)
        elif d.teacher_logits == "offline":
            self.cache = self._load_or_build_cache(run)
        if d.on_policy_ratio > 0:
            from distill.evaluate import prompt_of
            from distill.synth import engine_options
            from engine import LLM

            self.prompts = [p for p in (prompt_of(e) for e in self.train_examples) if 0 < len(p) < cfg.train.seq_len]
            if not self.prompts:
                raise ConfigError("distill.on_policy_ratio > 0 needs prompt/completion or chat data (no training example has a prompt)")
            opts = {**engine_options(cfg), "gpu_memory_utilization": d.engine_memory_utilization}
            self.llm = LLM(model=str(self.student_init), device=str(run.device), **opts)
            self._sync_engine(run)  # the init dir may predate resumed weights

    def _ensure_dataset(self, run: Run) -> None:
        cfg = self.cfg
        if cfg.data.source != cfg.synth.output or Path(cfg.synth.output).exists():
            return
        if not cfg.distill.generate_if_missing:
            raise ConfigError(f"data.source={cfg.data.source} does not exist; run launch/generate.py or set distill.generate_if_missing=true")
        if run.strategy.is_main:
            from distill.synth import run_generation

            run.log(f"distill: {cfg.synth.output} is missing, generating it with the teacher")
            run_generation(cfg)
        run.strategy.barrier()

    def _prepare_student(self, run: Run) -> Path:
        """The student's starting weights as an HF dir (the 'student-before' of the evaluation)."""
        from distill.students import load_warm_start, prune_every_k

        d, out = self.cfg.distill, run.output_dir / "student_init"
        if d.student == "prune_every_k":
            if run.strategy.is_main and not (out / "config.json").exists():
                from trainer.models import resolve_model_path

                prune_every_k(resolve_model_path(d.teacher), d.keep_every_k, out)
            run.strategy.barrier()
            # on resume the trainer restores the checkpoint's weights after setup, over this warm start
            load_warm_start(run.unwrapped, out, d.teacher)
        elif not (out / "config.json").exists():
            run.strategy.save_pretrained(run.model, out)
            if run.strategy.is_main:
                run.tokenizer.save_pretrained(out)
            run.strategy.barrier()
        return out

    def _check_vocabulary(self, run: Run) -> None:
        from transformers import AutoTokenizer

        from distill.students import check_same_vocabulary
        from trainer.models import resolve_model_path

        check_same_vocabulary(AutoTokenizer.from_pretrained(resolve_model_path(self.cfg.distill.teacher)), run.tokenizer)

    def _load_or_build_cache(self, run: Run) -> TopKCache:
        from rich.progress import Progress

        from trainer.models import resolve_model_path

        d = self.cfg.distill
        path = Path(d.cache_path or run.output_dir / "teacher_topk.safetensors")
        examples = self.train_examples + self.val_examples
        if run.strategy.is_main and not path.exists():
            teacher = load_teacher(self.cfg, run.device)
            meta = {"teacher": resolve_model_path(d.teacher), "data": self.cfg.data.source, "seq_len": str(self.cfg.train.seq_len)}
            with Progress(transient=True) as bar:
                task = bar.add_task("teacher top-k", total=len(examples))
                cache = build_topk_cache(teacher, examples, d.topk, run.device, meta, chunk_size=d.chunk_size,
                                         progress=lambda n: bar.advance(task, n))
            cache.save(path)
            run.log(f"distill: cached teacher top-{d.topk} log-probs of {cache.ids.shape[0]:,} tokens -> {path}")
            del teacher
        run.strategy.barrier()
        cache = TopKCache.load(path)
        if cache.k != d.topk:
            raise ConfigError(f"distill.topk={d.topk} but {path} holds top-{cache.k}; delete it or set distill.topk={cache.k}")
        return cache

    # ------------------------------------------------------------------------------------------
    # batches and loss
    # ------------------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, Any]:
        if self.llm is not None and self.rng.random() < self.cfg.distill.on_policy_ratio:
            return self._on_policy_batch()
        return next(self.loader)

    def _on_policy_batch(self) -> dict[str, Any]:
        """The student answers sampled prompts; the loss is taken on its own tokens (no CE: they are not targets)."""
        from engine import SamplingParams
        from trainer.data import Example, collate

        d, seq_len = self.cfg.distill, self.cfg.train.seq_len
        prompts = [self.rng.choice(self.prompts) for _ in range(self.cfg.train.micro_batch_size)]
        params = [SamplingParams(temperature=d.on_policy_temperature, max_tokens=min(d.on_policy_max_new_tokens, seq_len - len(p)),
                                 seed=self.rng.randrange(2**31)) for p in prompts]
        examples = []
        for prompt, out in zip(prompts, self.llm.generate(prompts, params)):
            completion = list(out.outputs[0].token_ids) if out.outputs else []
            examples.append(Example(prompt + completion, [-100] * len(prompt) + completion))
        batch = collate([[e] for e in examples], self.run.tokenizer.pad_token_id)
        batch["on_policy"] = torch.tensor(1)
        return batch

    def _teacher_side(self, batch: dict[str, Any], mask: torch.Tensor) -> TeacherSide | None:
        """The teacher's final hidden states at the trained positions (its logits are made per chunk in the loss),
        or its cached top-k log-probs; None for data-based distillation."""
        if self.teacher is not None:
            with torch.no_grad():
                hidden = final_hidden_states(self.teacher, batch)[:, :-1][mask]
            return TeacherSide(hidden=hidden, head=output_head(self.teacher))
        if self.cache is not None:
            ids, logp = self.cache.lookup({k: v.cpu() for k, v in batch.items()})
            device = batch["input_ids"].device
            return TeacherSide(topk_ids=ids.to(device), topk_logp=logp.to(device))
        return None

    def normalizer(self, batch: dict[str, Any]) -> float:
        return float(trained_positions(batch)[0].sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        d = self.cfg.distill
        mask, targets = trained_positions(batch)
        teacher = self._teacher_side(batch, mask)  # first: its forward's temporaries never meet the student's saved activations
        hidden = final_hidden_states(model, batch)[:, :-1][mask]
        on_policy = bool(batch.get("on_policy", 0))
        ce_mask = torch.full_like(targets, not on_policy, dtype=torch.bool)
        loss_sum, parts = chunked_kd_loss(hidden, output_head(self.run.unwrapped), targets, teacher, self.spec,
                                          d.ce_weight, ce_mask, d.chunk_size)
        n = max(targets.numel(), 1)
        metrics = {"on_policy": float(on_policy)}
        if teacher is not None:
            metrics["kd"] = float(parts["kd_sum"]) / n
        if not on_policy:
            metrics["ce"] = float(parts["ce_sum"]) / n
        return LossOutput(loss_sum, metrics, num_tokens=int(batch["input_ids"].numel()))

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    def after_optimizer_step(self, run: Run, step: int) -> dict[str, float]:
        if self.llm is None:
            return {}
        return {"engine_synced_tensors": float(self._sync_engine(run))}

    def _sync_engine(self, run: Run) -> int:
        """Full (unsharded) student weights into the engine: DTensor shards are gathered first."""
        def full(t: torch.Tensor) -> torch.Tensor:
            return t.full_tensor() if hasattr(t, "full_tensor") else t

        with torch.no_grad():
            return self.llm.update_weights((name, full(p.detach())) for name, p in run.unwrapped.named_parameters())

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        """Validation CE (perplexity) and KD on held-out examples, reduced over ranks."""
        from trainer.data import iter_eval_batches

        if not self.val_examples:
            return {}
        cfg, strategy = self.cfg, run.strategy
        sums = torch.zeros(3, dtype=torch.float64)  # ce, kd, tokens
        batches = list(iter_eval_batches(self.val_examples, cfg.train.micro_batch_size, cfg.train.seq_len, cfg.data.packing,
                                         strategy.rank, strategy.world_size, run.tokenizer.pad_token_id))
        if strategy.lockstep_forward:  # sharded params: every forward is a collective, so all ranks run the same count
            batches = batches[: int(strategy.all_reduce_min(len(batches)))]
        for batch in batches:
            batch = {k: v.to(run.device) for k, v in batch.items()}
            out = self.loss(run.model, batch)
            n = self.normalizer(batch)
            sums += torch.tensor([out.metrics.get("ce", 0.0) * n, out.metrics.get("kd", 0.0) * n, n], dtype=torch.float64)
        ce, kd, n = strategy.all_reduce_sum(sums).tolist()
        n = max(n, 1.0)
        metrics = {"val_loss": ce / n, "val_ppl": math.exp(min(ce / n, 50))}
        if cfg.distill.teacher_logits != "none":
            metrics["val_kd"] = kd / n
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.rng.setstate(state["rng"])

    def _engine_kwargs(self, saved: Path) -> dict[str, str]:
        """A saved student for the engine: a full HF dir, or (LoRA) the base model plus the adapter dir."""
        from trainer.models import resolve_model_path

        if self.cfg.lora.enabled:
            return {"model": resolve_model_path(self.cfg.model.path), "adapter": str(saved)}
        return {"model": str(saved)}

    def finish(self, run: Run, history: list[dict[str, Any]]) -> None:
        """Save the trained student, then compare it with its start and the teacher through the engine."""
        from distill.evaluate import compare, plot_training
        from trainer.models import resolve_model_path

        self.teacher = self.llm = None  # free memory for the evaluation engines
        plot_training(history, run.output_dir / "distill_curves.png")
        if not self.cfg.distill.evaluate:
            return
        final = run.output_dir / "student_final"
        run.strategy.save_pretrained(run.model, final)
        if run.strategy.is_main:
            run.tokenizer.save_pretrained(final)
            models = {"student-before": self._engine_kwargs(self.student_init), "student-after": self._engine_kwargs(final),
                      "teacher": {"model": resolve_model_path(self.cfg.distill.teacher)}}
            compare(self.cfg, models, self.val_examples or self.train_examples[-self.cfg.distill.eval_num_texts:], run.output_dir)
        run.strategy.barrier()
