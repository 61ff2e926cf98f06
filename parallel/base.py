"""The Strategy interface: how a model and its optimizer are placed, stepped and saved.

The training loop only talks to a Strategy, so every method (SFT, DPO, GRPO, KD) gets every
parallelism option without a branch in the loop. ``build_strategy(cfg)`` picks the implementation
from ``parallel.strategy``; sharded strategies live beside this file.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class Strategy:
    """Single process, one device. Subclasses override what sharding changes."""

    name = "single"
    # Every forward is a collective (parameters are all-gathered per layer): all ranks must run the
    # same number of forwards, e.g. evaluate min-over-ranks batches (see ``all_reduce_min``).
    lockstep_forward = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        from trainer.config import resolve_device

        kind = resolve_device(cfg)
        self.device = torch.device(f"cuda:{self.local_rank}" if kind == "cuda" else "cpu")
        self.guard = FirstStepGuard(cfg)
        # Each rank's loss is already divided by the *global* normalizer (methods.py), so the true
        # gradient is the sum over ranks. Data-parallel wrappers average instead; scaling the loss
        # by the world size turns their average back into that sum.
        self.loss_scale = 1.0

    # --- lifecycle -------------------------------------------------------------------------
    def setup(self) -> None:
        """Initialise process groups (no-op for one process)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def teardown(self) -> None:
        pass

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- model and optimizer ---------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, make_optimizer: OptimizerFactory) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Apply the strategy's passes to ``model`` and build its optimizer over trainable params."""
        from parallel.fp8 import maybe_apply_fp8

        maybe_apply_fp8(model, self.cfg)
        model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, make_optimizer(params)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The PEFT/HF module inside any wrapper (for saving, generation, engine sync)."""
        return getattr(model, "module", model)

    def no_sync(self, model: torch.nn.Module, is_last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip gradient communication on all but the last micro-batch of an accumulation window."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, model: torch.nn.Module) -> None:
        self.guard.observe_loss(loss)
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
        self.guard.observe_grad_norm(norm)
        return norm

    def optimizer_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.guard.check(self.rank)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # --- collectives -------------------------------------------------------------------------
    def all_reduce_sum(self, value: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(value, dtype=torch.float64)

    def all_reduce_min(self, value: int | float) -> float:
        return float(value)

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    # --- checkpoints ---------------------------------------------------------------------------
    def save_state(self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer (and, for sharded strategies, model) state needed for an exact resume."""
        if self.is_main:
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=False))

    def save_pretrained(self, model: torch.nn.Module, directory: Path) -> None:
        """A consolidated HF export: PEFT adapter dir for LoRA runs, full safetensors otherwise."""
        if self.is_main:
            self.unwrap(model).save_pretrained(directory, safe_serialization=True)

    def load_model_weights(self, model: torch.nn.Module, directory: Path) -> None:
        """Restore trainable weights saved by ``save_pretrained`` (used on resume)."""
        load_trainable_weights(self.unwrap(model), directory)


class TrainingBrokenError(RuntimeError):
    """The first optimizer step shows a model that cannot train (NaN loss/gradients, or all zero)."""


class FirstStepGuard:
    """Refuses to take the first optimizer step when the loss or gradient norm says training is broken.

    Some combinations fail silently elsewhere: FSDP with an NF4 base whose ``quant_storage`` does not
    match the sharded dtype trains with ``loss=0.0, grad_norm=nan`` and no error. One host sync on
    the first step is cheap; later steps are not checked (a NaN later is divergence, not setup).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.losses: list[float] = []
        self.grad_norm: float | None = None
        self.done = False

    def observe_loss(self, loss: torch.Tensor) -> None:
        if not self.done:
            self.losses.append(float(loss.detach()))

    def observe_grad_norm(self, norm: float) -> None:
        if not self.done:
            self.grad_norm = norm

    def check(self, rank: int = 0) -> None:
        if self.done:
            return
        self.done = True
        import math

        # An exactly-zero cross-entropy/preference loss cannot come from finite logits; a policy-gradient
        # surrogate (GRPO) is legitimately 0 on its first on-policy batch, so only likelihood losses count.
        zero_is_broken = self.cfg.train.method in ("sft", "dpo", "distill")
        all_zero = bool(self.losses) and all(x == 0.0 for x in self.losses)
        bad_loss = any(not math.isfinite(x) for x in self.losses) or (zero_is_broken and all_zero)
        bad_norm = self.grad_norm is not None and not math.isfinite(self.grad_norm)
        if bad_loss or bad_norm:
            c = self.cfg
            setup = f"parallel.strategy={c.parallel.strategy}, precision={c.precision}, lora.enabled={c.lora.enabled}"
            if c.quant.load_in_4bit:
                setup += f", quant.load_in_4bit=true, quant.quant_storage={c.quant.quant_storage}"
            loss = self.losses[0] if self.losses else float("nan")
            raise TrainingBrokenError(
                f"rank {rank}: first step has loss={loss:.4g}, grad_norm={self.grad_norm} - the model cannot train "
                f"with {setup}; stopping before the optimizer corrupts the weights"
            )


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def to_peft_fqns(adapter_state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapter-file keys (``...q_proj.lora_A.weight``) -> the live model's (``...q_proj.lora_A.default.weight``)."""
    names = {n for n, _ in model.named_parameters()}
    adapter = next(iter(model.peft_config))
    out = {}
    for key, value in adapter_state.items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.{adapter}.weight")
        if key not in names:
            raise RuntimeError(f"adapter weight {key!r} does not fit the model")
        out[key] = value
    return out


def load_trainable_weights(model: torch.nn.Module, directory: Path) -> None:
    state = read_safetensors_dir(directory)
    if is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if bad:
            raise RuntimeError(f"adapter weights in {directory} do not fit the model: {bad[:3]}")
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights in {directory} do not fit the model: missing={missing[:3]} unexpected={unexpected[:3]}")


_REGISTRY: dict[str, str] = {
    "single": "parallel.base:Strategy",
    "ddp": "parallel.ddp:DDPStrategy",
    "fsdp2": "parallel.fsdp2:FSDP2Strategy",
    "zero1": "parallel.zero:ZeroStrategy",
    "zero2": "parallel.zero:ZeroStrategy",
    "zero3": "parallel.zero:ZeroStrategy",
}


def build_strategy(cfg) -> Strategy:
    import importlib

    module, cls = _REGISTRY[cfg.parallel.strategy].split(":")
    strategy = getattr(importlib.import_module(module), cls)(cfg)
    return strategy


def iter_trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
