"""Preview what a config trains on: ``python -m trainer.data [config=X.yaml] data.source=chat train.seq_len=512``.

Runs the template check (one highlighted sample), builds the examples, and prints the data summary
plus how well they pack, without loading a model.
"""
from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from trainer.config import ConfigError, load_config
from trainer.data import PackedLoader, load_examples
from trainer.models import load_tokenizer


def main(argv: list[str]) -> int:
    console = Console()
    try:
        cfg = load_config(argv)
        report = load_examples(cfg, load_tokenizer(cfg.model), console=console)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    table = Table(title="packing", show_header=False, title_justify="left")
    for packing in (True, False):
        loader = PackedLoader(report.train, cfg.train.micro_batch_size, cfg.train.seq_len, packing=packing, seed=cfg.seed)
        table.add_row(f"packing={str(packing).lower()}", f"{loader.rows_per_epoch:,} rows of {cfg.train.seq_len} per epoch, "
                      f"{loader.fill:.1%} real tokens (the rest padding)")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
