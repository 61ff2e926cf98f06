"""Evaluate a checkpoint with the engine: ``python launch/eval.py model.path=<alias|dir> [key=value ...]``.

``model.path`` may be a model alias, an HF directory (a merged export included) or a PEFT adapter
directory (its base comes from ``adapter_config.json``); ``engine.adapter=<dir>`` merges an adapter
into ``model.path`` at load. Reports perplexity (``data.source=text:<file>`` for your own text;
otherwise reference solutions of held-out task problems) and greedy exact-match accuracy on
``eval.tasks`` (``eval.num_task_samples`` problems at ``data.difficulty``). Results go to
``<output_dir>/eval_results.json``. Exit codes: 0 done, 2 config error.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from trainer.config import ConfigError, load_config, resolve_device  # noqa: E402

USAGE = "usage: python launch/eval.py model.path=<alias|hf dir|adapter dir> [engine.adapter=<dir>] [eval.num_task_samples=N] ..."


def resolve_model_and_adapter(path: str, adapter: str | None) -> tuple[str, str | None]:
    """A PEFT adapter directory as model.path means: its base model plus the adapter."""
    p = Path(path).expanduser()
    config_file = p / "adapter_config.json"
    if config_file.is_file() and not (p / "config.json").is_file():
        if adapter:
            raise ConfigError(f"model.path={path!r} is an adapter directory; engine.adapter={adapter!r} cannot add a second one")
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"model.path={path!r}: adapter_config.json names no base_model_name_or_path")
        return base, str(p)
    return path, adapter


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    console = Console()
    try:
        cfg = load_config(argv)
        model_path, adapter = resolve_model_and_adapter(cfg.model.path, cfg.engine.adapter)
        unknown = [t for t in cfg.eval.tasks if t != "arithmetic"]
        if unknown:
            raise ConfigError(f"eval.tasks has {unknown}; built-in tasks: arithmetic")
        from trainer.models import resolve_model_path

        model_dir = resolve_model_path(model_path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import dataclasses

    from engine import LLM
    from engine.evaluate import default_texts, perplexity, read_texts, task_accuracy, write_results

    options = dataclasses.asdict(cfg.engine)
    dtype = options.pop("dtype")
    options["adapter"] = adapter
    start = time.perf_counter()
    with console.status(f"loading {model_dir}" + (f" + adapter {adapter}" if adapter else "")):
        try:
            llm = LLM(model_dir, dtype=dtype, device=resolve_device(cfg), **options)
        except ValueError as e:  # unsupported architecture, bad adapter, missing weights
            print(f"error: {e}", file=sys.stderr)
            return 2
    load_s = time.perf_counter() - start

    try:
        texts = read_texts(cfg.data.source) if cfg.data.source.startswith("text:") else \
            default_texts(llm, cfg.eval.num_task_samples, cfg.seed, cfg.data.difficulty)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console.print(f"[bold]perplexity[/] on {len(texts)} texts")
    t0 = time.perf_counter()
    ppl = perplexity(llm, texts)
    ppl_s = time.perf_counter() - t0
    results = {}
    for task in cfg.eval.tasks:
        console.print(f"[bold]{task}[/]: {cfg.eval.num_task_samples} problems, difficulty {cfg.data.difficulty}, greedy")
        t0 = time.perf_counter()
        results[task] = task_accuracy(llm, task, cfg.eval.num_task_samples, cfg.seed, cfg.data.difficulty)
        results[task]["seconds"] = time.perf_counter() - t0

    table = Table(title=f"eval: {cfg.model.path}" + (f" + {adapter}" if adapter else ""))
    for col in ("metric", "value", "detail"):
        table.add_column(col)
    table.add_row("perplexity", f"{ppl['perplexity']:.3f}", f"{ppl['tokens']} tokens, {ppl_s:.1f}s")
    for task, r in results.items():
        table.add_row(f"{task} accuracy", f"{r['accuracy']:.1%}", f"{r['correct']}/{r['total']} exact match, {r['seconds']:.1f}s")
    stats = llm.stats()
    table.add_row("engine", llm.engine.device.type, f"{str(llm.engine.dtype).removeprefix('torch.')}, load {load_s:.1f}s, "
                  f"prefix hits {stats['prefix_hits']}/{stats['prefix_queries']} tokens, preemptions {stats['preemptions']}")
    console.print(table)
    for task, r in results.items():  # a few completions make a score interpretable
        for s in r["samples"][:3]:
            mark = "[green]✓[/]" if s["correct"] else "[red]✗[/]"
            console.print(f"  {mark} {s['question']} → {s['completion']!r} (answer {s['answer']})")

    metrics = {"perplexity": ppl["perplexity"], **{f"{t}_accuracy": r["accuracy"] for t, r in results.items()}}
    out = write_results(Path(cfg.output_dir) / "eval_results.json", metrics,
                        {"model": cfg.model.path, "adapter": adapter, "perplexity": ppl, "tasks": results})
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
