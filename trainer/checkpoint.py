"""Checkpoints: atomic, pruned, exactly resumable.

Layout of ``<output_dir>/checkpoints/step-000010/``::

    model/              PEFT adapter (adapter_config.json + adapter_model.safetensors) or full HF
                        safetensors, plus the tokenizer: loadable on its own
    optimizer.pt        via the strategy (sharded strategies write their own files here)
    scheduler.pt
    method-rank{r}.pt   data position and method state, per rank
    rng-rank{r}.pt      python / numpy / torch / cuda generator states, per rank
    config.yaml         the resolved config
    trainer_state.json  step, tokens, ... (written last: a directory without it is incomplete)

Everything is written to ``checkpoints/.tmp-step-000010`` and renamed into place, so a crash
mid-save never leaves a half checkpoint that ``resume=auto`` would pick up.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import Config, ConfigError, save_config

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(cfg: Config) -> Path | None:
    """``resume=auto``: the latest checkpoint in ``output_dir`` (None: start fresh); ``resume=<dir>``:
    that checkpoint, or the latest one of that run directory."""
    if not cfg.resume or cfg.resume in ("none", "false", "False"):
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(Path(cfg.output_dir))
        return found[-1] if found else None
    path = Path(cfg.resume).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise ConfigError(f"resume={cfg.resume!r} is neither a checkpoint (no {STATE_FILE}) nor a run directory with checkpoints")


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores the full training state through the strategy (so sharding slots in)."""

    def __init__(self, cfg: Config, strategy, tokenizer):
        self.cfg, self.strategy, self.tokenizer = cfg, strategy, tokenizer
        self.output_dir = Path(cfg.output_dir)
        self.root = self.output_dir / "checkpoints"

    def save(self, step: int, *, model, optimizer, scheduler, method, trainer_state: dict[str, Any]) -> Path:
        s = self.strategy
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if s.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        s.barrier()
        self.save_model(model, tmp / "model")
        s.save_state(tmp, model, optimizer)
        torch.save(method.state_dict(), tmp / f"method-rank{s.rank}.pt")
        torch.save(rng_state(), tmp / f"rng-rank{s.rank}.pt")
        if s.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            save_config(self.cfg, tmp)
        s.barrier()
        if s.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
            if final.exists():  # re-saving a step (e.g. the end of a run resumed at its last save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        s.barrier()
        return final

    def save_model(self, model, directory: Path) -> None:
        """The loadable model (adapter or full weights) plus the tokenizer, so the dir stands alone."""
        self.strategy.save_pretrained(model, directory)
        if self.strategy.is_main:
            self.tokenizer.save_pretrained(directory)

    def save_final(self, model) -> Path:
        """``<output_dir>/final``: the last model, replaced atomically."""
        final, tmp = self.output_dir / "final", self.output_dir / ".tmp-final"
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.strategy.barrier()
        self.save_model(model, tmp)
        self.strategy.barrier()
        if self.strategy.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.strategy.barrier()
        return final

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        if keep <= 0:
            return
        for old in list_checkpoints(self.output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, directory: Path, *, model, optimizer, scheduler, method) -> dict[str, Any]:
        """Restore everything ``save`` wrote; returns the trainer state. RNG is restored last."""
        s = self.strategy
        state = json.loads((directory / STATE_FILE).read_text())
        s.load_model_weights(model, directory / "model")
        s.load_state(directory, model, optimizer)
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
        method_file = directory / f"method-rank{s.rank}.pt"
        if not method_file.is_file():
            raise ConfigError(f"resume={directory}: no {method_file.name}; it was saved with fewer ranks than WORLD_SIZE={s.world_size}")
        method.load_state_dict(torch.load(method_file, weights_only=False))
        set_rng_state(torch.load(directory / f"rng-rank{s.rank}.pt", weights_only=False))
        return state
