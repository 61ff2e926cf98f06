"""GRPO step time and peak memory: crucible (colocated engine rollouts) against TRL ``GRPOTrainer``.

Same model (random init of a named shape, identical weights on both sides), same prompts
(arithmetic chat prompts), group size, completion budget, LoRA config and optimizer settings; TRL
generates with ``model.generate`` (``use_vllm=False``). A step is one generation batch plus one
optimizer step, so rollout time is inside it on both sides. Each side runs in its own process so
``torch.cuda.max_memory_allocated`` is clean. Prints a table, writes JSON.

    python bench/grpo_step.py --out grpo.json                 # H100, ~5 min (TRL: ~50 s per step)
    python bench/grpo_step.py --smoke                         # tiny model on CPU: checks the code paths
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

SIDES = ("ours", "trl")


def reward_vowels(prompts, completions, **_):
    """A dense reward (share of vowels in the text): random-init weights never solve arithmetic, and a batch
    whose rewards are all equal has zero advantage, hence no gradient, which is not what a step benchmark wants."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiou" for ch in t) / (len(t) + 1) for t in texts]


def ours(p: dict[str, Any]) -> dict[str, Any]:
    common.reset_peak_memory()
    res = common.run_crucible([
        f"model.path={p['model_dir']}", "train.method=grpo", f"device={p['device']}",
        f"precision={'bf16' if p['device'] == 'cuda' else 'fp32'}", f"train.micro_batch_size={p['micro_batch']}",
        f"train.grad_accum={p['prompts'] * p['group'] // p['micro_batch']}", f"grpo.prompts_per_batch={p['prompts']}",
        f"grpo.group_size={p['group']}", f"grpo.max_tokens={p['max_tokens']}", "grpo.rewards=bench.grpo_step:reward_vowels=1.0",
        f"train.seq_len={p['max_tokens'] + 128}", "train.lr=1e-5", "train.scheduler=constant", "lora.rank=16", "lora.alpha=32",
        "grpo.max_logprob_diff=0.1", "eval.every_n_steps=0", "grpo.eval_problems=0", "checkpoint.save_final=false",
        f"grpo.rollout_kv_fraction={p['kv_fraction']}", f"output_dir={p['workdir']}/ours",
    ], warmup=p["warmup"], steps=p["steps"])
    history = res["history"]
    diffs = [r["logprob_diff"] for r in history if "logprob_diff" in r]
    kv = [r["engine_kv_gib"] for r in history if "engine_kv_gib" in r]
    return {"times": res["times"], "peak_gib": common.peak_memory_gib(), "max_logprob_diff": max(diffs) if diffs else None,
            "engine_kv_gib": kv[-1] if kv else None}


def trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from trainer import tasks

    p = spec
    problems = tasks.generate(512, seed=0, difficulty=1)
    data = Dataset.from_list([{"prompt": pr.messages, "answer": pr.answer} for pr in problems])
    times: list[float] = []

    cuda = p["device"] == "cuda"
    args = GRPOConfig(
        output_dir=f"{p['workdir']}/trl", max_steps=p["warmup"] + p["steps"], per_device_train_batch_size=p["micro_batch"],
        gradient_accumulation_steps=p["prompts"] * p["group"] // p["micro_batch"], num_generations=p["group"],
        max_completion_length=p["max_tokens"], learning_rate=1e-5, lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda,
        use_vllm=False, report_to="none", save_strategy="no", logging_steps=1, beta=0.0, loss_type="dapo",
    )
    model = AutoModelForCausalLM.from_pretrained(p["model_dir"], dtype=torch.bfloat16 if cuda else torch.float32)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    common.reset_peak_memory()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_vowels], args=args, train_dataset=data, peft_config=peft, callbacks=[common.trainer_step_clock(times)])
    trainer.train()
    return {"times": times, "peak_gib": common.peak_memory_gib()}


def main() -> None:
    parser = common.bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="steps before the measured ones (both sides)")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (both sides): a TRL step with model.generate takes ~50 s")
    parser.add_argument("--kv-fraction", type=float, default=0.05,
                        help="grpo.rollout_kv_fraction: our engine's KV cache cap, as a share of total GPU memory")
    common.add_side_arguments(parser, SIDES, default_timeout=300)
    args = parser.parse_args()
    common.check_sides(parser, args)
    if common.run_as_worker(args, {"ours": ours, "trl": trl}):  # one side, in its own process
        return
    if args.smoke:
        args.shape, args.prompts, args.group, args.max_tokens, args.micro_batch, args.warmup, args.steps = "tiny", 2, 4, 8, 8, 1, 1
    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    spec = {"model_dir": common.build_model_dir(args.shape, workdir / "model"), "workdir": str(workdir),
            "device": "cuda" if torch.cuda.is_available() else "cpu", **{k: getattr(args, k) for k in
            ("prompts", "group", "max_tokens", "micro_batch", "warmup", "steps", "kv_fraction")}}
    rows = []
    for side, res in common.run_sides(__file__, args, workdir, spec):
        measured = res.get("times", [])[args.warmup:]
        step = statistics.median(measured) if measured else None
        rows.append({"side": side, "step_s": step, "steps_measured": len(measured), "peak_gib": res.get("peak_gib"),
                     "engine_kv_gib": res.get("engine_kv_gib"), "completions_per_s": args.prompts * args.group / step if step else None,
                     "max_logprob_diff": res.get("max_logprob_diff"), "error": res.get("error")})
        common.save_results(args.out, "grpo_step", args, rows)
    by_side = {r["side"]: r for r in rows}
    if by_side.get("ours", {}).get("step_s") and by_side.get("trl", {}).get("step_s"):
        by_side["ours"]["speedup"] = by_side["trl"]["step_s"] / by_side["ours"]["step_s"]
        common.save_results(args.out, "grpo_step", args, rows)
    common.print_table(f"GRPO step ({args.shape}, {args.prompts} prompts x G={args.group}, {args.max_tokens} new tokens, LoRA r16)", rows,
                       [("side", "side"), ("step_s", "step s (median)"), ("steps_measured", "steps"), ("speedup", "x faster"),
                        ("completions_per_s", "completions/s"), ("peak_gib", "peak GiB"), ("engine_kv_gib", "of which engine KV GiB"),
                        ("max_logprob_diff", "engine/trainer |dlogp|"), ("error", "error")],
                       notes=["step = generation + one optimizer step, after the warm-up steps; random-init weights (speed and memory only)",
                              f"peak = max_memory_allocated of the whole run; ours includes the colocated engine (KV capped at "
                              f"grpo.rollout_kv_fraction={args.kv_fraction} of GPU memory)"])


if __name__ == "__main__":
    main()
