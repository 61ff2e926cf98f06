"""The training loop: one recipe for every method (SFT, DPO, GRPO, distillation).

    setup    strategy → model (+NF4/LoRA, activation checkpointing, fp8, compile) → wrap + optimizer
             → scheduler → method (data) → resume → logger
    step     grad_accum micro-batches: sum of losses / global normalizer → backward → clip → step
    validate method.evaluate every eval.every_n_steps and at the end
    save     atomic checkpoints every checkpoint.every_n_steps and at the end, plus final/

A Method decides what a batch and its loss are; this file decides how to step, so accumulation,
precision, sharding, logging and checkpoints work the same for all of them.

Mixed precision. Master weights and optimizer states are always fp32. On a GPU with
``precision=bf16`` the forward and backward run in bf16 with reductions (norms, softmax, the loss)
in fp32; bf16 has fp32's exponent range, so no loss scaling is needed. ``train.mixed_precision``
picks where the bf16 weights come from: bf16 autocast over fp32 parameters (default), or bf16
parameters refreshed once per step from fp32 masters held by the optimizer (``bf16_weights``; see
``trainer.precision``). Frozen LoRA base weights are stored in bf16 (they are never updated, so
nothing is lost; ``trainer.models.param_dtype``), QLoRA bases in NF4 with bf16 compute. On CPU the
default is plain fp32; ``precision=bf16`` on CPU is honoured (CPU bf16 autocast or bf16 weights),
which is how bf16 numerics are tested without a GPU.
"""
from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.distributed.checkpoint.stateful import Stateful

from trainer.checkpoint import Checkpointer, list_checkpoints, resolve_resume, seed_everything
from trainer.config import Config, save_config
from trainer.methods import Method, Run, build_method
from trainer.metrics import MetricsLogger, Throughput, peak_flops, peak_memory_gb, plot_losses, summary_table, training_flops_per_token
from trainer.models import build_model, count_parameters, load_tokenizer
from trainer.optim import build_optimizer, build_scheduler
from trainer.precision import (keep_lora_inputs_in_compute_dtype, runs_in_bf16, to_bf16_working_weights,
                               uses_autocast)


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss...): printed as one line by the launcher."""


class Trainer(Stateful):
    def __init__(self, cfg: Config, method: Method | None = None, console: Console | None = None):
        self.cfg = cfg
        self.method = method  # tests and custom recipes may pass one; else train.method builds it
        self.console = console or Console(stderr=True)
        self.output_dir = Path(cfg.output_dir)
        self.step, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.last_checkpoint: str | None = None

    # --- Stateful -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                "last_checkpoint": self.last_checkpoint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.last_checkpoint = state.get("last_checkpoint")

    # --- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        from parallel.base import build_strategy

        cfg = self.cfg
        self.strategy = s = build_strategy(cfg)
        s.setup()
        self.device = s.device
        self.is_main = s.is_main
        seed_everything(cfg.seed)  # same seed on every rank: identical initial weights (LoRA A matrices...)
        _quiet_hf_loading()
        self.tokenizer = load_tokenizer(cfg.model)
        model = build_model(cfg, self.device)
        self.trainable_params, self.total_params = count_parameters(model)
        masters = _apply_precision(model, cfg)
        _apply_model_passes(model, cfg)
        self.model, self.optimizer = s.wrap(model, partial(build_optimizer, cfg, masters=masters))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.method = self.method or build_method(cfg)
        self.run = Run(cfg=cfg, tokenizer=self.tokenizer, model=self.model, strategy=s, device=self.device,
                       output_dir=self.output_dir, log=self.log)
        self.method.setup(self.run)
        self.checkpointer = Checkpointer(cfg, s, self.tokenizer)
        self._maybe_resume()
        if self.is_main:
            save_config(cfg, self.output_dir)
        self.metrics = MetricsLogger(cfg, self.output_dir, enabled=self.is_main, total_steps=cfg.train.max_steps,
                                     start_step=self.step, console=self.console)
        self.throughput = Throughput(training_flops_per_token(self.total_params), peak_flops(self.device), s.world_size)
        self.log(self._startup_line())

    def _maybe_resume(self) -> None:
        path = resolve_resume(self.cfg)
        if path is None:
            if self.cfg.resume == "auto":
                self.log(f"resume=auto: no checkpoint in {self.output_dir / 'checkpoints'}, starting fresh")
            elif list_checkpoints(self.output_dir):
                self.log(f"[yellow]{self.output_dir} already has checkpoints; starting fresh (resume=auto continues them)")
            return
        state = self.checkpointer.load(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, method=self.method)
        self.load_state_dict(state)
        self.last_checkpoint = str(path)
        self.log(f"resumed from {path} at step {self.step}")

    def _startup_line(self) -> str:
        cfg, s = self.cfg, self.strategy
        share = 100 * self.trainable_params / max(1, self.total_params)
        precision = f"{cfg.precision} ({cfg.train.mixed_precision})" if runs_in_bf16(cfg.precision) else cfg.precision
        kind = "qlora" if cfg.quant.load_in_4bit else ("dora" if cfg.lora.use_dora else "lora") if cfg.lora.enabled else "full"
        return (f"[bold]{cfg.train.method}[/] ({kind}) {cfg.model.path}: trainable {self.trainable_params / 1e6:,.2f}M / "
                f"{self.total_params / 1e6:,.1f}M params ({share:.2f}%) | device {self.device} | precision {precision} | "
                f"compile {cfg.train.compile} | strategy {s.name} x{s.world_size} | "
                f"activation checkpointing {cfg.train.activation_checkpointing} | "
                f"batch {cfg.train.micro_batch_size}x{cfg.train.grad_accum}x{s.world_size} of {cfg.train.seq_len} tokens")

    def log(self, text: str) -> None:
        if self.is_main:
            self.console.print(text, highlight=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.run.autocast()  # one definition: methods score outside the step with the same context

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Run to ``train.max_steps``; returns the logged history (one dict per logged step)."""
        self.setup()
        cfg, t = self.cfg, self.cfg.train
        started = time.perf_counter()
        last_eval = last_save = -1
        try:
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                record = self.train_step()
                self.train_seconds += time.perf_counter() - t0
                if cfg.eval.every_n_steps and self.step % cfg.eval.every_n_steps == 0:
                    record.update(self.validate())
                    last_eval = self.step
                if self.step % t.log_every_n_steps == 0 or self.step == t.max_steps or "val_loss" in record:
                    self.metrics.log(record)
                if cfg.checkpoint.every_n_steps and self.step % cfg.checkpoint.every_n_steps == 0:
                    self.save()
                    last_save = self.step
            if last_eval != self.step:
                end = self.validate()
                if end:
                    self.metrics.log({"step": self.step, **end})
            if last_save != self.step:
                self.save()
            saved = {"last checkpoint": str(self.last_checkpoint)}
            if cfg.checkpoint.save_final:
                final = self.checkpointer.save_final(self.model)
                saved["final model"] = str(final)
                if cfg.wandb.log_model:
                    self.metrics.log_model(final, "adapter" if cfg.lora.enabled else "model")
        finally:
            self.metrics.close()
        self._finish(time.perf_counter() - started, saved)
        return self.metrics.history

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics."""
        s, t, m = self.strategy, self.cfg.train, self.method
        batches = [m.next_batch() for _ in range(t.grad_accum)]
        # the normalizer of the whole window on all ranks, known before any forward: exact accumulation
        normalizer = float(s.all_reduce_sum(sum(m.normalizer(b) for b in batches)))
        # summed on the device: a .cpu() per micro-batch would stall the launch queue every time
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        extra: dict[str, float] = {}
        tokens = 0
        for i, batch in enumerate(batches):
            batch = _to_device(batch, self.device)
            # backward inside no_sync too: FSDP2 decides in its backward hooks whether to reduce-scatter
            with s.no_sync(self.model, is_last_micro_batch=i == len(batches) - 1):
                with self.autocast():
                    out = m.loss(self.model, batch)
                loss = out.loss_sum / max(normalizer, 1.0)
                s.backward(loss, self.model)
            loss_total += loss.detach().double()
            tokens += out.num_tokens
            for k, v in out.metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / len(batches)
        loss_value = float(s.all_reduce_sum(loss_total))
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(loss_value):
            self._diverged(f"loss is {loss_value}")
        grad_norm = s.clip_grad_norm(self.model, t.max_grad_norm)
        if not math.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm} (loss {loss_value:.4f})")
        s.optimizer_step(self.model, self.optimizer)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += tokens * s.world_size
        self.throughput.add(tokens)
        extra.update(m.after_optimizer_step(self.run, self.step))
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "trained_tokens": normalizer,
                  "tokens_seen": self.tokens_seen, **self.throughput.measure(),
                  "peak_mem_gb": peak_memory_gb(self.device), "mem_kind": "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"}
        return {**record, **extra}

    def _diverged(self, what: str) -> None:
        """Stop without stepping or saving: the last checkpoint on disk stays the last good state."""
        step = self.step + 1
        where = self.last_checkpoint or "none (no checkpoint was saved before this step)"
        self.metrics.close()
        raise TrainingError(f"{what} at step {step}; stopped without applying or saving this step. Last good checkpoint: {where}. "
                            f"Resume from it with resume=auto after lowering train.lr or checking the data")

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        with self.autocast():
            return self.method.evaluate(self.run)

    def save(self) -> Path:
        self.last_checkpoint = str(self.checkpointer.root / f"step-{self.step:06d}")
        path = self.checkpointer.save(self.step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                      method=self.method, trainer_state=self.state_dict())
        self.log(f"step {self.step}: saved {path}")
        return path

    def _finish(self, wall_time: float, saved: dict[str, str]) -> None:
        history = self.metrics.history
        self.method.finish(self.run, history)
        if self.is_main:
            png = plot_losses(history, self.output_dir / "loss.png", title=f"{self.cfg.train.method}: {self.cfg.model.path}")
            if png:
                saved["loss curve"] = str(png)
            saved["metrics"] = str(self.metrics.path)
            self.console.print(summary_table(history, wall_time=wall_time, output_dir=self.output_dir, saved=saved))
        self.strategy.teardown()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a CPU batch; pinned host memory makes the copy truly asynchronous on CUDA."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _apply_precision(model: torch.nn.Module, cfg: Config) -> dict[int, torch.Tensor] | None:
    """The mixed-precision scheme's changes to the model; returns the fp32 masters for ``bf16_weights``."""
    if cfg.train.mixed_precision == "bf16_weights":
        return to_bf16_working_weights(model)
    if uses_autocast(cfg.precision, cfg.train.mixed_precision):
        keep_lora_inputs_in_compute_dtype(model)
    return None


def _apply_model_passes(model: torch.nn.Module, cfg: Config) -> None:
    """Passes that must run before the strategy shards the model (each is idempotent)."""
    if cfg.train.mlp_token_chunks > 1:
        from parallel.activation import apply_mlp_token_chunks

        apply_mlp_token_chunks(model, cfg.train.mlp_token_chunks)
    if cfg.train.activation_checkpointing != "none":
        from parallel.activation import apply_activation_checkpointing

        apply_activation_checkpointing(model, cfg)
    if cfg.precision == "fp8":
        from parallel.fp8 import maybe_apply_fp8

        maybe_apply_fp8(model, cfg)
    if cfg.train.compile:
        from parallel.activation import decoder_layers

        for layer in decoder_layers(model):  # per block, as torchtitan: small graphs, names unchanged
            compile_layer_forward(layer)


def compile_layer_forward(layer: torch.nn.Module) -> None:
    """``torch.compile`` a decoder layer's forward (idempotent).

    The *forward* is compiled, not the module's ``__call__``, so hooks on the layer stay outside the
    graph: FSDP2's unshard/reshard hooks (the strategy adds them after this pass) and transformers'
    output-capturing hooks, which read a ``ContextVar`` that dynamo cannot trace (a graph break per
    layer; SFT reads the final norm by its own hook so they are not even installed). After the
    activation-checkpointing pass the forward is the checkpoint wrapper, so the checkpoint is
    compiled with the layer: one graph whose backward recomputes inside compiled code. Layers share
    code and shapes, so they share that graph (plus one for the first layer when its input needs no
    gradient, as under LoRA). Packing fixes the shape, and ``dynamic=False`` keeps the training graph
    static when evaluation brings another shape (that shape gets its own graph).
    """
    if getattr(layer, "_crucible_compiled", False):
        return
    layer.forward = torch.compile(layer.forward, dynamic=False)
    layer._crucible_compiled = True


def _quiet_hf_loading() -> None:
    """Our own progress display is the only one: HF's per-tensor loading bars would interleave with it."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
