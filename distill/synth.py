"""Synthetic data, self-instruct style: seed tasks -> new instructions -> responses -> filters -> JSONL.

The teacher runs on our engine. Two streams feed the dataset:
- open-ended: the teacher is shown a few seed instructions and invents a new one, then answers it;
- verifiable: arithmetic problems from ``trainer.tasks`` answered by the teacher and checked.
Rows that fail a filter are counted by reason; every kept row carries its lineage (teacher,
template, sampling parameters, seed, source) so a dataset can always be traced and re-made.
The output loads with ``data.source=<synth.output>`` (chat rows under ``messages``).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distill.filters import ExactDedup, MinHashDedup, length_reason, parse_judge_score, verify_reason
from trainer import tasks
from trainer.config import ConfigError

BUILTIN_SEEDS = [
    "Explain why the sky looks blue during the day.",
    "Give three tips for staying focused while studying.",
    "Write a short poem about the ocean at night.",
    "Summarize the water cycle in two sentences.",
    "What is the difference between weather and climate?",
    "Suggest a name for a bakery that sells only bread.",
    "List four fruits that are high in vitamin C.",
    "Describe how to make a cup of tea step by step.",
    "Rewrite this sentence to sound more polite: Give me the report now.",
    "Why do cats purr?",
    "Write a friendly reminder message about a team meeting tomorrow.",
    "Explain what a noun is to a ten-year-old.",
    "Give an example of a renewable energy source and explain how it works.",
    "What are two benefits of regular exercise?",
    "Translate 'good morning' into French and Spanish.",
    "Describe the taste of a lemon to someone who has never had one.",
    "Write a one-sentence story about a lost umbrella.",
    "How many days are there in a leap year, and why?",
    "Name three planets in our solar system and one fact about each.",
    "Suggest a healthy breakfast that takes five minutes to prepare.",
]

TEMPLATES = {
    "self_instruct_v1": (
        "Here are some example tasks for an AI assistant:\n{examples}\n"
        "Write one new task that is different from all of the examples. Reply with the task only."
    ),
    "judge_v1": (
        "Rate how well the response answers the task, from 1 (useless) to 5 (excellent).\n"
        "Task: {instruction}\nResponse: {response}\nReply with one digit."
    ),
}

Generate = Callable[[list[list[dict[str, str]]], list[dict[str, Any]]], list[str]]


@dataclass
class Row:
    messages: list[dict[str, str]]  # prompt messages (system/user) before the answer
    kind: str  # instruction | arithmetic
    template: str
    answer: str | None = None  # the verifiable answer (arithmetic)
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def instruction(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Report:
    generated: Counter = field(default_factory=Counter)  # kind -> candidates produced by the teacher
    kept: Counter = field(default_factory=Counter)  # kind -> rows written
    dropped: Counter = field(default_factory=Counter)  # reason -> rows dropped
    real_rows: int = 0
    output: str = ""


# --------------------------------------------------------------------------------------------
# The teacher behind a chat -> text function (the engine in production, any callable in tests)
# --------------------------------------------------------------------------------------------
def engine_generate(llm) -> Generate:
    """Chats -> completions through the engine, one seeded SamplingParams per request."""
    from engine import SamplingParams

    def generate(chats: list[list[dict[str, str]]], sampling: list[dict[str, Any]]) -> list[str]:
        outputs = llm.chat(chats, [SamplingParams(**s) for s in sampling])
        return [o.outputs[0].text if o.outputs else "" for o in outputs]  # a failed request yields "" -> too_short

    return generate


def load_seeds(spec: str) -> list[str]:
    if spec == "builtin":
        return list(BUILTIN_SEEDS)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"synth.seeds={spec!r} is neither 'builtin' nor a file")
    seeds = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            row = json.loads(line)
            if "instruction" not in row:
                raise ConfigError(f"synth.seeds={spec}: line {i} has no 'instruction' field")
            line = row["instruction"]
        seeds.append(line)
    if len(seeds) < 2:
        raise ConfigError(f"synth.seeds={spec} holds {len(seeds)} seed instructions; self-instruct needs at least 2")
    return seeds


def clean_instruction(text: str) -> str:
    """The first non-empty line, without list numbering or a 'Task:' label the teacher may add."""
    for line in text.strip().splitlines():
        line = line.strip().lstrip("-*0123456789.) ").strip()
        if line.lower().startswith("task:"):
            line = line[5:].strip()
        if line:
            return line.strip('"')
    return ""


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
def synthesize(cfg, generate: Generate, teacher_name: str, progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[list[dict], Report]:
    """Teacher-written rows (filtered, with lineage) mixed with real ones, and the yield report.

    ``progress(done, more_total)`` is told about each finished batch and each stage's size.
    """
    s = cfg.synth
    rng = random.Random(f"synth-{s.seed}")
    report = Report()
    exact = ExactDedup()
    near = MinHashDedup(s.near_dup_threshold, s.ngram, s.num_perm, s.seed)

    def sampling(temperature: float, max_tokens: int, index: int) -> dict[str, Any]:
        return {"temperature": temperature, "top_p": s.top_p, "max_tokens": max_tokens, "seed": s.seed * 1_000_003 + index}

    def batched(items: list, fn: Callable[[list], list]) -> list:
        out = []
        progress(0, len(items))
        for i in range(0, len(items), s.batch_size):
            out += fn(items[i : i + s.batch_size])
            progress(len(items[i : i + s.batch_size]), 0)
        return out

    # 1. instructions: few-shot prompts over random seed subsets
    seeds = load_seeds(s.seeds)
    shown = [rng.sample(seeds, min(s.examples_per_prompt, len(seeds))) for _ in range(s.num_instructions)]
    chats = [[{"role": "user", "content": TEMPLATES["self_instruct_v1"].format(examples="\n".join(f"{j + 1}. {e}" for j, e in enumerate(ex)))}] for ex in shown]
    params = [sampling(s.instruction_temperature, s.max_instruction_tokens, i) for i in range(len(chats))]
    texts = batched(list(range(len(chats))), lambda idx: generate([chats[i] for i in idx], [params[i] for i in idx]))
    candidates: list[Row] = []
    for i, text in enumerate(texts):
        report.generated["instruction"] += 1
        instruction = clean_instruction(text)
        reason = length_reason(instruction, s.min_instruction_chars, s.max_instruction_chars) or exact.reason(instruction) or near.reason(instruction)
        if reason:
            report.dropped[reason] += 1
            continue
        lineage = {"instruction_template": "self_instruct_v1", "instruction_sampling": params[i], "seed_examples": shown[i]}
        candidates.append(Row([{"role": "user", "content": instruction}], "instruction", "respond_v1", lineage=lineage))

    # 2. verifiable tasks: exact duplicates only (arithmetic questions differ in their numbers alone)
    for p in tasks.generate(s.num_arithmetic, seed=s.seed, difficulty=s.arithmetic_difficulty):
        report.generated["arithmetic"] += 1
        if reason := exact.reason(p.question):
            report.dropped[reason] += 1
            continue
        candidates.append(Row(p.messages, "arithmetic", "arithmetic_v1", answer=p.answer, lineage={"task": "arithmetic", "difficulty": s.arithmetic_difficulty}))

    # 3. responses, then response-level filters
    params = [sampling(s.response_temperature, s.max_response_tokens, 10_000_000 + i) for i in range(len(candidates))]
    responses = batched(list(range(len(candidates))), lambda idx: generate([candidates[i].messages for i in idx], [params[i] for i in idx]))
    kept: list[tuple[Row, str, dict]] = []
    for row, response, p in zip(candidates, responses, params):
        response = response.strip()
        reason = length_reason(response, s.min_response_chars, s.max_response_chars) or verify_reason(response, row.answer)
        if reason:
            report.dropped[reason] += 1
            continue
        kept.append((row, response, p))

    # 4. optional judge: the teacher grades each answer
    if s.judge and kept:
        chats = [[{"role": "user", "content": TEMPLATES["judge_v1"].format(instruction=r.instruction, response=resp)}] for r, resp, _ in kept]
        verdicts = batched(list(range(len(chats))), lambda idx: generate([chats[i] for i in idx], [sampling(0.0, 4, 0) for _ in idx]))
        graded = []
        for (row, response, p), verdict in zip(kept, verdicts):
            score = parse_judge_score(verdict)
            if score is None or score < s.judge_min_score:
                report.dropped["judge"] += 1
                continue
            row.lineage["judge_score"] = score
            graded.append((row, response, p))
        kept = graded

    rows = []
    for row, response, p in kept:
        report.kept[row.kind] += 1
        lineage = {"source": "synthetic", "teacher": teacher_name, "kind": row.kind, "template": row.template,
                   "sampling": p, "seed": s.seed, "verified": row.answer is not None, **row.lineage}
        rows.append({"messages": row.messages + [{"role": "assistant", "content": response}], "lineage": lineage})

    # 5. mix with real data
    if s.real_fraction > 0 and rows:
        real = real_rows(s.real_source, round(len(rows) * s.real_fraction / (1 - s.real_fraction)), s.seed)
        report.real_rows = len(real)
        rows += real
        rng.shuffle(rows)
    return rows, report


def real_rows(source: str, n: int, seed: int) -> list[dict]:
    """``n`` real chat rows (arithmetic with reference answers, or a JSONL file of chat rows) with lineage."""
    if source == "arithmetic":
        problems = tasks.generate(n, seed=seed + 7919, difficulty=1)  # another stream than the synthetic questions
        return [{"messages": p.chat(), "lineage": {"source": "real:arithmetic", "seed": seed}} for p in problems]
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"synth.real_source={source!r} is neither 'arithmetic' nor a JSONL file")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bad = next((i for i, r in enumerate(rows, 1) if "messages" not in r), None)
    if bad is not None:
        raise ConfigError(f"synth.real_source={source}: line {bad} has no 'messages' field")
    random.Random(seed).shuffle(rows)
    return [{"messages": r["messages"], "lineage": {**r.get("lineage", {}), "source": f"real:{path.name}", "seed": seed}} for r in rows[:n]]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Atomic write: a half-written dataset never looks like a finished one (setup checks existence)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def report_table(report: Report):
    from rich.table import Table

    table = Table(title=f"synthetic data yield -> {report.output}")
    table.add_column("")
    table.add_column("rows", justify="right")
    for kind, n in sorted(report.generated.items()):
        table.add_row(f"generated: {kind}", str(n))
    for reason, n in sorted(report.dropped.items()):
        table.add_row(f"dropped: {reason}", str(n))
    for kind, n in sorted(report.kept.items()):
        table.add_row(f"kept: {kind}", str(n))
    if report.real_rows:
        table.add_row("real rows mixed in", str(report.real_rows))
    generated = sum(report.generated.values())
    table.add_row("yield", f"{sum(report.kept.values()) / max(generated, 1):.0%}", style="bold")
    return table


def run_generation(cfg, console=None) -> Report:
    """Load the teacher into the engine, synthesize with a progress bar, write the JSONL, print the table."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from engine import LLM
    from trainer.models import resolve_model_path

    console = console or Console()
    teacher = cfg.synth.teacher or cfg.distill.teacher
    llm = LLM(model=resolve_model_path(teacher), **engine_options(cfg))
    s = cfg.synth
    with Progress(TextColumn("[bold]synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        task, total = bar.add_task("generate", total=0), [0]

        def progress(done: int, more: int) -> None:
            total[0] += more
            bar.update(task, advance=done, total=total[0])

        rows, report = synthesize(cfg, engine_generate(llm), teacher, progress)
    report.output = str(write_jsonl(rows, s.output))
    summary = {"generated": dict(report.generated), "kept": dict(report.kept), "dropped": dict(report.dropped), "real_rows": report.real_rows}
    Path(s.output).with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    console.print(report_table(report))
    return report


def engine_options(cfg) -> dict[str, Any]:
    """The engine section as LLM keyword arguments; its adapter belongs to the trained model, not to a teacher."""
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(cfg.engine).items() if k != "adapter"}
