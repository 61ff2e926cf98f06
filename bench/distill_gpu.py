"""Distillation on one GPU: KD throughput and peak memory against SFT on the same student, and
synthetic-data generation throughput of a teacher on our engine.

The teacher is a random-init named shape; the student is that teacher with every 2nd layer kept
(``distill.students.prune_every_k``). Every training case runs crucible's Trainer on the same
student, documents, batch shape and loss chunk size, in its own process (clean peak-memory counter):

    sft             cross-entropy only (train.method=sft)
    kd-online       logit KD, bf16 teacher forward in the same step (its weights stay resident)
    kd-online-nf4   the same with the teacher's linear layers stored NF4 (distill.teacher_quant=nf4)
    kd-offline      logit KD from a top-k cache built once in setup (no teacher in memory while training)

Target (issue 7): KD peak <= SFT peak + 15%. Online cases also report the teacher's resident bytes
(measured on the device as it loads) and their peak without them, which separates what the loss
costs from what holding a teacher costs. The synth case times ``distill.synth.synthesize`` through
the engine, batch by batch, within ``--synth-budget-s`` (a random teacher writes nonsense, so its
yield means nothing; requests/s and generated tokens/s are the measurement).

    python bench/distill_gpu.py --out distill_gpu.json            # H100: about 4 minutes, <= 400 s
    python bench/distill_gpu.py --smoke                            # tiny shape on CPU: code paths only
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

TARGET_MEM_RATIO = 1.15
TRAINING_CASES = ("sft", "kd-online", "kd-online-nf4", "kd-offline")
CASES = TRAINING_CASES + ("synth",)
ONLINE_TEACHER_QUANT = {"kd-online": "none", "kd-online-nf4": "nf4"}


# --------------------------------------------------------------------------------------------
# Training cases
# --------------------------------------------------------------------------------------------
def overrides(spec: dict[str, Any]) -> list[str]:
    """Trainer overrides of one case; SFT and KD share everything but the method (incl. the loss chunk size)."""
    on_gpu = spec["device"] == "cuda"
    shared = [
        f"model.path={spec['student_dir']}", "model.init=pretrained", "lora.enabled=false",
        f"data.source=text:{spec['corpus_dir']}", "data.packing=true", "data.val_fraction=0",
        f"train.seq_len={spec['seq_len']}", f"train.micro_batch_size={spec['micro_batch']}", "train.grad_accum=1",
        "train.lr=1e-5", "train.scheduler=constant", "train.warmup_steps=0", "train.log_every_n_steps=1",
        f"train.activation_checkpointing={spec['activation_checkpointing']}", f"train.loss_chunk_size={spec['chunk_size']}",
        f"precision={'bf16' if on_gpu else 'fp32'}", f"device={spec['device']}", f"output_dir={spec['output_dir']}",
        "checkpoint.save_final=false", "checkpoint.every_n_steps=0", "eval.every_n_steps=0", "wandb.enabled=false", "seed=0",
    ]
    if spec["case"] == "sft":
        return shared + ["train.method=sft"]
    mode = "offline" if spec["case"] == "kd-offline" else "online"
    return shared + [
        "train.method=distill", f"distill.teacher={spec['teacher_dir']}", "distill.student=model",
        f"distill.teacher_logits={mode}", f"distill.teacher_quant={ONLINE_TEACHER_QUANT.get(spec['case'], 'none')}",
        f"distill.topk={spec['topk']}", "distill.loss=forward_kl", "distill.ce_weight=0.1",
        f"distill.chunk_size={spec['chunk_size']}", "distill.evaluate=false",
    ]


def teacher_resident_gib(spec: dict[str, Any]) -> float | None:
    """Device bytes the online teacher holds, measured by loading it alone (None on CPU)."""
    import torch

    from distill.teacher import load_teacher
    from trainer.config import load_config

    if not torch.cuda.is_available():
        return None
    before = torch.cuda.memory_allocated()
    teacher = load_teacher(load_config(overrides(spec)), torch.device("cuda"))
    resident = (torch.cuda.memory_allocated() - before) / common.GIB
    del teacher
    gc.collect()
    torch.cuda.empty_cache()
    return round(resident, 3)


def run_training(spec: dict[str, Any]) -> dict[str, Any]:
    teacher_gib = teacher_resident_gib(spec) if spec["case"] in ONLINE_TEACHER_QUANT else None
    common.reset_peak_memory()
    run = common.run_crucible(overrides(spec), spec["warmup"], spec["steps"])
    times, tokens = run["times"][spec["warmup"]:], run["tokens"][spec["warmup"]:]
    row = {
        # median per step: one slow step (allocator growth, a data-loader refill) does not move it
        "tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times)) if times else None,
        "step_ms": 1000 * statistics.median(times) if times else None,
        "peak_mem_gib": common.peak_memory_gib(),
        "final_loss": run["losses"][-1] if run["losses"] else None,
    }
    if teacher_gib is not None:
        row["teacher_weights_gib"] = teacher_gib
        if row["peak_mem_gib"] is not None:
            row["peak_minus_teacher_gib"] = round(row["peak_mem_gib"] - teacher_gib, 3)
    return row


# --------------------------------------------------------------------------------------------
# Synthetic data on the engine
# --------------------------------------------------------------------------------------------
class BudgetSpent(Exception):
    """Raised before a synthesis batch would start after the time budget: the finished batches are the measurement."""


def run_synth(spec: dict[str, Any]) -> dict[str, Any]:
    """Requests (instructions + responses) and generated tokens per second of the self-instruct pipeline."""
    from distill.synth import synthesize
    from engine import LLM, SamplingParams
    from trainer.config import load_config

    cfg = load_config([f"synth.num_instructions={spec['synth_rows']}", f"synth.num_arithmetic={spec['synth_rows']}",
                       f"synth.batch_size={spec['synth_batch']}", f"synth.max_response_tokens={spec['synth_tokens']}",
                       f"synth.output={spec['output_dir']}/synth.jsonl", f"device={spec['device']}"])
    load_start = time.perf_counter()
    llm = LLM(model=spec["teacher_dir"], max_num_seqs=spec["synth_batch"])
    llm.chat([[{"role": "user", "content": "warm up"}]], SamplingParams(max_tokens=4))
    engine_load_s = time.perf_counter() - load_start
    counted = {"tokens": 0, "requests": 0, "seconds": 0.0}

    def generate(chats, sampling):
        if counted["seconds"] > spec["synth_budget_s"]:
            raise BudgetSpent
        start = common.now()
        outs = llm.chat(chats, [SamplingParams(**s) for s in sampling])
        counted["seconds"] += common.now() - start
        counted["tokens"] += sum(len(o.outputs[0].token_ids) for o in outs if o.outputs)
        counted["requests"] += len(outs)
        print(f"synth: {counted['requests']} requests, {counted['tokens']:,} tokens in {counted['seconds']:.1f}s", flush=True)
        return [o.outputs[0].text if o.outputs else "" for o in outs]

    rows_kept, complete = None, True
    try:
        rows, _ = synthesize(cfg, generate, spec["teacher_dir"])
        rows_kept = len(rows)
    except BudgetSpent:
        complete = False
    seconds = max(counted["seconds"], 1e-9)
    return {"requests": counted["requests"], "gen_tokens": counted["tokens"], "requests_per_s": counted["requests"] / seconds,
            "gen_tokens_per_s": counted["tokens"] / seconds, "generate_s": round(counted["seconds"], 2),
            "engine_load_s": round(engine_load_s, 2), "rows_kept": rows_kept, "complete": complete,
            "peak_mem_gib": common.peak_memory_gib()}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def parse_args():
    p = common.bench_parser(__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b", help="teacher shape (the student keeps every 2nd layer)")
    p.add_argument("--cases", type=common.csv_list, default=list(CASES))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024, help="loss chunk (tokens) of SFT and KD alike")
    p.add_argument("--activation-checkpointing", default="full")
    p.add_argument("--synth-rows", type=int, default=256, help="instructions and arithmetic tasks each")
    p.add_argument("--synth-batch", type=int, default=128)
    p.add_argument("--synth-tokens", type=int, default=128)
    p.add_argument("--synth-budget-s", type=float, default=40, help="no new synthesis batch starts after this much generation")
    # worst case 4 x 60 + 100 s plus ~40 s of model building stays inside one 400 s call (typical: ~4 minutes)
    p.add_argument("--case-timeout", type=float, default=60, help="seconds per training case")
    p.add_argument("--synth-timeout", type=float, default=100, help="seconds for the synth case (engine load included)")
    p.add_argument("--worker", type=Path, default=None, help="(internal) run one case from its spec file")
    args = p.parse_args()
    if args.smoke:
        args.shape, args.seq_len, args.micro_batch, args.steps, args.warmup = "tiny", 128, 2, 2, 1
        args.synth_rows, args.synth_batch, args.synth_tokens, args.chunk_size, args.topk = 4, 4, 8, 64, 8
        # a shared CPU is slow to even import torch; the smoke checks code paths (the whole synthesis included), not time
        args.case_timeout = args.synth_timeout = args.synth_budget_s = 900
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        raise SystemExit(f"error: --cases {','.join(bad)} unknown; choose from {','.join(CASES)}")
    return args


def prepare_models(args, device: str, workdir: Path) -> tuple[str, str, str]:
    """(teacher dir, student dir, corpus dir): a random-init teacher, its every-2nd-layer student, packed text."""
    from distill.students import prune_every_k

    teacher_dir = common.build_model_dir(args.shape, workdir / "teacher", dtype="bfloat16" if device == "cuda" else "float32")
    student_dir = workdir / "student"
    if not (student_dir / "config.json").is_file():
        prune_every_k(teacher_dir, 2, student_dir)
    tokens = int(1.2 * (args.warmup + args.steps + 2) * args.micro_batch * args.seq_len)
    corpus = common.write_corpus(workdir / "corpus", common.corpus_documents(common.load_tokenizer(), tokens, args.seq_len - 1))
    return teacher_dir, str(student_dir), str(corpus)


def run_case(case: str, args, device: str, workdir: Path, dirs: tuple[str, str, str]) -> dict[str, Any]:
    teacher_dir, student_dir, corpus_dir = dirs
    spec = dict(case=case, device=device, teacher_dir=teacher_dir, student_dir=student_dir, corpus_dir=corpus_dir,
                seq_len=args.seq_len, micro_batch=args.micro_batch, steps=args.steps, warmup=args.warmup, topk=args.topk,
                chunk_size=args.chunk_size, activation_checkpointing=args.activation_checkpointing,
                synth_rows=args.synth_rows, synth_batch=args.synth_batch, synth_tokens=args.synth_tokens,
                synth_budget_s=args.synth_budget_s, output_dir=str(workdir / f"run-{case}"),
                result=str(common.worker_result_path(workdir, case)))
    spec_path = workdir / "specs" / f"{case}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    print(f"== {case}", flush=True)
    timeout = args.synth_timeout if case == "synth" else args.case_timeout
    return {"case": case, **common.run_worker([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                              Path(spec["result"]), timeout=timeout, label=case)}


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """KD peak / SFT peak for each KD case, against the 1.15 target."""
    by_case = {r["case"]: r for r in rows}
    sft = (by_case.get("sft") or {}).get("peak_mem_gib")
    out: dict[str, Any] = {}
    if not sft:
        return out
    for case in TRAINING_CASES[1:]:
        for key in ("peak_mem_gib", "peak_minus_teacher_gib"):
            value = (by_case.get(case) or {}).get(key)
            if value:
                out[f"{case} {key} / sft"] = round(value / sft, 3)
                out[f"{case} {key} target met"] = value / sft <= TARGET_MEM_RATIO
    return out


def print_summary(args, rows: list[dict[str, Any]], notes: list[str]) -> None:
    training = [r for r in rows if r["case"] != "synth"]
    sft = next((r.get("peak_mem_gib") for r in training if r["case"] == "sft"), None)
    for r in training:
        if sft and r.get("peak_mem_gib"):
            r["vs_sft"] = round(r["peak_mem_gib"] / sft, 3)
    common.print_table("synthetic data on the engine", [r for r in rows if r["case"] == "synth"],
                       [("case", "case"), ("requests", "requests"), ("requests_per_s", "req/s"), ("gen_tokens_per_s", "gen tokens/s"),
                        ("generate_s", "generate s"), ("engine_load_s", "engine load s"), ("complete", "all batches"),
                        ("peak_mem_gib", "peak GiB")])
    common.print_table(f"KD vs SFT: student = {args.shape} every 2nd layer, {args.seq_len} tokens x {args.micro_batch}, "
                       f"loss chunk {args.chunk_size}, {args.steps} steps after {args.warmup} warm-up", training,
                       [("case", "case"), ("tokens_per_s", "tokens/s"), ("step_ms", "step ms"), ("peak_mem_gib", "peak GiB"),
                        ("vs_sft", "peak / SFT"), ("teacher_weights_gib", "teacher GiB"), ("peak_minus_teacher_gib", "peak - teacher GiB"),
                        ("final_loss", "final loss")],
                       notes=notes + [f"{k}: {v}" for k, v in verdict(rows).items()])


def main() -> None:
    args = parse_args()
    if args.worker:
        spec = json.loads(args.worker.read_text())
        result = run_synth(spec) if spec["case"] == "synth" else run_training(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("error: no GPU; run with --smoke to check the code paths on CPU")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-distill-"))
    dirs = prepare_models(args, device, workdir)
    rows, notes = [], [n for n in [common.vocab_note(args.shape)] if n]
    for case in args.cases:
        row = run_case(case, args, device, workdir, dirs)
        if "error" in row:
            notes.append(f"{case} failed: {row['error']}")
        rows.append(row)
        common.save_results(args.out, "distill_gpu", args, rows, notes=notes, verdict=verdict(rows))
    print_summary(args, rows, notes)


if __name__ == "__main__":
    main()
