"""A wide GEMV config sweep at batch 1: which tile shapes stream a layer projection fastest.

The engine's start-up tuner times only a handful of candidates (engine/kernels/gemv.py
``candidate_configs``: each is a Triton compile at start-up); this bench times many more, each over
every layer's own weights inside one CUDA graph (as the tuner and a decode step do: HBM, not L2),
with PDL as the engine runs it, against cuBLAS (``F.linear`` alone, without the norm/activation
kernel its path also needs: a lower bound for the unfused path). What wins here is what to add to
the candidates.

    python bench/gemv_sweep.py --out $OUT/gemv_sweep.json          # H100, ~2 min
"""
from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_parser, csv_list, print_table, save_results  # noqa: E402

# (name, N, K, prologue, layers) per shape: the published configs' layer projections, largest first
SHAPES = {
    "llama-3.2-1b": [("gate_up", 16384, 2048, "add_rms_norm", 16), ("down", 2048, 8192, "silu_mul", 16),
                     ("qkv", 3072, 2048, "add_rms_norm", 16), ("o", 2048, 2048, "none", 16)],
    "qwen3-0.6b": [("gate_up", 6144, 1024, "add_rms_norm", 28), ("down", 1024, 3072, "silu_mul", 28),
                   ("qkv", 4096, 1024, "add_rms_norm", 28), ("o", 1024, 2048, "none", 28)],
}


FAMILIES = ("row", "dot", "whole", "whole-wide", "engine")


def configs(n: int, k: int, num_sms: int, families: list[str]):
    """The configs of ``families``: row (tile grid), dot (tl.dot), whole (one tile per program's K
    slice: ``whole_slice_configs``), whole-wide (the same for every rows x warps), engine (the start-up
    tuner's candidates, for reference)."""
    import triton

    from engine.kernels.gemv import GemvConfig, candidate_configs, split_k_for, whole_slice_configs

    out = []
    if "engine" in families:
        out += [c for c in candidate_configs(n, k, 1, num_sms) if c.block_m == 1]
    if "whole" in families:
        out += whole_slice_configs(k)
    if "whole-wide" in families:  # one program per row block and K slice, every row count and warp count
        for block_k in sorted({triton.next_power_of_2(k), min(2048, triton.next_power_of_2(k))}):
            for block_n, warps in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8)):
                if block_n * block_k <= 16384 and block_n * block_k >= 32 * warps * 8:
                    out.append(GemvConfig(1, block_n, block_k, triton.cdiv(k, block_k), warps, 1))
    for block_n, block_k, warps in itertools.product((8, 16, 32), (128, 256, 512), (4, 8)) if "row" in families else ():
        for per_sm in (4, 8):  # programs per SM the split-K aims for
            out.append(GemvConfig(1, block_n, block_k, split_k_for(n, k, block_n, block_k, num_sms, per_sm), warps, 2))
    for block_n, block_k, warps, stages in ((32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3)) if "dot" in families else ():
        out.append(GemvConfig(16, block_n, block_k, split_k_for(n, k, block_n, block_k, num_sms), warps, stages))
    return list(dict.fromkeys(out))


def main() -> int:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", type=csv_list, default=["llama-3.2-1b"])
    p.add_argument("--families", type=csv_list, default=["row", "dot", "whole"], help=f"config families: {', '.join(FAMILIES)}")
    p.add_argument("--time-budget", type=float, default=150.0, help="seconds; the remaining projections are skipped")
    args = p.parse_args()
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        p.error(f"--families: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FAMILIES)}")
    import torch
    import torch.nn.functional as F

    from engine.kernels import set_pdl
    from engine.kernels.gemv import Workspace, gemv
    from engine.kernels.gemv_tuning import _graph_time_us

    if not torch.cuda.is_available():
        print("error: needs a GPU", file=sys.stderr)
        return 2
    set_pdl(True)
    dev = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    start, rows = time.perf_counter(), []
    for shape in args.shapes:
        for name, n, k, prologue, layers in SHAPES[shape]:
            if time.perf_counter() - start > args.time_budget:
                print(f"time budget spent: skipping {shape} {name}", flush=True)
                continue
            weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
            x = torch.randn(1, 2 * k if prologue == "silu_mul" else k, device=dev, dtype=torch.bfloat16)
            residual = torch.randn(1, k, device=dev, dtype=torch.bfloat16) if prologue == "add_rms_norm" else None
            norm = torch.ones(k, device=dev, dtype=torch.bfloat16)
            plain = x[:, :k].contiguous()
            cublas = _graph_time_us(lambda: [F.linear(plain, w) for w in weights], 3) / layers
            workspace = Workspace(dev)
            timed = []
            for config in configs(n, k, num_sms, args.families):
                workspace.reserve(n, config)
                try:
                    us = _graph_time_us(lambda c=config: [gemv(x, w, None, c, workspace, prologue, residual, norm, 1e-6)
                                                          for w in weights], 3) / layers
                except Exception as e:  # a config the compiler rejects is not a candidate
                    print(f"{shape} {name} {config}: {type(e).__name__}", flush=True)
                    continue
                timed.append((us, config))
            timed.sort(key=lambda t: t[0])
            nbytes = n * k * 2
            for rank, (us, config) in enumerate(timed[:3]):
                rows.append({"shape": shape, "projection": name, "prologue": prologue, "rank": rank + 1, "config": str(config),
                             "num_stages": config.num_stages, "us": us, "gb_s": nbytes / us / 1e3, "cublas_us": cublas,
                             "vs_cublas": cublas / us, "configs_timed": len(timed)})
            print(f"{shape} {name}: best {timed[0][1]} {timed[0][0]:.2f} us vs cuBLAS {cublas:.2f} us", flush=True)
            save_results(args.out, "gemv_sweep", args, rows)
            weights = []  # free this projection's weights before the next one
            torch.cuda.empty_cache()
    print_table("GEMV sweep at batch 1 (top 3 per projection; PDL on; cuBLAS = F.linear alone)", rows, [
        ("shape", "shape"), ("projection", "proj"), ("rank", "#"), ("config", "config"), ("num_stages", "stages"), ("us", "us"),
        ("gb_s", "GB/s"), ("cublas_us", "cuBLAS us"), ("vs_cublas", "x cuBLAS"), ("configs_timed", "timed")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
