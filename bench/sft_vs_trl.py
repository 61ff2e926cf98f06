"""SFT LoRA / QLoRA head-to-head: crucible against TRL ``SFTTrainer`` (+PEFT, +bitsandbytes, +Liger).

Same model (random init of a named shape, identical weights on every side), same documents, packed
to ``--seq-len``, same LoRA config, optimizer settings and effective batch. Each side runs in its
own process so peak memory (``torch.cuda.max_memory_allocated``, weights included) is clean.
Reported per side: tokens/s over the measured steps (after ``--warmup`` steps, wall time between
optimizer steps, data loading included), peak memory, and the loss curve.

    python bench/sft_vs_trl.py --shapes smollm2-135m,llama-3.2-1b --methods lora,qlora --out sft.json
    python bench/sft_vs_trl.py --smoke                      # tiny model on CPU: checks the code paths
    python bench/sft_vs_trl.py --shapes llama-3.2-1b --methods qlora --steps 12 --warmup 3 --time-budget 260 \
        --ours-variants "compiled=train.compile=true"     # + our trainer with overrides, as its own side

The sides: ``ours`` (crucible's trainer, driven in-process by the worker), ``trl`` (SFTTrainer,
packing=True with BFD + padding-free position ids, its fused LM head), ``trl_liger`` (the same with
``use_liger_kernel=True``: Liger's RMSNorm/RoPE/SwiGLU kernels; TRL 1.16 keeps its own fused LM head
instead of Liger's fused linear cross-entropy). Attention is SDPA on every side.

``--ours-variants "NAME=key=value,key=value;NAME2=..."`` adds one side per variant, ``ours-NAME``:
our trainer with those config overrides on top of the case's (e.g. ``train.compile=true``), compared
with the default side and with every baseline. Overrides are validated against the config schema
before any model or corpus is built, so a misspelt key fails in a second, not after a model load.
``--time-budget`` bounds the whole run: a side gets at most the time left, and a side that cannot
start with ``MIN_SIDE_S`` left is recorded as skipped, so the table and JSON always come out.

The whole matrix does not fit one 600 s GPU call (a side is ~55 s of start-up plus its steps: 135M
LoRA took ~95 s per side at 35 steps). One (shape, method) per entry keeps each comparison inside
one call; entries sharing ``--workdir`` reuse the random-init model. Two calls of <= 560 s:

    bash bench/run_gpu.sh "sft_vs_trl@135m-qlora:290:--shapes smollm2-135m --methods qlora --steps 20 --warmup 4 \
        --time-budget 270 --workdir /tmp/bench-sft" "sft_vs_trl@1b-lora:270:--shapes llama-3.2-1b --methods lora \
        --steps 12 --warmup 3 --time-budget 250 --workdir /tmp/bench-sft"
    bash bench/run_gpu.sh "sft_vs_trl@1b-qlora:290:--shapes llama-3.2-1b --methods qlora --steps 12 --warmup 3 \
        --time-budget 270 --workdir /tmp/bench-sft"
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

SIDES = ("ours", "trl", "trl_liger")
METHODS = ("lora", "qlora", "full")  # full: every weight trains (full_ft_mfu.py)
TARGET_SPEEDUP = 2.0  # issue 10: >= 2.0x TRL tokens/s at <= TRL peak memory
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIN_SIDE_S = 60.0  # --time-budget: a side needs about this long (start-up, model load, a few steps)


def is_ours(side: str) -> bool:
    """``ours`` and its variants ``ours-NAME`` are crucible; every other side is a baseline."""
    return side == "ours" or side.startswith("ours-")


# --------------------------------------------------------------------------------------------
# --ours-variants: extra crucible sides, each a list of config overrides
# --------------------------------------------------------------------------------------------
def parse_variants(text: str) -> dict[str, list[str]]:
    """``"compiled=train.compile=true;big=train.micro_batch_size=8,train.grad_accum=1"`` -> {name: overrides}.

    Overrides split at commas that start a new ``key=`` so list values keep theirs
    (``lora.target_modules=q_proj,v_proj,train.compile=true`` is two overrides).
    """
    variants: dict[str, list[str]] = {}
    text = text.strip().strip("'\"")  # run_gpu.sh passes quotes inside an entry through literally
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, rest = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name) or not rest:
            raise argparse.ArgumentTypeError(f"variant {item!r}: want NAME=key=value[,key=value...] (NAME: letters, digits, _)")
        if name in variants:
            raise argparse.ArgumentTypeError(f"variant name {name!r} given twice")
        overrides = re.split(r",(?=[A-Za-z_][\w.]*=)", rest)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise argparse.ArgumentTypeError(f"variant {name!r}: {bad[0]!r} is not key=value")
        variants[name] = overrides
    return variants


def check_variant_configs(args) -> None:
    """Resolve every (method, variant) config now: an unknown key or bad value exits with the config error."""
    from trainer.config import ConfigError, load_config

    for method in args.methods:
        for name, overrides in args.ours_variants.items():
            probe = case_spec(args, "tiny", method, f"ours-{name}", "<model>", Path("<corpus>"), Path("<workdir>"))
            try:
                load_config(ours_overrides(probe) + overrides)
            except ConfigError as e:  # exit 2 with one line, as the launchers do on a config error
                print(f"error: --ours-variants {name} ({method}): {e}", file=sys.stderr)
                raise SystemExit(2) from None


def all_sides(args) -> list[str]:
    """The requested sides, then the variants: a time budget that runs out cuts variants, never the
    baselines that every ratio needs from the same call."""
    return args.sides + [f"ours-{name}" for name in args.ours_variants]


# --------------------------------------------------------------------------------------------
# What a side needs to know, and what it reports
# --------------------------------------------------------------------------------------------
def case_spec(args, shape: str, method: str, side: str, model_dir: str, corpus_dir: Path, workdir: Path) -> dict[str, Any]:
    name = f"{shape}-{method}-{side}"
    return dict(
        name=name, side=side, shape=shape, method=method, model_dir=model_dir, corpus_dir=str(corpus_dir),
        output_dir=str(workdir / "runs" / name), result=str(common.worker_result_path(workdir, name)),
        steps=args.steps, warmup=args.warmup, seq_len=args.seq_len, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
        lr=args.lr, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, activation_checkpointing=args.activation_checkpointing,
        seed=args.seed, profile=args.profile and is_ours(side), device="cuda" if _cuda() else "cpu",
        memory_breakdown=args.memory_breakdown and is_ours(side) and _cuda(),
        overrides=args.ours_variants[side.removeprefix("ours-")] if side.startswith("ours-") else [],
    )


def summarize(spec: dict[str, Any], step_times: list[float], step_tokens: list[int], losses: list[float], **extra: Any) -> dict[str, Any]:
    """Throughput over the measured steps (warm-up excluded) + memory + the loss curve."""
    measured = slice(spec["warmup"], None)
    seconds, tokens = sum(step_times[measured]), sum(step_tokens[measured])
    last = losses[-min(5, len(losses)) :]
    return dict(
        tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else None,
        step_ms=round(1e3 * statistics.median(step_times[measured]), 1) if step_times[measured] else None,
        tokens_per_step=round(statistics.mean(step_tokens)) if step_tokens else None,
        peak_mem_gib=common.peak_memory_gib(), peak_reserved_gib=common.peak_reserved_gib(),
        losses=[round(x, 5) for x in losses], final_loss=round(statistics.mean(last), 5) if last else None,
        loss_noise=round(statistics.pstdev(last), 5) if len(last) > 1 else 0.0, **extra,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def read_corpus(corpus_dir: str) -> list[str]:
    # the same sorted file order crucible's text:<dir> source reads
    return [p.read_text(encoding="utf-8") for p in sorted(Path(corpus_dir).glob("*.txt"))]


# --------------------------------------------------------------------------------------------
# TRL side
# --------------------------------------------------------------------------------------------
def run_trl(spec: dict[str, Any], liger: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    on_gpu = spec["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    full = spec["method"] == "full"
    # the recipe crucible runs: frozen LoRA bases stored in bf16; fully trained weights (and so
    # AdamW states) in fp32 with bf16 autocast (TRL's bf16=True), not pure-bf16 training
    frozen_bf16 = on_gpu and not full
    load: dict[str, Any] = dict(dtype=torch.bfloat16 if frozen_bf16 else torch.float32, attn_implementation="sdpa")
    if spec["method"] == "qlora":
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32,
        )
        load["device_map"] = {"": 0 if on_gpu else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **load)

    class StepClock(TrainerCallback):
        """Wall time between optimizer steps (data, forward, backward, optimizer, logging) and each step's log."""

        def __init__(self):
            self.last, self.times, self.logs, self.static_gib = 0.0, [], [], None

        def on_train_begin(self, args, state, control, **kw):
            self.static_gib = common.allocated_gib()  # weights (+ adapters) before the first step
            self.last = common.now()

        def on_step_end(self, args, state, control, **kw):
            t = common.now()
            self.times.append(t - self.last)
            self.last = t

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs, step=state.global_step))

    clock = StepClock()
    config = SFTConfig(
        output_dir=spec["output_dir"], max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["grad_accum"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to="none", seed=spec["seed"], bf16=on_gpu, use_cpu=not on_gpu, packing=True, max_length=spec["seq_len"],
        gradient_checkpointing=spec["activation_checkpointing"], use_liger_kernel=liger, dataloader_num_workers=0,
        disable_tqdm=False,
    )
    peft_config = None if full else LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                               target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({"text": read_corpus(spec["corpus_dir"])})
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[clock])
    trainer.train()
    logs = clock.logs
    # `num_tokens` is TRL's running count of tokens fed to the model (padding-free: no pad)
    cumulative = [int(entry["num_tokens"]) for entry in logs]
    step_tokens = [b - a for a, b in zip([0] + cumulative, cumulative)]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return summarize(spec, clock.times, step_tokens, [float(e["loss"]) for e in logs], trainable_params=trainable,
                     static_gib=clock.static_gib)


# --------------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------------
def ours_overrides(spec: dict[str, Any]) -> list[str]:
    """The launcher's key=value list for this case: the TRL side's settings, in our config language."""
    on_gpu = spec["device"] == "cuda"
    return [
        f"model.path={spec['model_dir']}", "model.init=pretrained", "model.attn_implementation=sdpa",
        f"data.source=text:{spec['corpus_dir']}", "data.packing=true", "data.val_fraction=0",
        f"train.seq_len={spec['seq_len']}", f"train.micro_batch_size={spec['micro_batch']}", f"train.grad_accum={spec['grad_accum']}",
        f"train.lr={spec['lr']}", "train.scheduler=constant", "train.warmup_steps=0",
        "train.weight_decay=0", "train.max_grad_norm=1.0", "train.optimizer=adamw", "train.log_every_n_steps=1",
        f"train.activation_checkpointing={'full' if spec['activation_checkpointing'] else 'none'}",
        f"lora.enabled={str(spec['method'] != 'full').lower()}", f"lora.rank={spec['lora_rank']}", f"lora.alpha={spec['lora_alpha']}", "lora.dropout=0",
        f"lora.target_modules={','.join(LORA_TARGETS)}", f"quant.load_in_4bit={str(spec['method'] == 'qlora').lower()}",
        f"precision={'bf16' if on_gpu else 'fp32'}", f"device={spec['device']}", f"output_dir={spec['output_dir']}", f"seed={spec['seed']}",
        "checkpoint.save_final=false", "wandb.enabled=false",
    ]


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    run = common.run_crucible(ours_overrides(spec) + spec["overrides"], spec["warmup"], spec["steps"], profile_steps=3 if spec["profile"] else 0,
                              memory_steps=1 if spec.get("memory_breakdown") else 0)
    trainer_cfg = run["config"]
    return summarize(spec, run["times"], run["tokens"], run["losses"], top_ops=run["top_ops"], overrides=spec["overrides"],
                     profile_totals=run["profile_totals"], memory_breakdown=run["memory_breakdown"], compile_stats=run["compile_stats"], static_gib=run["static_gib"],
                     step_times_ms=[round(t * 1e3, 1) for t in run["times"]],
                     trainable_params=run["trainable_params"], precision=trainer_cfg.precision, activation_checkpointing=trainer_cfg.train.activation_checkpointing)


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------
def skip_reason(method: str, side: str) -> str | None:
    """Why this case cannot run on this machine (None: it can)."""
    import importlib.util

    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes not installed"
    if not is_ours(side) and importlib.util.find_spec("trl") is None:
        return "trl not installed"
    if side == "trl_liger" and (importlib.util.find_spec("liger_kernel") is None or not _cuda()):
        return "liger-kernel needs CUDA and the liger-kernel package"
    return None


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each crucible side against each baseline of the same (shape, method), and each variant against
    the default ``ours``: speed-up, memory ratio, loss agreement (the target applies to baselines only)."""
    out = []
    by_case = {(r["shape"], r["method"], r["side"]): r for r in rows if r.get("tokens_per_s")}
    for (shape, method, side), ours in by_case.items():
        if not is_ours(side):
            continue
        baselines = [b for (s, m, b) in by_case if (s, m) == (shape, method) and not is_ours(b)]
        for baseline in baselines + (["ours"] if side != "ours" and (shape, method, "ours") in by_case else []):
            out.append(dict(shape=shape, method=method, side=side, baseline=baseline,
                            **ratios(ours, by_case[(shape, method, baseline)], against_target=not is_ours(baseline))))
    return out


def ratios(ours: dict[str, Any], base: dict[str, Any], against_target: bool) -> dict[str, Any]:
    """Speed-up, memory ratio and loss agreement (within twice the larger noise, or 2% of the loss)."""
    noise = max(ours["loss_noise"], base["loss_noise"], 0.02 * abs(base["final_loss"]))
    delta = ours["final_loss"] - base["final_loss"]
    speedup = ours["tokens_per_s"] / base["tokens_per_s"]
    mem_ratio = ours["peak_mem_gib"] / base["peak_mem_gib"] if ours["peak_mem_gib"] and base["peak_mem_gib"] else None
    met = speedup >= TARGET_SPEEDUP and (mem_ratio is None or mem_ratio <= 1.0)
    return dict(speedup=round(speedup, 3), mem_ratio=round(mem_ratio, 3) if mem_ratio else None, loss_delta=round(delta, 4),
                loss_agree=abs(delta) <= 2 * noise, target=f">= {TARGET_SPEEDUP}x at <= 1.0x mem" if against_target else None,
                target_met=met if against_target else None)


def case_parser(description: str, *, shapes: list[str], methods: list[str], sides: list[str], micro_batch: int, grad_accum: int,
                lr: float, activation_checkpointing: bool):
    """The flags of a trainer head-to-head (shared with full_ft_mfu.py, which sets other defaults)."""
    p = common.bench_parser(description)
    p.add_argument("--shapes", type=common.csv_list, default=shapes, help=f"any of {','.join(common.SHAPES)}")
    p.add_argument("--methods", type=common.csv_list, default=methods, help=f"any of {','.join(METHODS)}")
    p.add_argument("--sides", type=common.csv_list, default=sides, help=f"any of {','.join(SIDES)}")
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps run before timing starts")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=micro_batch)
    p.add_argument("--grad-accum", type=int, default=grad_accum)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--activation-checkpointing", type=lambda s: s.lower() in ("1", "true", "on", "yes"), default=activation_checkpointing,
                   metavar="on|off", help="the same on every side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case-timeout", type=float, default=300, help="seconds before one side is killed")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run (set it below the caller's timeout): sides get at most what is left")
    p.add_argument("--memory-breakdown", action="store_true",
                   help="one extra step of our sides under a memory-history trace: what is alive at the peak (CUDA)")
    p.add_argument("--ours-variants", type=parse_variants, default={}, metavar="NAME=k=v,k=v;...",
                   help="extra crucible sides ours-NAME, each with these config overrides")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def run_cases(args, bench: str, extra=lambda rows: {}) -> tuple[list[dict[str, Any]], list[str]]:
    """Every (shape, method, side) in its own worker process; results saved after each one."""
    started = time.perf_counter()
    if args.smoke:  # the same code paths in seconds on a CPU
        args.shapes, args.steps, args.warmup, args.seq_len, args.micro_batch, args.grad_accum = ["tiny"], 2, 1, 128, 2, 1
    for name, allowed in (("methods", METHODS), ("sides", SIDES)):
        bad = [v for v in getattr(args, name) if v not in allowed]
        if bad:
            raise SystemExit(f"error: --{name} {','.join(bad)} unknown; choose from {','.join(allowed)}")
    for shape in args.shapes:
        common.hf_config(shape)  # unknown shape: one-line error before any work
    check_variant_configs(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"bench-{bench}-"))
    tokens_needed = int(1.15 * (args.warmup + args.steps + 3) * args.micro_batch * args.grad_accum * args.seq_len)
    print(f"corpus: {tokens_needed:,} tokens of synthetic chat text, documents < {args.seq_len} tokens", flush=True)
    docs = common.corpus_documents(common.load_tokenizer(), tokens_needed, args.seq_len - 1, args.seed)
    corpus = common.write_corpus(workdir / "corpus", docs)

    rows = []
    notes = [f"ours-{name} = ours + {' '.join(overrides)}" for name, overrides in args.ours_variants.items()]
    for shape in args.shapes:
        print(f"model: random-init {shape}", flush=True)
        model_dir = common.build_model_dir(shape, workdir / f"model-{shape}", seed=args.seed)
        if common.vocab_note(shape):
            notes.append(f"{shape}: {common.vocab_note(shape)}")
        for method in args.methods:
            for side in all_sides(args):
                spec = case_spec(args, shape, method, side, model_dir, corpus, workdir)
                left = None if args.time_budget is None else args.time_budget - (time.perf_counter() - started)
                row = dict(shape=shape, method=method, side=side, **run_side(spec, workdir, args.case_timeout, left))
                if row.get("skipped") or row.get("error"):
                    notes.append(f"{spec['name']} {'skipped' if row.get('skipped') else 'failed'}: {row.get('skipped') or row['error']}")
                rows.append(row)
                common.save_results(args.out, bench, args, rows, notes=notes, **extra(rows))
    return rows, notes


def run_side(spec: dict[str, Any], workdir: Path, case_timeout: float, seconds_left: float | None) -> dict[str, Any]:
    """One side in a worker process, under the smaller of the case timeout and the time left; or why it did not run."""
    reason = skip_reason(spec["method"], spec["side"])
    if reason:
        return {"skipped": reason}
    if seconds_left is not None and seconds_left < MIN_SIDE_S:
        return {"skipped": f"time budget: {max(seconds_left, 0):.0f}s left, a side needs ~{MIN_SIDE_S:.0f}s"}
    spec_path = workdir / "specs" / f"{spec['name']}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    timeout = case_timeout if seconds_left is None else min(case_timeout, seconds_left)
    print(f"== {spec['name']} (at most {timeout:.0f}s)", flush=True)
    return common.run_worker([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                             Path(spec["result"]), timeout=timeout, label=spec["name"])


def main() -> None:
    p = case_parser(__doc__.split("\n")[0], shapes=["smollm2-135m", "llama-3.2-1b"], methods=["lora", "qlora"], sides=list(SIDES),
                    micro_batch=4, grad_accum=2, lr=2e-4, activation_checkpointing=True)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    rows, notes = run_cases(args, "sft_vs_trl", extra=lambda rows: {"comparisons": compare(rows)})
    report(rows, compare(rows), notes, args)


def report(rows, comparisons, notes, args) -> None:
    for r in rows:
        if r.get("top_ops"):
            common.print_table(f"top ops by self CUDA time: {r['side']}, {r['shape']} {r['method']}", r["top_ops"],
                               [("op", "op"), ("self_ms", "self ms"), ("pct", "%"), ("calls", "calls")])
    common.print_table(
        f"SFT {args.seq_len}-token packed, micro-batch {args.micro_batch} x accum {args.grad_accum}, {args.steps} steps after {args.warmup} warm-up",
        rows, [("shape", "shape"), ("method", "method"), ("side", "side"), ("tokens_per_s", "tokens/s"), ("step_ms", "step ms"),
               ("static_gib", "GiB before step 1"), ("peak_mem_gib", "peak GiB"), ("final_loss", "final loss"), ("wall_s", "wall s")],
    )
    common.print_table("crucible vs baseline", comparisons,
                       [("shape", "shape"), ("method", "method"), ("side", "side"), ("baseline", "baseline"), ("speedup", "speed-up"),
                        ("mem_ratio", "mem ratio"), ("loss_delta", "loss delta"), ("loss_agree", "loss agrees"), ("target_met", "target met")],
                       notes=notes)


def worker(spec_path: Path) -> None:
    """One side of one case, in this (fresh) process; the result goes to the spec's result path."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.manual_seed(spec["seed"])
    result = run_ours(spec) if is_ours(spec["side"]) else run_trl(spec, liger=spec["side"] == "trl_liger")
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
