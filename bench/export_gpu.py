"""GPU benchmark for the export stage, in one call on one GPU (~6 min on an H100):

    python bench/export_gpu.py --out $OUT/export_gpu.json     # H100
    python bench/export_gpu.py --smoke                        # CPU, tiny shapes: the code paths only

1. ``gemm``: the Triton AWQ int4 kernels against bf16 ``torch.matmul`` at the linear shapes of
   SmolLM2-135M, Qwen3-0.6B and Llama-3-8B, M in {1, 8, 16, 32, 64, 128} tokens: ``awq`` (what the
   engine calls: fused split-K up to FUSED_MAX_M rows, dequantize + cuBLAS above), and both paths
   forced, so the crossover can be checked. CUDA graphs of 20 calls, median of 30 replays, L2 flushed
   before each replay so weights come from HBM. Every result is checked against torch dequant+matmul.
2. ``engine``: decode throughput of our engine, AWQ int4 vs bf16, at batch 1 and 32 (prompts of 32
   random ids, 256 greedy tokens, ignore_eos), on random-init SmolLM2-135M and Qwen3-0.6B shapes
   (SmolLM2 tokenizer, vocab 49152). The AWQ dir is the bf16 model round-to-nearest packed (no
   calibration: decode speed does not depend on how the int4 values were chosen, and AWQ search on
   a random model would only cost time).
3. ``exports``: wall time of each export (merged, AWQ, GGUF q8_0 and q4_k_m, verification included)
   of a random-init SmolLM2-135M with a rank-16 LoRA adapter through ``launch/export.py``'s pipeline
   (the embedded model is not carried to the GPU machine). Exports run on the CPU, as for users.

Each (part, case) runs in its own process (clean CUDA context and allocator); results land in one
JSON (--out) and rich tables, the last one a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (bench_parser, build_model_dir, csv_list, print_table, run_worker,  # noqa: E402
                          save_results, worker_result_path)

GEMM_SHAPES = {  # name -> (in_features K, out_features N)
    "smollm2 qkv": (576, 960),
    "smollm2 gate+up": (576, 3072),
    "smollm2 down": (1536, 576),
    "qwen3-0.6b gate+up": (1024, 6144),
    "qwen3-0.6b down": (3072, 1024),
    "llama-8b qkv": (4096, 6144),
    "llama-8b gate+up": (4096, 28672),
    "llama-8b down": (14336, 4096),
}
GEMM_ROWS = (1, 8, 16, 32, 64, 128)
SMOKE_GEMM = {"tiny qkv": (64, 128), "tiny down": (128, 64)}
EXPORT_JOBS = [("merged", []), ("awq", ["awq.calib_samples=16"]), ("gguf", ["gguf.type=q8_0"]), ("gguf", ["gguf.type=q4_k_m"])]
SMOKE_EXPORT_OPTIONS = ["verify.num_seqs=1", "verify.seq_len=32", "verify.greedy_tokens=4", "awq.calib_samples=2",
                        "awq.calib_seq_len=64", "awq.n_grid=2", "awq.search_tokens=64"]


# ---------------------------------------------------------------------------------------------
# 1. Kernel micro-benchmark
# ---------------------------------------------------------------------------------------------
def time_per_call(fn, flush, calls: int = 20, reps: int = 30) -> float:
    """Median microseconds per call: CUDA-graph replays with a cold L2 on GPU, wall clock on CPU."""
    import torch

    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles the Triton kernels before capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def gemm_case(name: str, K: int, N: int, rows: tuple[int, ...], device) -> list[dict]:
    import torch

    from export import awq
    from export.awq_triton import awq_dequantize, awq_gemm, awq_gemm_fused

    group = 128 if K % 128 == 0 else 64
    torch.manual_seed(0)
    packed = {k: v.to(device) for k, v in awq.pack_linear(torch.randn(N, K) * 0.02, group).items()}
    qw, qz, sc = packed["qweight"], packed["qzeros"], packed["scales"]
    w_ref = awq.awq_dequant(qw, qz, sc.float(), group)  # [N, K] fp32
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # bf16 tl.dot is wrong in the interpreter
    w_t = w_ref.t().contiguous().to(dtype)  # [K, N] for x @ W
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device) if device.type == "cuda" else None
    out = []
    for m in rows:
        x = torch.randn(m, K, device=device).to(dtype)
        ref = x.float() @ w_ref.t()
        sides = {"awq": lambda: awq_gemm(x, qw, qz, sc, group),
                 "fused": lambda: awq_gemm_fused(x, qw, qz, sc, group),
                 "dequant_mm": lambda: x @ awq_dequantize(qw, qz, sc, group, dtype),
                 "bf16": lambda: x @ w_t}
        row = {"shape": name, "K": K, "N": N, "M": m, "group": group}
        for side, fn in sides.items():
            if side != "bf16":
                err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                row[f"{side}_rel_err"] = err
            row[f"{side}_us"] = time_per_call(fn, flush)
        row["speedup_vs_bf16"] = row["bf16_us"] / row["awq_us"]
        row["max_rel_err"] = max(row[f"{s}_rel_err"] for s in ("awq", "fused", "dequant_mm"))
        out.append(row)
        print(f"{name} M={m}: awq {row['awq_us']:.1f} us, bf16 {row['bf16_us']:.1f} us, err {row['max_rel_err']:.1e}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# 2. Engine decode throughput
# ---------------------------------------------------------------------------------------------
def write_rtn_awq_dir(model_dir: str, out: Path) -> str:
    """``model_dir`` with every decoder linear round-to-nearest packed as AWQ (group 128, else 64)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export import awq

    if (out / "config.json").is_file():
        return str(out)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    group = awq.choose_group_size([m.in_features for m in linears.values()], 128, fallback=True)
    packed = {n: awq.pack_linear(m.weight.detach(), group) for n, m in linears.items()}
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    awq.save_awq(model, packed, group, tmp)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def weight_bytes(model) -> int:
    """Bytes of every tensor the model holds (fp params and the int4 buffers), tied ones once."""
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers()) if t.dim() >= 1}
    rotary = {model.model.rotary_emb.cos.data_ptr(), model.model.rotary_emb.sin.data_ptr()}
    return sum(t.numel() * t.element_size() for p, t in tensors.items() if p not in rotary)


def engine_case(model_dir: str, batches: list[int], new_tokens: int) -> list[dict]:
    import random

    import torch

    from bench.common import now
    from engine import LLM, SamplingParams

    on_gpu = torch.cuda.is_available()
    start = time.perf_counter()
    llm = LLM(model_dir, dtype="bf16" if on_gpu else "fp32", skip_tokenizer_init=True, max_model_len=1024,
              max_num_seqs=max(batches), gpu_memory_utilization=0.5, num_blocks=256)
    startup = time.perf_counter() - start
    model = llm.engine.runner.model
    rng = random.Random(0)
    rows = []
    for batch in batches:
        prompts = [[rng.randrange(3, 10000) for _ in range(32)] for _ in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
        t0 = now()
        outs = llm.generate(prompts, params)
        seconds = now() - t0
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"batch": batch, "tok_per_s": produced / seconds, "ms_per_step": 1e3 * seconds / new_tokens,
                     "startup_s": startup, "weights_mib": weight_bytes(model) / 2**20})
        print(f"batch {batch}: {produced / seconds:,.0f} tok/s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# 3. Export wall times
# ---------------------------------------------------------------------------------------------
def make_lora_run(base_dir: str, out: Path, rank: int = 16) -> str:
    """A PEFT LoRA adapter on ``base_dir`` (all projections) with non-zero B, as a finished run would save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "adapter_config.json").is_file():
        return str(out)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return str(out)


def export_case(run_dir: str, fmt: str, options: list[str], out: Path) -> dict:
    from rich.console import Console

    from export.pipeline import run_export
    from trainer.config import load_config

    cfg = load_config([f"run={run_dir}", f"format={fmt}", f"output_dir={out}", "export.overwrite=true",
                       "verify.backend=transformers", *options])
    t0 = time.time()
    artifacts = run_export(cfg, Console())
    main = artifacts[0]
    return {"format": fmt if fmt != "gguf" else f"gguf {cfg.gguf.type}", "options": " ".join(options), "seconds": time.time() - t0,
            "artifact_s": main.seconds, "bits_per_weight": main.bits_per_weight, "verified": main.passed,
            "checks": {c.metric: c.value for c in main.checks}}


# ---------------------------------------------------------------------------------------------
# Driver: one worker process per case
# ---------------------------------------------------------------------------------------------
def run_case(spec: dict) -> dict:
    """Worker side: the case ``spec`` describes, returned as JSON-able rows."""
    import faulthandler

    import torch

    if spec.get("dump_after_s"):  # a case about to be killed for its timeout says where it was
        faulthandler.dump_traceback_later(spec["dump_after_s"], exit=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # smoke: the Triton kernels run in Triton's CPU interpreter (read when triton is imported)
        os.environ["TRITON_INTERPRET"] = "1"
    if spec["part"] == "gemm":
        shapes = SMOKE_GEMM if spec["smoke"] else GEMM_SHAPES
        rows = [r for name, (K, N) in shapes.items() for r in gemm_case(name, K, N, tuple(spec["rows"]), device)]
    elif spec["part"] == "engine":
        rows = engine_case(spec["model_dir"], spec["batches"], spec["new_tokens"])
    else:
        rows = [export_case(spec["run_dir"], spec["format"], spec["options"], Path(spec["out"]))]
    return {"rows": [dict(r, **spec.get("tag", {})) for r in rows]}


def worker(spec: dict, timeout: float, workdir: Path, label: str) -> list[dict]:
    result_path = worker_result_path(workdir, label.replace(" ", "_").replace("/", "_"))
    spec_path = result_path.with_suffix(".spec.json")
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(dict(spec, dump_after_s=max(5.0, timeout - 10))))
    result = run_worker([sys.executable, __file__, "--worker", str(spec_path), "--result", str(result_path)],
                        result_path, timeout, label)
    if "error" in result:
        print(f"[{label}] failed: {result['error']}", flush=True)
        return [dict(spec.get("tag", {}), error=result["error"])]
    return result["rows"]


def engine_rows(args, workdir: Path, build_dir) -> list[dict]:
    shapes = ["tiny"] if args.smoke else csv_list(args.engine_shapes)
    batches = [1, 4] if args.smoke else [1, 32]
    new_tokens = 8 if args.smoke else 256
    rows = []
    for shape in shapes:
        bf16_dir = build_dir(shape, workdir / f"{shape}-bf16")
        awq_dir = write_rtn_awq_dir(bf16_dir, workdir / f"{shape}-awq")
        for weights, model_dir in (("bf16", bf16_dir), ("awq int4", awq_dir)):
            spec = {"part": "engine", "smoke": args.smoke, "model_dir": model_dir, "batches": batches, "new_tokens": new_tokens,
                    "tag": {"shape": shape, "weights": weights}}
            rows += worker(spec, args.case_timeout, workdir, f"engine {shape} {weights}")
    by_key = {(r["shape"], r["weights"], r.get("batch")): r for r in rows}
    for r in rows:  # AWQ throughput relative to bf16 at the same shape and batch
        base = by_key.get((r["shape"], "bf16", r.get("batch")))
        if r["weights"] != "bf16" and base and "tok_per_s" in r and "tok_per_s" in base:
            r["vs_bf16"] = r["tok_per_s"] / base["tok_per_s"]
    return rows


def export_rows(args, workdir: Path, build_dir) -> list[dict]:
    shape = "tiny" if args.smoke else "smollm2-135m"
    base = build_dir(shape, workdir / f"{shape}-fp32", dtype="float32")
    run_dir = make_lora_run(base, workdir / f"{shape}-lora")
    rows = []
    for fmt, options in EXPORT_JOBS:
        label = " ".join(["export", fmt, *options])
        spec = {"part": "export", "smoke": args.smoke, "run_dir": run_dir, "format": fmt,
                "options": options + (SMOKE_EXPORT_OPTIONS if args.smoke else []),
                "out": str(workdir / "artifacts" / label.replace(" ", "_")), "tag": {"shape": shape}}
        rows += [dict(r, options=" ".join(options)) for r in worker(spec, args.case_timeout, workdir, label)]
    return rows


def main() -> int:
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="gemm,engine,exports", help="which parts to run")
    parser.add_argument("--engine-shapes", default="smollm2-135m,qwen3-0.6b", help="model shapes of the decode benchmark")
    parser.add_argument("--case-timeout", type=float, default=200, help="seconds one worker may take")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(run_case(json.loads(args.worker.read_text()))))
        return 0
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("error: needs a CUDA GPU (or --smoke for the CPU code-path check)")
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="export_gpu-"))
    parts = csv_list(args.parts)
    results: dict[str, list[dict]] = {"gemm": [], "engine": [], "exports": []}

    def save() -> None:
        save_results(args.out, "export_gpu", args, results["gemm"], engine=results["engine"], exports=results["exports"])

    # The exports only use the CPU and the GEMM timings are CUDA-graph replays that the host barely
    # touches, so the two overlap; the engine's decode steps have host work, so it runs alone after.
    exports = threading.Thread(target=lambda: results.__setitem__("exports", export_rows(args, workdir, build_model_dir)))
    if "exports" in parts:
        exports.start()
    if "gemm" in parts:
        spec = {"part": "gemm", "smoke": args.smoke, "rows": [1, 20] if args.smoke else list(GEMM_ROWS)}
        results["gemm"] = worker(spec, 2 * args.case_timeout, workdir, "gemm")
        save()
    if "exports" in parts:
        exports.join()
        save()
    if "engine" in parts:
        results["engine"] = engine_rows(args, workdir, build_model_dir)
        save()
    print_tables(results)
    bad = [r for r in results["gemm"] if r.get("max_rel_err", 0) >= 1e-2]
    failed = [r for part in results.values() for r in part if "error" in r]
    return 1 if bad or failed else 0


def print_tables(results: dict[str, list[dict]]) -> None:
    print_table("AWQ int4 Triton GEMM vs bf16 matmul (median us/call, CUDA graph, cold L2)", results["gemm"],
                [("shape", "shape"), ("M", "M"), ("awq_us", "awq us"), ("fused_us", "fused us"), ("dequant_mm_us", "dequant+mm us"),
                 ("bf16_us", "bf16 us"), ("speedup_vs_bf16", "bf16/awq"), ("max_rel_err", "max rel err")],
                ["awq = what the engine calls (fused split-K up to FUSED_MAX_M rows, dequantize + cuBLAS above)"])
    print_table("export wall time (random-init model + LoRA rank 16, CPU, verification included)", results["exports"],
                [("shape", "shape"), ("format", "format"), ("options", "options"), ("seconds", "total s"),
                 ("artifact_s", "write s"), ("bits_per_weight", "bits/weight"), ("verified", "verified"), ("error", "error")],
                ["random weights: the verification thresholds are for trained models; wall time is what is measured here"])
    print_table("engine decode throughput, AWQ int4 vs bf16 (256 greedy tokens, prompts of 32 ids)", results["engine"],
                [("shape", "shape"), ("weights", "weights"), ("batch", "batch"), ("tok_per_s", "tok/s"), ("ms_per_step", "ms/step"),
                 ("vs_bf16", "vs bf16"), ("weights_mib", "weights MiB"), ("startup_s", "startup s"), ("error", "error")])


if __name__ == "__main__":
    sys.exit(main())
