"""DPO step time and peak memory: crucible's DPO method against TRL ``DPOTrainer``.

Same model (random init of a named shape, identical weights), same preference pairs (arithmetic
prompts with a right and a wrong answer, padded out to ``--completion-tokens``), same LoRA config,
beta, batch and optimizer settings; the reference is the LoRA-disabled base on both sides. TRL's
``DPOConfig`` checkpoints activations by default (``gradient_checkpointing=True``), so side ``ours``
does too (``train.activation_checkpointing=full``); ``ours-no-ac`` shows the same step without it.
Each side runs in its own process (clean peak memory). Prints a table, writes JSON.

    python bench/dpo_step.py --out dpo.json                  # H100, ~2 min
    python bench/dpo_step.py --smoke                         # tiny model on CPU: checks the code paths
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

SIDES = ("ours", "ours-no-ac", "trl")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_pairs(path: Path, n: int, completion_words: int) -> None:
    from trainer import tasks

    filler = " because " + " ".join(["it follows from the digits"] * max(1, completion_words // 5))
    say = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731  (TRL's conversational form)
    rows = [{"prompt": p.messages, "chosen": say(p.answer + filler), "rejected": say(str(int(p.answer) + 1) + filler)}
            for p in tasks.generate(n, seed=0, difficulty=2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ours(p: dict[str, Any], activation_checkpointing: str = "full") -> dict[str, Any]:
    common.reset_peak_memory()
    res = common.run_crucible([
        f"model.path={p['model_dir']}", "train.method=dpo", f"device={p['device']}",
        f"precision={'bf16' if p['device'] == 'cuda' else 'fp32'}", f"train.micro_batch_size={p['pairs']}", "train.grad_accum=1",
        f"data.source={p['data']}", "data.val_fraction=0", f"data.packing={p['packing']}", f"train.seq_len={p['seq_len']}",
        "dpo.reference=lora_disabled", "dpo.beta=0.1", f"dpo.max_prompt_len={p['seq_len'] // 2}", "train.lr=5e-5", "train.scheduler=constant",
        "lora.rank=16", "lora.alpha=32", "eval.every_n_steps=0", "checkpoint.save_final=false", f"output_dir={p['workdir']}/ours",
        f"train.activation_checkpointing={activation_checkpointing}",
    ], warmup=p["warmup"], steps=p["steps"])
    return {"times": res["times"], "peak_gib": common.peak_memory_gib(), "losses": res["losses"]}


def trl(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(p["data"]).read_text().splitlines()]
    times: list[float] = []

    cuda = p["device"] == "cuda"
    args = DPOConfig(output_dir=f"{p['workdir']}/trl", max_steps=p["warmup"] + p["steps"], per_device_train_batch_size=p["pairs"],
                     learning_rate=5e-5, lr_scheduler_type="constant", beta=0.1, bf16=cuda, use_cpu=not cuda, report_to="none",
                     save_strategy="no", logging_steps=1, max_length=p["seq_len"], padding_free=False)
    model = AutoModelForCausalLM.from_pretrained(p["model_dir"], dtype=torch.bfloat16 if cuda else torch.float32)
    tok = AutoTokenizer.from_pretrained(p["model_dir"])
    common.reset_peak_memory()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"), callbacks=[common.trainer_step_clock(times)])
    history = trainer.train()
    return {"times": times, "peak_gib": common.peak_memory_gib(), "final_loss": history.training_loss}


def main() -> None:
    parser = common.bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--completion-tokens", type=int, default=256, help="approximate completion length")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    common.add_side_arguments(parser, SIDES, default_timeout=200)
    args = parser.parse_args()
    common.check_sides(parser, args)
    if common.run_as_worker(args, {"ours": ours, "ours-no-ac": lambda p: ours(p, "none"), "trl": trl}):
        return
    if args.smoke:
        args.shape, args.pairs, args.completion_tokens, args.seq_len, args.warmup, args.steps = "tiny", 4, 16, 128, 1, 1
    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "pairs.jsonl"
    write_pairs(data, n=args.pairs * (args.warmup + args.steps + 2), completion_words=args.completion_tokens * 3 // 4)
    spec = {"model_dir": common.build_model_dir(args.shape, workdir / "model"), "workdir": str(workdir), "data": str(data),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "packing": args.packing,
            **{k: getattr(args, k) for k in ("pairs", "seq_len", "warmup", "steps")}}
    rows = []
    for side, res in common.run_sides(__file__, args, workdir, spec):
        measured = res.get("times", [])[args.warmup:]
        step = statistics.median(measured) if measured else None
        rows.append({"side": side, "step_s": step, "pairs_per_s": args.pairs / step if step else None, "peak_gib": res.get("peak_gib"),
                     "error": res.get("error")})
        common.save_results(args.out, "dpo_step", args, rows)
    theirs = next((r for r in rows if r["side"] == "trl"), {})
    for mine in (r for r in rows if r["side"] != "trl"):
        if mine.get("step_s") and theirs.get("step_s"):
            mine["speedup"] = theirs["step_s"] / mine["step_s"]
        if mine.get("peak_gib") and theirs.get("peak_gib"):
            mine["memory_vs_trl"] = mine["peak_gib"] / theirs["peak_gib"]
    common.save_results(args.out, "dpo_step", args, rows)
    common.print_table(f"DPO step ({args.shape}, {args.pairs} pairs, ~{args.completion_tokens}-token completions, LoRA r16, "
                       f"reference = base with adapters off)", rows,
                       [("side", "side"), ("step_s", "step s (median)"), ("speedup", "x faster"), ("pairs_per_s", "pairs/s"),
                        ("peak_gib", "peak GiB"), ("memory_vs_trl", "memory / TRL's"), ("error", "error")],
                       notes=[f"ours packs chosen+rejected documents into rows (packing={args.packing}); TRL pads [chosen; rejected]",
                              "ours and TRL checkpoint activations (TRL's DPOConfig default); ours-no-ac does not"])


if __name__ == "__main__":
    main()
