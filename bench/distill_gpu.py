"""Distillation on one GPU: KD throughput and peak memory against SFT on the same student, and
synthetic-data generation throughput of a teacher on our engine.

The teacher is a random-init named shape; the student is that teacher with every 2nd layer kept
(``distill.students.prune_every_k``). Every training case runs crucible's Trainer on the same
student, documents and batch shape, in its own process (clean peak-memory counter):

    sft          cross-entropy only (train.method=sft)
    kd-online    logit KD, teacher forward in the same step (the teacher's weights are resident)
    kd-offline   logit KD from a top-k cache built once in setup (no teacher in memory while training)

Target (issue 7): KD peak <= SFT peak + 15%. The online case also reports its peak without the
teacher's weights, which separates what the loss costs from what holding a teacher costs.
The synth case times ``distill.synth.synthesize`` through the engine (a random teacher writes
nonsense, so its yield means nothing; rows/s and generated tokens/s are the measurement).

    python bench/distill_gpu.py --out distill_gpu.json            # H100: about 4 minutes
    python bench/distill_gpu.py --smoke                            # tiny shape on CPU: code paths only
"""
from __future__ import annotations

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
CASES = ("sft", "kd-online", "kd-offline", "synth")


def overrides(spec: dict[str, Any]) -> list[str]:
    on_gpu = spec["device"] == "cuda"
    common_keys = [
        f"model.path={spec['student_dir']}", "model.init=pretrained", "lora.enabled=false",
        f"data.source=text:{spec['corpus_dir']}", "data.packing=true", "data.val_fraction=0",
        f"train.seq_len={spec['seq_len']}", f"train.micro_batch_size={spec['micro_batch']}", "train.grad_accum=1",
        "train.lr=1e-5", "train.scheduler=constant", "train.warmup_steps=0", "train.log_every_n_steps=1",
        f"train.activation_checkpointing={spec['activation_checkpointing']}",
        f"precision={'bf16' if on_gpu else 'fp32'}", f"device={spec['device']}", f"output_dir={spec['output_dir']}",
        "checkpoint.save_final=false", "checkpoint.every_n_steps=0", "eval.every_n_steps=0", "wandb.enabled=false", "seed=0",
    ]
    if spec["case"] == "sft":
        return common_keys + ["train.method=sft"]
    mode = "online" if spec["case"] == "kd-online" else "offline"
    return common_keys + [
        "train.method=distill", f"distill.teacher={spec['teacher_dir']}", "distill.student=model",
        f"distill.teacher_logits={mode}", f"distill.topk={spec['topk']}", "distill.loss=forward_kl", "distill.ce_weight=0.1",
        f"distill.chunk_size={spec['chunk_size']}", "distill.evaluate=false",
    ]


def run_training(spec: dict[str, Any]) -> dict[str, Any]:
    common.reset_peak_memory()
    run = common.run_crucible(overrides(spec), spec["warmup"], spec["steps"])
    times, tokens = run["times"][spec["warmup"]:], run["tokens"][spec["warmup"]:]
    row = {
        "tokens_per_s": sum(tokens) / sum(times) if times else None,
        "step_ms": 1000 * statistics.median(times) if times else None,
        "peak_mem_gib": common.peak_memory_gib(),
        "final_loss": run["losses"][-1] if run["losses"] else None,
    }
    if spec["case"] == "kd-online":  # the teacher stays resident: bf16 weights on GPU
        from transformers import AutoConfig

        params = common.parameter_counts(AutoConfig.from_pretrained(spec["teacher_dir"]))["total"]
        teacher_gib = params * (2 if spec["device"] == "cuda" else 4) / common.GIB
        row["teacher_weights_gib"] = teacher_gib
        if row["peak_mem_gib"] is not None:
            row["peak_minus_teacher_gib"] = row["peak_mem_gib"] - teacher_gib
    return row


def run_synth(spec: dict[str, Any]) -> dict[str, Any]:
    """Rows and generated tokens per second of the self-instruct pipeline on the engine."""
    from distill.synth import synthesize
    from engine import LLM, SamplingParams
    from trainer.config import load_config

    cfg = load_config([f"synth.num_instructions={spec['synth_rows']}", f"synth.num_arithmetic={spec['synth_rows']}",
                       f"synth.batch_size={spec['synth_batch']}", f"synth.max_response_tokens={spec['synth_tokens']}",
                       f"synth.output={spec['output_dir']}/synth.jsonl", f"device={spec['device']}"])
    llm = LLM(model=spec["teacher_dir"], max_num_seqs=spec["synth_batch"])
    counted = {"tokens": 0, "requests": 0}

    def generate(chats, sampling):
        outs = llm.chat(chats, [SamplingParams(**s) for s in sampling])
        counted["tokens"] += sum(len(o.outputs[0].token_ids) for o in outs if o.outputs)
        counted["requests"] += len(outs)
        return [o.outputs[0].text if o.outputs else "" for o in outs]

    generate([[{"role": "user", "content": "warm up"}]], [{"max_tokens": 4}])
    counted.update(tokens=0, requests=0)
    common.synchronize()
    start = time.perf_counter()
    rows, report = synthesize(cfg, generate, spec["teacher_dir"])
    common.synchronize()
    seconds = time.perf_counter() - start
    return {"requests": counted["requests"], "rows_kept": len(rows), "gen_tokens_per_s": counted["tokens"] / seconds,
            "requests_per_s": counted["requests"] / seconds, "wall_s": seconds, "peak_mem_gib": common.peak_memory_gib()}


def main() -> None:
    p = common.bench_parser(__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b", help="teacher shape (the student keeps every 2nd layer)")
    p.add_argument("--cases", type=common.csv_list, default=list(CASES))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--activation-checkpointing", default="full")
    p.add_argument("--synth-rows", type=int, default=256, help="instructions and arithmetic tasks each")
    p.add_argument("--synth-batch", type=int, default=128)
    p.add_argument("--synth-tokens", type=int, default=128)
    p.add_argument("--case-timeout", type=float, default=150)
    p.add_argument("--worker", type=Path, default=None, help="(internal) run one case from its spec file")
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker.read_text())
        result = run_synth(spec) if spec["case"] == "synth" else run_training(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return
    if args.smoke:
        args.shape, args.seq_len, args.micro_batch, args.steps, args.warmup = "tiny", 128, 2, 2, 1
        args.synth_rows, args.synth_batch, args.synth_tokens, args.chunk_size = 4, 4, 8, 64
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        raise SystemExit(f"error: --cases {','.join(bad)} unknown; choose from {','.join(CASES)}")

    import torch

    from distill.students import prune_every_k

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("error: no GPU; run with --smoke to check the code paths on CPU")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-distill-"))
    teacher_dir = common.build_model_dir(args.shape, workdir / "teacher", dtype="bfloat16" if device == "cuda" else "float32")
    student_dir = workdir / "student"
    if not (student_dir / "config.json").is_file():
        prune_every_k(teacher_dir, 2, student_dir)
    tokens = int(1.2 * (args.warmup + args.steps + 2) * args.micro_batch * args.seq_len)
    corpus = common.write_corpus(workdir / "corpus", common.corpus_documents(common.load_tokenizer(), tokens, args.seq_len - 1))

    rows, notes = [], [n for n in [common.vocab_note(args.shape)] if n]
    for case in args.cases:
        spec = dict(case=case, device=device, teacher_dir=teacher_dir, student_dir=str(student_dir), corpus_dir=str(corpus),
                    seq_len=args.seq_len, micro_batch=args.micro_batch, steps=args.steps, warmup=args.warmup, topk=args.topk,
                    chunk_size=args.chunk_size, activation_checkpointing=args.activation_checkpointing,
                    synth_rows=args.synth_rows, synth_batch=args.synth_batch, synth_tokens=args.synth_tokens,
                    output_dir=str(workdir / f"run-{case}"), result=str(common.worker_result_path(workdir, case)))
        spec_path = workdir / "specs" / f"{case}.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec))
        print(f"== {case}", flush=True)
        row = {"case": case, **common.run_worker([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                                 Path(spec["result"]), timeout=args.case_timeout, label=case)}
        if "error" in row:
            notes.append(f"{case} failed: {row['error']}")
        rows.append(row)
        common.save_results(args.out, "distill_gpu", args, rows, notes=notes, verdict=verdict(rows))

    common.print_table(f"KD vs SFT: student = {args.shape} every 2nd layer, {args.seq_len} tokens x {args.micro_batch}, "
                       f"{args.steps} steps after {args.warmup} warm-up", [r for r in rows if r["case"] != "synth"],
                       [("case", "case"), ("tokens_per_s", "tokens/s"), ("step_ms", "step ms"), ("peak_mem_gib", "peak GiB"),
                        ("peak_minus_teacher_gib", "peak - teacher GiB"), ("final_loss", "final loss")])
    common.print_table("synthetic data on the engine", [r for r in rows if r["case"] == "synth"],
                       [("case", "case"), ("requests", "requests"), ("requests_per_s", "req/s"), ("gen_tokens_per_s", "gen tokens/s"),
                        ("wall_s", "wall s"), ("peak_mem_gib", "peak GiB")],
                       notes=notes + [f"{k}: {v}" for k, v in verdict(rows).items()])


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """KD peak / SFT peak for each KD case, against the 1.15 target."""
    by_case = {r["case"]: r for r in rows}
    sft = (by_case.get("sft") or {}).get("peak_mem_gib")
    out: dict[str, Any] = {}
    if not sft:
        return out
    for case, key in (("kd-online", "peak_mem_gib"), ("kd-online", "peak_minus_teacher_gib"), ("kd-offline", "peak_mem_gib")):
        value = (by_case.get(case) or {}).get(key)
        if value:
            out[f"{case} {key} / sft"] = round(value / sft, 3)
            out[f"{case} {key} target met"] = value / sft <= TARGET_MEM_RATIO
    return out


if __name__ == "__main__":
    main()
