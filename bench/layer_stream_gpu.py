"""Prototype: a decoder layer's four batch-1 projections as one persistent, software-pipelined weight stream.

Question for the batch-1 roofline (#4): can one kernel keep HBM streaming across a layer's stage
boundaries, where the engine's chain of GEMV kernels (one per projection, PDL) leaves it idle? Here
each program walks a flattened list of [BN, 1024] weight tiles — its row blocks of qkv, o, gate_up
and down for every layer in turn — in one ``tl.range`` loop, so Triton's software pipeliner keeps
``--stages``-1 tiles in flight through shared memory (``cp.async``) *across* the stage boundaries.
At the first tile of a stage every program meets the others at a grid barrier (the previous stage's
outputs are its inputs), written as one inline-PTX block — CTA barrier, one release arrival per
program, an acquire spin, CTA barrier, CUTLASS's stream-K barrier — because a ``debug_barrier`` or
a spin loop in the body stops the pipeliner. Values are not a model's (x is each stage's previous
output, not normed or attended): this measures the stream and the barriers, against the engine's
GEMV kernels over the same weights in the same process and the device's copy bandwidth.

    python bench/layer_stream_gpu.py --out $OUT/layer_stream_gpu.json     # H100, ~1 min
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_parser, csv_list, print_table, save_results  # noqa: E402

# (hidden, q_size + 2 kv_size, q_size, intermediate, layers) of the benched shapes
SHAPES = {"qwen3-0.6b": (1024, 4096, 2048, 3072, 28), "llama-3.2-1b": (2048, 3072, 2048, 8192, 16)}
BK = 1024

BARRIER = r"""{
.reg .pred p, leader, skip;
.reg .b32 tid, seen;
setp.eq.s32 skip, $2, 0;
@skip bra DONE${:uid};
bar.sync 0;
mov.u32 tid, %tid.x;
setp.eq.u32 leader, tid, 0;
@leader red.release.gpu.global.add.s32 [$1], 1;
@!leader bra WAIT${:uid};
SPIN${:uid}:
ld.acquire.gpu.global.b32 seen, [$1];
setp.lt.s32 p, seen, $3;
@p bra SPIN${:uid};
WAIT${:uid}:
bar.sync 0;
DONE${:uid}:
mov.b32 $0, 0;
}"""


def build_kernel():
    import triton
    import triton.language as tl

    barrier_asm = tl.constexpr(BARRIER)

    @triton.jit
    def _pick(s, a0, a1, a2, a3):
        return tl.where(s == 0, a0, tl.where(s == 1, a1, tl.where(s == 2, a2, a3)))

    @triton.jit
    def layer_stream_kernel(w_ptr, x_ptr, count_ptr,
                            N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
                            K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                            LAYERS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PROGRAMS: tl.constexpr,
                            STAGES: tl.constexpr):
        pid = tl.program_id(0)
        # per stage: tiles per program = (row blocks per program) x (K chunks); offsets of each stage's matrix
        I0: tl.constexpr = (N0 // BN + PROGRAMS - 1) // PROGRAMS * (K0 // BK)
        I1: tl.constexpr = (N1 // BN + PROGRAMS - 1) // PROGRAMS * (K1 // BK)
        I2: tl.constexpr = (N2 // BN + PROGRAMS - 1) // PROGRAMS * (K2 // BK)
        I3: tl.constexpr = (N3 // BN + PROGRAMS - 1) // PROGRAMS * (K3 // BK)
        PER_LAYER: tl.constexpr = I0 + I1 + I2 + I3
        LAYER_ELEMS: tl.constexpr = N0 * K0 + N1 * K1 + N2 * K2 + N3 * K3
        X_STRIDE: tl.constexpr = 16384  # each stage's input slot in x (and the previous stage's output)
        rows = tl.arange(0, BN)
        cols = tl.arange(0, BK)
        acc = tl.zeros([BN], tl.float32)
        for i in tl.range(0, LAYERS * PER_LAYER, num_stages=STAGES):
            layer = i // PER_LAYER
            j = i - layer * PER_LAYER
            s = (j >= I0).to(tl.int32) + (j >= I0 + I1).to(tl.int32) + (j >= I0 + I1 + I2).to(tl.int32)
            j = j - _pick(s, 0, I0, I0 + I1, I0 + I1 + I2)
            k_dim = _pick(s, K0, K1, K2, K3)
            chunks = k_dim // BK
            block = pid + (j // chunks) * PROGRAMS  # row block of the stage
            chunk = j % chunks
            n_dim = _pick(s, N0, N1, N2, N3)
            offset = layer.to(tl.int64) * LAYER_ELEMS + _pick(s, 0, N0 * K0, N0 * K0 + N1 * K1, N0 * K0 + N1 * K1 + N2 * K2)
            row = block * BN + rows
            valid = row < n_dim
            w = tl.load(w_ptr + offset + row[:, None].to(tl.int64) * k_dim + chunk * BK + cols[None, :],
                        mask=valid[:, None], other=0.0)
            g = layer * 4 + s  # global stage: wait until every program has finished the one before
            tl.inline_asm_elementwise(barrier_asm, "=r,l,r,r", [count_ptr, ((j == 0) & (g > 0)).to(tl.int32), g * PROGRAMS],
                                      dtype=tl.int32, is_pure=False, pack=1)
            # read after the barrier, through L2, by inline PTX: the pipeliner would fetch a tl.load (volatile or
            # not) stages ahead, before the previous stage wrote it; a real layer needs that order, so the
            # prototype pays for it too
            x = tl.inline_asm_elementwise("ld.global.cg.b16 $0, [$1];", "=h,l", [x_ptr + s * X_STRIDE + chunk * BK + cols],
                                          dtype=tl.bfloat16, is_pure=False, pack=1).to(tl.float32)
            acc = tl.where(chunk == 0, 0.0, acc) + tl.sum(w.to(tl.float32) * x[None, :], 1)
            out = ((s + 1) % 4) * X_STRIDE + row  # the next stage's input
            tl.store(x_ptr + out, acc.to(tl.bfloat16), mask=valid & (chunk == chunks - 1))
        # the last program out resets the counter for graph replays: by then every program has passed every wait
        if tl.atomic_add(count_ptr, 1) == LAYERS * 4 * PROGRAMS - 1:
            tl.atomic_xchg(count_ptr, 0)

    return layer_stream_kernel


def graph_us(fn, reps: int = 5) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3)
    return best


def projection_dims(shape: str) -> tuple[list[tuple[int, int]], int]:
    """([N, K] of qkv, o, gate_up, down], layers) of a benched shape."""
    hidden, qkv, q_size, inter, layers = SHAPES[shape]
    return [(qkv, hidden), (hidden, q_size), (2 * inter, hidden), (hidden, inter)], layers


def device_setup():
    """(device, SM count, copy bandwidth in bytes per second) of the GPU."""
    import torch

    dev = torch.device("cuda")
    return dev, torch.cuda.get_device_properties(dev).multi_processor_count, copy_bandwidth(dev)


def copy_bandwidth(dev) -> float:
    """Device copy bandwidth, bytes read + written per second (256 MB, from a CUDA graph)."""
    import torch

    src = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (graph_us(lambda: dst.copy_(src)) * 1e-6)


def gemv_chain_us(views: list, extra_configs=()) -> tuple[float, dict]:
    """The engine's batch-1 path over ``views`` (each layer's [N, K] projections, in step order): one GEMV
    kernel per projection with PDL, each shape with its fastest whole-slice row config (timed over that
    shape's matrices). Returns (µs for the whole chain, {(N, K): config})."""
    import torch

    from engine.kernels import set_pdl
    from engine.kernels.gemv import Workspace, gemv, whole_slice_configs

    set_pdl(True)
    dev = views[0].device
    ws, best = Workspace(dev), {}
    for n, k in dict.fromkeys(tuple(v.shape) for v in views):
        xs = torch.randn(1, k, device=dev).bfloat16()
        mats = [v for v in views if tuple(v.shape) == (n, k)]
        timed = []
        for cfg in whole_slice_configs(k) + [c(k) for c in extra_configs]:
            ws.reserve(n, cfg)
            timed.append((graph_us(lambda: [gemv(xs, m, None, cfg, ws) for m in mats]) / len(mats), cfg))
        best[(n, k)] = min(timed, key=lambda t: t[0])[1]
    xin = {k: torch.randn(1, k, device=dev).bfloat16() for _, k in best}
    return graph_us(lambda: [gemv(xin[v.shape[1]], v, None, best[tuple(v.shape)], ws) for v in views]), best


def baseline_row(shape: str, layers: int, views: list, copy_bw: float, extra_configs=()) -> tuple[dict, float]:
    """What every variant of ``shape`` is compared with, in one row: the weights' copy roofline and the
    engine's GEMV chain over ``views`` (the layers' projections in step order), per layer. Returns
    (row, roofline µs of the whole stream)."""
    nbytes = sum(v.numel() * v.element_size() for v in views)
    roofline_us = nbytes / copy_bw * 1e6
    chain, best = gemv_chain_us(views, extra_configs)
    row = {"shape": shape, "weights_mb": nbytes / 1e6, "copy_bw_gb_s": copy_bw / 1e9, "roofline_us_per_layer": roofline_us / layers,
           "gemv_chain_us_per_layer": chain / layers, "gemv_chain_x_roofline": chain / roofline_us}
    print(f"{shape}: roofline {roofline_us / layers:.2f} us/layer, GEMV chain {chain / layers:.2f} us/layer "
          f"({', '.join(str(c) for c in best.values())})", flush=True)
    return row, roofline_us


def time_variant(row: dict, name: str, launch, layers: int, roofline_us: float, state=lambda: "") -> None:
    """Time ``launch`` (one whole stream) from a CUDA graph into ``row`` as ``<name> us_per_layer`` and
    ``<name> x_roofline``; a variant the compiler or the launch rejects is reported and recorded, not fatal.
    ``state()``: what to print after the time (e.g. the barrier counters, back at zero)."""
    try:
        us = graph_us(launch)
    except Exception as e:
        print(f"  {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        row[f"{name} error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return
    row[f"{name} us_per_layer"] = us / layers
    row[f"{name} x_roofline"] = us / roofline_us
    print(f"  {name}: {us / layers:.2f} us/layer = {us / roofline_us:.2f}x roofline {state()}", flush=True)


def report(rows: list[dict], title: str, name: str, args) -> None:
    """The µs-per-layer table of every shape and variant, and the JSON."""
    columns = list(dict.fromkeys(k for r in rows for k in r if "us_per_layer" in k))
    print_table(title, [{"shape": r["shape"], **{k: r[k] for k in columns if k in r}} for r in rows],
                [("shape", "shape")] + [(k, k.replace(" us_per_layer", "").replace("_us_per_layer", "")) for k in columns])
    save_results(args.out, name, args, rows)


def main() -> int:
    import torch

    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", type=csv_list, default=list(SHAPES))
    p.add_argument("--stages", type=csv_list, default=["3", "5"], help="software-pipeline depths to time")
    p.add_argument("--block-n", type=csv_list, default=["4", "8"], help="rows per tile")
    args = p.parse_args()
    from engine.kernels.gemv import GemvConfig

    kernel = build_kernel()
    dev, sms, copy_bw = device_setup()
    rows = []
    for shape in args.shapes:
        dims, layers = projection_dims(shape)
        w = (torch.randn(layers * sum(n * k for n, k in dims), device=dev) * 0.02).bfloat16()
        x = torch.randn(4 * 16384, device=dev).bfloat16()
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        views, offset = [], 0
        for layer in range(layers):
            for n, k in dims:
                views.append(w[offset:offset + n * k].view(n, k))
                offset += n * k
        row, roofline_us = baseline_row(shape, layers, views, copy_bw,
                                        [lambda k: GemvConfig(1, 8, 512, max(1, k // 512), 4, 1)])
        for stages in map(int, args.stages):
            for bn in map(int, args.block_n):
                def run():
                    kernel[(sms,)](w, x, counter, *[n for n, _ in dims], *[k for _, k in dims], LAYERS=layers, BN=bn,
                                   BK=BK, PROGRAMS=sms, STAGES=stages, num_warps=8)
                time_variant(row, f"persistent s{stages} n{bn}", run, layers, roofline_us,
                             lambda: f"(counter reset: {counter.item() == 0})")
        rows.append(row)
    report(rows, "one decoder layer's four projections at batch 1: GEMV chain vs one persistent pipelined stream",
           "layer_stream_gpu", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
