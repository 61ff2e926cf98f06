"""Synthetic data from a teacher on our engine: ``python launch/generate.py config=synth.yaml [synth.key=value ...]``.

Self-instruct: seed tasks -> new instructions -> responses, then length / duplicate / near-duplicate /
verifier (/ judge) filters, lineage on every row, optional mix with real data. Writes
``synth.output`` (JSONL chat rows, ``data.source=<that path>`` trains on it) and a summary JSON
beside it, and prints the yield by reason.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from trainer.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console()
    try:
        cfg = load_config(argv, default_config="synth.yaml")
        from distill.synth import run_generation

        report = run_generation(cfg, console)
    except ConfigError as e:
        console.print(f"error: {e}", markup=False, highlight=False)
        return 2
    return 0 if sum(report.kept.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
