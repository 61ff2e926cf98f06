"""Student-before, student-after and teacher, through the engine: perplexity, arithmetic accuracy, agreement.

- perplexity: exp of the mean negative log-prob of the trained tokens of held-out examples;
- arithmetic accuracy: greedy answers to held-out ``trainer.tasks`` problems, checked exactly;
- teacher agreement: the teacher writes greedy continuations of held-out prompts; each model reads
  them teacher-forced and we count the positions where its top-1 token is the teacher's token.
"""
from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Sequence

from trainer import tasks

IGNORE = -100
EVAL_SEED = 991  # arithmetic problems from a stream no training source uses


def prompt_of(example) -> list[int]:
    """The tokens before the first trained one (for chat rows: up to the assistant header)."""
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))
    return list(example.input_ids[:first])


def _top1(position: dict[int, float]) -> int:
    return max(position, key=position.get)


def measure(llm, held_out: Sequence, teacher_tokens: list[list[int]], prompts: list[list[int]], problems, max_new_tokens: int) -> dict[str, float]:
    """The three metrics for the model loaded in ``llm``."""
    from engine import SamplingParams

    nll, count = 0.0, 0
    for example, logps in zip(held_out, llm.score([list(e.input_ids) for e in held_out])):
        for label, lp in zip(example.labels[1:], logps[1:]):
            if label != IGNORE:
                nll, count = nll - lp, count + 1
    agree, total = 0, 0
    forced = [p + t for p, t in zip(prompts, teacher_tokens) if t]
    outs = llm.generate(forced, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
    for out, prompt, tokens in zip(outs, [p for p, t in zip(prompts, teacher_tokens) if t], [t for t in teacher_tokens if t]):
        for pos, token in enumerate(tokens, start=len(prompt)):
            agree += _top1(out.prompt_logprobs[pos]) == token
            total += 1
    answers = llm.chat([p.messages for p in problems], SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
    correct = sum(tasks.is_correct(a.outputs[0].text if a.outputs else "", p.answer) for a, p in zip(answers, problems))
    return {
        "perplexity": math.exp(nll / max(count, 1)),
        "arithmetic_accuracy": correct / max(len(problems), 1),
        "teacher_agreement": agree / max(total, 1),
    }


def compare(cfg, models: dict[str, dict], held_out: Sequence, out_dir: str | Path, console=None) -> dict[str, dict[str, float]]:
    """Metrics for each ``name -> LLM kwargs`` (``{"model": dir}``, plus ``adapter`` for LoRA students; one
    must be ``teacher``), a rich table, a PNG and a JSON."""
    from rich.console import Console

    from distill.synth import engine_options
    from engine import LLM, SamplingParams

    console = console or Console()
    d = cfg.distill
    held_out = list(held_out)[: d.eval_num_texts]
    prompts = [prompt_of(e) for e in held_out]
    problems = tasks.generate(d.eval_num_problems, seed=EVAL_SEED, difficulty=cfg.data.difficulty)
    opts = engine_options(cfg)

    teacher = LLM(**{**opts, **models["teacher"]})
    greedy = SamplingParams(max_tokens=d.eval_max_new_tokens, temperature=0.0)
    teacher_tokens = [o.outputs[0].token_ids if o.outputs else [] for o in teacher.generate(prompts, greedy)]
    results: dict[str, dict[str, float]] = {}
    with console.status("[bold]distill: evaluating") as status:
        for name, kwargs in models.items():
            status.update(f"[bold]distill: evaluating {name}")
            llm = teacher if name == "teacher" else LLM(**{**opts, **kwargs})
            results[name] = measure(llm, held_out, teacher_tokens, prompts, problems, d.eval_max_new_tokens)
            if llm is not teacher:
                del llm
                gc.collect()
    del teacher
    gc.collect()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_eval.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "distill_eval.png")
    console.print(table(results, out / "distill_eval.png"))
    return results


def table(results: dict[str, dict[str, float]], png: Path):
    from rich.table import Table

    t = Table(title=f"distillation: student vs teacher ({png})")
    t.add_column("model")
    t.add_column("perplexity ↓", justify="right")
    t.add_column("arithmetic acc ↑", justify="right")
    t.add_column("teacher agreement ↑", justify="right")
    for name, m in results.items():
        t.add_row(name, f"{m['perplexity']:.2f}", f"{m['arithmetic_accuracy']:.1%}", f"{m['teacher_agreement']:.1%}")
    return t


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, title) in zip(axes, [("perplexity", "held-out perplexity (lower is better)"),
                                       ("arithmetic_accuracy", "arithmetic accuracy"), ("teacher_agreement", "top-1 agreement with teacher")]):
        values = [results[n][key] for n in names]
        bars = ax.bar(names, values, color=["#9e9e9e", "#1f77b4", "#2ca02c"][: len(names)])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_title(title, fontsize=10)
        if key == "perplexity":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(history: list[dict], path: Path) -> None:
    """KD and CE per step (the loop's history), so a run shows whether the student is still converging."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "kd", "ce", "val_loss", "val_kd") if any(k in h for h in history)]
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in keys:
        points = [(h.get("step", i), h[key]) for i, h in enumerate(history) if key in h]
        ax.plot(*zip(*points), label=key, marker="o" if key.startswith("val") else None)
    ax.set_xlabel("step")
    ax.set_title("distillation training", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
