"""GPU benchmark for the export stage, one call on one GPU:

    python bench/export_gpu.py [--out bench_out/export] [--quick]

1. Correctness: the Triton AWQ dequant-GEMM vs torch dequant+matmul at every shape it is timed at.
2. Decode-shape GEMM time, Triton AWQ int4 vs bf16 ``torch.matmul``, M in {1, 8, 32, 128}, over the
   linear shapes of SmolLM2-135M, Qwen3-0.6B-like and Llama-8B-like layers (CUDA graphs of 20
   calls, median of 30 replays after warmup, L2 flushed between replays so weights come from HBM).
3. Export wall times for the embedded model (merged, AWQ, GGUF q8_0 / q4_k_m), when the model files
   are present on the machine (they are carried with the repo cache or skipped).

Writes ``results.json`` and ``awq_gemm.png`` under --out and prints rich tables.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from export import awq  # noqa: E402

SHAPES = {  # name -> (in_features K, out_features N)
    "smollm2 qkv (576->960)": (576, 960),
    "smollm2 up+gate (576->3072)": (576, 3072),
    "smollm2 down (1536->576)": (1536, 576),
    "qwen3-0.6b up+gate (1024->6144)": (1024, 6144),
    "llama-8b qkv (4096->6144)": (4096, 6144),
    "llama-8b up+gate (4096->28672)": (4096, 28672),
    "llama-8b down (14336->4096)": (14336, 4096),
}
BATCHES = (1, 8, 32, 128)


def _time_graph(fn, flush: torch.Tensor, calls: int = 20, reps: int = 30) -> float:
    """Median microseconds per call of ``fn`` captured in a CUDA graph (launch overhead excluded)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        flush.zero_()  # evict L2 so weights stream from HBM, as in real decode
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def bench_gemm(console: Console, quick: bool) -> list[dict]:
    from export.awq_triton import awq_gemm

    flush = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device="cuda")
    rows = []
    shapes = dict(list(SHAPES.items())[:3]) if quick else SHAPES
    for name, (K, N) in shapes.items():
        torch.manual_seed(0)
        w = torch.randn(N, K, device="cuda") * 0.02
        packed = {k: v.cuda() for k, v in awq.pack_linear(w.cpu(), 128 if K % 128 == 0 else 64).items()}
        group = 128 if K % 128 == 0 else 64
        w_deq = awq.awq_dequant(packed["qweight"], packed["qzeros"], packed["scales"].float(), group).to(torch.bfloat16)
        w_bf16 = w_deq.t().contiguous()  # [K, N]: x @ W
        scales16 = packed["scales"]
        for m in BATCHES:
            x = torch.randn(m, K, device="cuda", dtype=torch.float16)
            out = awq_gemm(x, packed["qweight"], packed["qzeros"], scales16, group)
            ref = (x.float() @ w_deq.float().t())
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            xb = x.to(torch.bfloat16)
            t_awq = _time_graph(lambda: awq_gemm(x, packed["qweight"], packed["qzeros"], scales16, group), flush)
            t_bf16 = _time_graph(lambda: torch.matmul(xb, w_bf16), flush)
            rows.append({"shape": name, "K": K, "N": N, "M": m, "awq_us": t_awq, "bf16_us": t_bf16,
                         "speedup": t_bf16 / t_awq, "rel_err": err})
    table = Table(title="AWQ int4 Triton GEMM vs bf16 matmul (median us/call, CUDA graph, cold L2)")
    for col in ("shape", "M", "awq us", "bf16 us", "speedup", "max rel err"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["shape"], str(r["M"]), f"{r['awq_us']:.1f}", f"{r['bf16_us']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['rel_err']:.1e}", style=None if r["rel_err"] < 1e-2 else "red")
    console.print(table)
    return rows


def bench_exports(console: Console, out: Path, quick: bool) -> list[dict]:
    """Wall time of each export of the embedded model through launch/export.py's pipeline."""
    try:
        from trainer.models import resolve_model_path

        resolve_model_path("smollm2-135m-instruct")
    except Exception as e:  # noqa: BLE001 - the model package may not be carried to this machine
        console.print(f"[yellow]export timings skipped: embedded model unavailable ({e})[/]")
        return []
    from export.pipeline import run_export
    from trainer.config import load_config

    jobs = [("merged", []), ("gguf", ["gguf.type=q8_0"]), ("gguf", ["gguf.type=q4_k_m"]), ("awq", ["awq.calib_samples=64"])]
    rows = []
    for fmt, extra in jobs[:2] if quick else jobs:
        cfg = load_config(["run=smollm2-135m-instruct", f"format={fmt}", f"output_dir={out / 'artifacts' / fmt}",
                           "export.overwrite=true", "verify.backend=transformers", *extra])
        t0 = time.time()
        artifacts = run_export(cfg, console)
        rows.append({"format": fmt, "options": extra, "seconds": time.time() - t0,
                     "bits_per_weight": artifacts[0].bits_per_weight, "passed": artifacts[0].passed,
                     "checks": {c.metric: c.value for c in artifacts[0].checks}})
    table = Table(title="export wall time, SmolLM2-135M (incl. verification)")
    for col in ("format", "options", "seconds", "bits/weight", "verified"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["format"], " ".join(r["options"]), f"{r['seconds']:.1f}", f"{r['bits_per_weight']:.2f}", str(r["passed"]))
    console.print(table)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = [(r["M"], r["speedup"]) for r in rows if r["shape"] == shape]
        ax.plot(*zip(*pts), marker="o", label=shape)
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per GEMM (M)")
    ax.set_ylabel("bf16 time / AWQ time")
    ax.set_title("Triton AWQ int4 GEMM speedup over bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_out/export")
    parser.add_argument("--quick", action="store_true", help="three shapes, two exports")
    args = parser.parse_args()
    console = Console()
    if not torch.cuda.is_available():
        console.print("[red]needs a CUDA GPU[/]")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    gemm = bench_gemm(console, args.quick)
    plot(gemm, out / "awq_gemm.png")
    exports = bench_exports(console, out, args.quick)
    (out / "results.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "gemm": gemm, "exports": exports}, indent=2))
    bad = [r for r in gemm if r["rel_err"] >= 1e-2]
    if bad:
        console.print(f"[red]{len(bad)} GEMM results disagree with the torch reference[/]")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
