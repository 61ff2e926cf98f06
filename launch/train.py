"""Train: ``[torchrun --nproc_per_node=N] python launch/train.py config=qlora.yaml key=value ...``

parse argv → load_config → (dry_run: print the resolved config and a per-device memory estimate,
exit) → Trainer(cfg).train(). Works from the repo root without installing (the repo root is put
on sys.path) and as ``crucible-train`` after ``pip install -e .``. torchrun's RANK / WORLD_SIZE /
LOCAL_RANK are read by the strategy (``parallel.base.build_strategy``).

Exit codes: 0 done, 2 config error (one line, no traceback), 1 the run stopped (e.g. NaN loss).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.syntax import Syntax  # noqa: E402

from trainer.config import Config, ConfigError, dump_yaml, load_config  # noqa: E402

USAGE = "usage: [torchrun --nproc_per_node=N] python launch/train.py config=<name>.yaml [key=value ...] [dry_run=true]"


def dry_run(cfg: Config, console: Console) -> None:
    """The resolved config and the estimated peak memory per device; loads no weights."""
    console.print(Syntax(dump_yaml(cfg), "yaml", theme="ansi_dark", background_color="default"))
    from trainer.memory import estimate_memory
    from trainer.models import model_config

    estimate = estimate_memory(cfg, model_config(cfg.model), int(os.environ.get("WORLD_SIZE", 1)))
    console.print(estimate.rich_table())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    try:
        cfg = load_config(argv)
        if cfg.dry_run:
            if int(os.environ.get("RANK", 0)) == 0:
                dry_run(cfg, Console())
            return 0
        from trainer.trainer import Trainer, TrainingError

        try:
            Trainer(cfg, console=console).train()
        except TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
