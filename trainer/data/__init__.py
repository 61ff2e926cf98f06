"""Training data: ``build_examples(cfg, tokenizer) -> (train, val)`` and the ``PackedLoader`` over them.

    train, val = build_examples(cfg, tokenizer)
    loader = PackedLoader(train, cfg.train.micro_batch_size, cfg.train.seq_len, cfg.data.packing,
                          seed=cfg.seed, shuffle=cfg.data.shuffle, rank=rank, world_size=world_size,
                          pad_id=tokenizer.pad_token_id)
    batch = next(loader)                      # input_ids / labels / position_ids, LongTensor [B, T]
    out = model(**model_inputs(batch))        # use_cache=False: required for packed rows, see packing.py

Sources (``sources.py``) give rows; formats (``formats.py``) turn rows into ``Example``s with loss
masks; the template check (``template_check.py``) vets chat masks at start-up; ``packing.py`` makes
micro-batches.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from trainer.config import Config, ConfigError
from trainer.data.formats import IGNORE, EncodeStats, Encoder, Example, RowError, TemplateError, detect_format, validate_chat
from trainer.data.packing import PackedLoader, collate, iter_eval_batches, model_inputs, pack_bfd
from trainer.data.sources import load_rows
from trainer.data.template_check import check_chat_template

__all__ = [
    "IGNORE", "DataReport", "Example", "PackedLoader", "RowError", "TemplateError", "build_examples", "check_chat_template",
    "collate", "iter_eval_batches", "load_examples", "model_inputs", "pack_bfd",
]
CHUNK_ROWS = 2048  # rows tokenized per batch call (progress granularity for large sources)


@dataclass
class DataReport:
    source: str
    format: str
    train: list[Example]
    val: list[Example]
    stats: EncodeStats
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return sum(self.stats.skipped.values())

    def table(self) -> Table:
        examples = self.train + self.val
        tokens = sum(len(e) for e in examples)
        trained = sum(e.num_trained for e in examples)
        t = Table(title="data", show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column()
        skipped = ", ".join(f"{n} {kind}" for kind, n in self.stats.skipped.most_common())
        rows = [
            ("source", f"{self.source} ({self.format})"),
            ("rows", f"{self.stats.rows:,}" + (f" ({self.skipped:,} skipped: {skipped})" if self.skipped else "")),
            ("examples", f"{len(self.train):,} train / {len(self.val):,} val"),
            ("tokens", f"{tokens:,} ({trained:,} trained, mean length {tokens / max(1, len(examples)):.0f})"),
        ]
        if self.stats.windows:
            rows.append(("text windows", f"{self.stats.windows:,}"))
        if self.stats.truncated or self.stats.dropped_too_long:
            rows.append(("over seq_len", f"{self.stats.truncated:,} truncated (tail cut), {self.stats.dropped_too_long:,} dropped (nothing trained in the head)"))
        rows.append(("time", f"{self.seconds:.2f}s"))
        for k, v in rows:
            t.add_row(k, v)
        return t


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def load_examples(cfg: Config, tokenizer, console: Console | None = None) -> DataReport:
    """Everything ``build_examples`` does, plus the counts (skipped rows by reason, truncations)."""
    start = time.perf_counter()
    data = cfg.data
    console = console if console is not None else (Console() if _is_main_process() else None)
    rows, native = load_rows(data, cfg.seed)
    if not rows:
        raise ConfigError(f"data.source={data.source!r} has no rows")
    columns = sorted({k for row in rows for k in row})
    fmt = native if data.format == "auto" and native else detect_format(columns, data.format, data.text_field, data.chat_field)
    if native and fmt != native:
        raise ConfigError(f"data.format={data.format} does not fit data.source={data.source}, which is {native} data")
    if fmt == "chat" or (fmt == "prompt_completion" and isinstance(rows[0].get("prompt"), list)):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{fmt} data needs a tokenizer with a chat template; {tokenizer.name_or_path!r} has none (model.tokenizer)")
    if fmt == "chat" and data.template_check:
        _template_check_first_valid(rows, data, tokenizer, console)

    encoder = Encoder(tokenizer, fmt, cfg.train.seq_len, data.text_field, data.chat_field, data.stop_token,
                      strict_template=data.template_check, on_error=data.on_error)
    examples = []
    for offset in _progress(range(0, len(rows), CHUNK_ROWS), len(rows), console):
        examples += encoder.encode(rows[offset : offset + CHUNK_ROWS], offset=offset)
    if not examples:
        reasons = ", ".join(f"{n} {k}" for k, n in encoder.stats.skipped.most_common()) or "all too long"
        raise ConfigError(f"data.source={data.source!r}: no usable examples in {len(rows)} rows ({reasons})")
    train, val = split_train_val(examples, data.val_fraction, cfg.seed, data.shuffle)
    report = DataReport(data.source, fmt, train, val, encoder.stats, time.perf_counter() - start)
    if console is not None:
        console.print(report.table())
    return report


def build_examples(cfg: Config, tokenizer) -> tuple[list[Example], list[Example]]:
    """The train and validation examples of ``cfg.data`` tokenized for ``cfg.train.seq_len`` (the contract)."""
    report = load_examples(cfg, tokenizer)
    return report.train, report.val


def split_train_val(examples: list[Example], val_fraction: float, seed: int, shuffle: bool = True) -> tuple[list[Example], list[Example]]:
    """A deterministic split: a seeded random subset is validation (the last ones when ``shuffle`` is off)."""
    n_val = round(len(examples) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(examples) > 1:
        n_val = 1  # a validation loss from one example beats none
    order = list(range(len(examples)))
    if shuffle:
        random.Random(f"split-{seed}").shuffle(order)
    val_idx = set(order[len(order) - n_val :])
    return [e for i, e in enumerate(examples) if i not in val_idx], [e for i, e in enumerate(examples) if i in val_idx]


def _template_check_first_valid(rows, data, tokenizer, console) -> None:
    for row in rows:
        try:
            validate_chat(row.get(data.chat_field))
        except RowError:
            continue  # bad rows are reported (or skipped) by the encoder with their index
        check_chat_template(tokenizer, row[data.chat_field], data.stop_token, console)
        return


def _progress(chunks: range, total_rows: int, console: Console | None):
    if console is None or total_rows <= 4 * CHUNK_ROWS:  # a couple of seconds at most: no bar
        yield from chunks
        return
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("tokenizing", total=total_rows)
        for offset in chunks:
            yield offset
            progress.update(task, completed=min(total_rows, offset + CHUNK_ROWS))
