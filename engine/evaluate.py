"""Checkpoint evaluation with the engine: perplexity on a text set, exact-match accuracy on tasks.

Trainer hooks (``eval.engine_eval=true``): ``evaluate_model(model, cfg)`` for the live model (its
weights, PEFT adapters merged, are pushed into a cached engine) and ``evaluate_checkpoint(dir, cfg)``
for a saved one. ``launch/eval.py`` is the command line. Decoding is greedy, so results are deterministic.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from engine.llm import LLM
from engine.sampling_params import SamplingParams

TASKS = ("arithmetic",)


def perplexity(llm: LLM, texts: list[str]) -> dict[str, float]:
    """Token-level perplexity of ``texts`` (each cut to the model's context); the first token is not scored."""
    limit = llm.engine.max_model_len - 1
    ids = [llm.tokenizer.encode(t)[:limit] for t in texts]
    ids = [x for x in ids if len(x) >= 2]
    if not ids:
        raise ValueError("perplexity: no text of at least two tokens to score")
    nll, count = 0.0, 0
    for scores in llm.score(ids):
        nll -= sum(s for s in scores[1:])
        count += len(scores) - 1
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def task_accuracy(llm: LLM, task: str = "arithmetic", num_samples: int = 64, seed: int = 0, difficulty: int = 1,
                  max_tokens: int = 16) -> dict:
    """Greedy exact-match accuracy on a built-in verifiable task (``trainer.tasks``)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not a built-in task; choose one of: {', '.join(TASKS)}")
    from trainer import tasks

    problems = tasks.generate(num_samples, seed=seed, difficulty=difficulty)
    outputs = llm.chat([p.messages for p in problems], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    samples = [{"question": p.question, "answer": p.answer, "completion": o.outputs[0].text,
                "correct": tasks.is_correct(o.outputs[0].text, p.answer)} for p, o in zip(problems, outputs)]
    correct = sum(s["correct"] for s in samples)
    return {"accuracy": correct / len(samples), "correct": correct, "total": len(samples), "samples": samples}


def default_texts(llm: LLM, num_samples: int, seed: int, difficulty: int) -> list[str]:
    """Without a text file: the reference solutions of held-out task problems, in the chat template."""
    from trainer import tasks

    problems = tasks.generate(num_samples, seed=seed + 1, difficulty=difficulty)
    return [llm.tokenizer.apply_chat_template(p.chat(), tokenize=False) for p in problems]


def read_texts(source: str) -> list[str]:
    """``text:<file>``: paragraphs (blank-line separated) of a UTF-8 file."""
    path = Path(source.removeprefix("text:"))
    if not path.is_file():
        raise ValueError(f"data.source={source!r}: {path} is not a file")
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def evaluate_llm(llm: LLM, cfg) -> dict[str, float]:
    """Metrics of an already-loaded engine under config ``cfg`` (eval.*, data.source/difficulty, seed)."""
    texts = read_texts(cfg.data.source) if cfg.data.source.startswith("text:") else \
        default_texts(llm, cfg.eval.num_task_samples, cfg.seed, cfg.data.difficulty)
    metrics = {f"eval/{k}": v for k, v in perplexity(llm, texts).items()}
    for task in cfg.eval.tasks:
        result = task_accuracy(llm, task, cfg.eval.num_task_samples, cfg.seed, cfg.data.difficulty)
        metrics[f"eval/{task}_accuracy"] = result["accuracy"]
    return metrics


def evaluate_checkpoint(model_path: str, cfg, adapter: str | None = None, device: str | None = None) -> dict[str, float]:
    """The trainer's eval hook: load ``model_path`` (HF dir; ``adapter`` merged in) with ``cfg.engine``
    options, evaluate, and release the engine. Returns ``{"eval/perplexity": ..., "eval/arithmetic_accuracy": ...}``."""
    options = dataclasses.asdict(cfg.engine)
    options["adapter"] = adapter or options.get("adapter")
    dtype = options.pop("dtype")
    llm = LLM(model_path, dtype=dtype, device=device, **options)
    try:
        return evaluate_llm(llm, cfg)
    finally:
        del llm


_ENGINES: dict[str, LLM] = {}  # one engine per base model, reused across eval steps


def evaluate_model(model, cfg, device: str | None = None) -> dict[str, float]:
    """The trainer's in-training hook: evaluate the live (plain or PEFT-wrapped, unsharded, not 4-bit)
    model. The first call builds an engine from ``cfg.model.path``; every call syncs the weights."""
    from trainer.models import resolve_model_path

    path = resolve_model_path(cfg.model.path)
    if path not in _ENGINES:
        options = dataclasses.asdict(cfg.engine)
        dtype = options.pop("dtype")
        options["adapter"] = None  # the live weights already hold the adapter
        _ENGINES[path] = LLM(path, dtype=dtype, device=device, **options)
    llm = _ENGINES[path]
    sync_weights(llm, model)
    return evaluate_llm(llm, cfg)


def sync_weights(llm: LLM, model) -> int:
    """Push a training model's weights into the engine; PEFT adapters are merged for the copy and unmerged after."""
    is_peft = hasattr(model, "merge_adapter")
    if is_peft:
        model.merge_adapter()
    try:
        state = model.state_dict()
        return llm.update_weights((name, t.detach()) for name, t in state.items() if ".lora_" not in name)
    finally:
        if is_peft:
            model.unmerge_adapter()


def write_results(path: str | Path, metrics: dict, details: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": metrics, **(details or {})}, indent=2))
    return path
