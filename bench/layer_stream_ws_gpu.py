"""Prototype: a decoder layer's four batch-1 projections as one warp-specialized persistent stream (Gluon).

Follow-up of ``bench/layer_stream_gpu.py`` (session 8), whose software-pipelined persistent loop lost to
the engine's GEMV chain because one program per SM serialized, per tile, the dependent read of the
stage input and the tile's reduction. Here the work is split by warps: a one-warp loader partition
walks the program's weight tiles in consumption order — qkv, o, gate_up, down, then the next layer —
and TMA-copies each [32, 256] tile into a ring of shared-memory slots (an mbarrier pair per slot),
never waiting on a stage boundary, only on a free slot; the consumer warps reduce each tile against
the stage input held in shared memory, summing whole rows in registers (or, in a stage with fewer 32-row
blocks than programs, writing a partial per K chunk that the next stage sums). At a stage boundary only the consumers meet at a grid barrier (named CTA barrier, one
release arrival per program, acquire spin: CUTLASS's stream-K barrier), then sum the partials of the
stage before into the next stage input. Values are not a model's (the next input is the raw sum of
the previous outputs, no norm, attention or activation): this measures the stream and the barriers
against the engine's GEMV chain over the same weights, in the same process.

    python bench/layer_stream_ws_gpu.py --out $OUT/layer_stream_ws_gpu.json     # H100, ~1 min
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_parser, csv_list  # noqa: E402
from bench.layer_stream_gpu import (SHAPES, baseline_row, device_setup, projection_dims, report,  # noqa: E402
                                    time_variant)

# module level: the partitions' constexpr annotations are resolved in this module's globals
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma  # noqa: E402

BN, BK = 32, 256  # a TMA tile: 32 rows x 256 columns of bf16 (16 KB)
MAX_CHUNKS = 32  # stage inputs up to 32 x 256 = 8192 wide

# named CTA barrier 15 over the consumer warps, leader arrives (release) and spins (acquire)
BARRIER = r"""{
.reg .pred p, leader;
.reg .b32 tid, seen;
bar.sync 15, $3;
mov.u32 tid, %tid.x;
setp.eq.u32 leader, tid, 0;
@leader red.release.gpu.global.add.s32 [$1], 1;
@!leader bra WAIT${:uid};
SPIN${:uid}:
ld.acquire.gpu.global.b32 seen, [$1];
setp.lt.s32 p, seen, $2;
@p bra SPIN${:uid};
WAIT${:uid}:
bar.sync 15, $3;
mov.b32 $0, 0;
}"""


def build_kernel():
    barrier_asm = gl.constexpr(BARRIER)

    @gluon.jit
    def _load_tile(desc, row, col, it, bufs, ready, empty, BN: gl.constexpr):
        nbuf: gl.constexpr = bufs.type.shape[0]
        slot = it % nbuf
        mbarrier.wait(empty.index(slot), (it // nbuf & 1) ^ 1)  # slots start empty: the first wait passes
        mbarrier.expect(ready.index(slot), desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [row, col], ready.index(slot), bufs.index(slot).slice(0, BN))
        return it + 1

    @gluon.jit
    def _loader_stage(desc, layer, N: gl.constexpr, K: gl.constexpr, BN: gl.constexpr, SPLIT: gl.constexpr, it, bufs,
                      ready, empty, PROGRAMS: gl.constexpr):
        chunks: gl.constexpr = K // 256
        if SPLIT:  # (row block, K chunk) tiles dealt round-robin
            for t in range(gl.program_id(0), (N // BN) * chunks, PROGRAMS):
                it = _load_tile(desc, layer * N + (t // chunks) * BN, (t % chunks) * 256, it, bufs, ready, empty, BN)
        else:  # whole row blocks dealt round-robin, their chunks in order
            for rb in range(gl.program_id(0), N // BN, PROGRAMS):
                for kc in range(chunks):
                    it = _load_tile(desc, layer * N + rb * BN, kc * 256, it, bufs, ready, empty, BN)
        return it

    @gluon.jit
    def loader(descs, bufs, ready, empty, LAYERS: gl.constexpr, NS: gl.constexpr, KS: gl.constexpr,
               BNS: gl.constexpr, SPLITS: gl.constexpr, PROGRAMS: gl.constexpr):
        d0, d1, d2, d3 = descs
        it = 0
        for layer in range(LAYERS):
            it = _loader_stage(d0, layer, NS[0], KS[0], BNS[0], SPLITS[0], it, bufs, ready, empty, PROGRAMS)
            it = _loader_stage(d1, layer, NS[1], KS[1], BNS[1], SPLITS[1], it, bufs, ready, empty, PROGRAMS)
            it = _loader_stage(d2, layer, NS[2], KS[2], BNS[2], SPLITS[2], it, bufs, ready, empty, PROGRAMS)
            it = _loader_stage(d3, layer, NS[3], KS[3], BNS[3], SPLITS[3], it, bufs, ready, empty, PROGRAMS)

    @gluon.jit
    def _consume_tile(it, bufs, ready, empty, x_smem, kc, BN: gl.constexpr, layout: gl.constexpr):
        """This tile's [BN] partial dot products with chunk ``kc`` of the stage input; frees its slot."""
        nbuf: gl.constexpr = bufs.type.shape[0]
        slot = it % nbuf
        mbarrier.wait(ready.index(slot), it // nbuf & 1)
        w = bufs.index(slot).slice(0, BN).load(layout)
        fence_async_shared()  # order the shared load before the slot's next TMA write
        mbarrier.arrive(empty.index(slot), count=1)
        xc = x_smem.index(kc).load(gl.SliceLayout(0, layout))  # chunk kc of the stage input
        return gl.sum(w.to(gl.float32) * xc.to(gl.float32)[None, :], axis=1)

    @gluon.jit
    def _consume_stage(part_ptr, prev_ptr, count_ptr, g, N: gl.constexpr, K: gl.constexpr, BN: gl.constexpr,
                       SPLIT: gl.constexpr,
                       PREV_PARTS: gl.constexpr, it, bufs, ready, empty, x_smem, PROGRAMS: gl.constexpr,
                       THREADS: gl.constexpr, layout: gl.constexpr, x_layout: gl.constexpr):
        chunks: gl.constexpr = K // 256
        # every program has written its outputs of the stage before: meet, then build this stage's input
        gl.inline_asm_elementwise(barrier_asm, "=r,l,r,r", [count_ptr, (g + 1) * PROGRAMS, THREADS], dtype=gl.int32,
                                  is_pure=False, pack=1)  # every program arrives at every stage start, the first included
        j = gl.arange(0, 256, layout=x_layout)
        for c in gl.static_range(chunks):  # chunk c of the input: the previous stage's parts summed in a fixed order
            x = gl.zeros([256], gl.float32, x_layout)
            for p in gl.static_range(PREV_PARTS):
                x += gl.load(prev_ptr + p * 16384 + c * 256 + j, cache_modifier=".cg")
            x_smem.index(c).store(x.to(gl.bfloat16))
        gl.thread_barrier()
        rows = gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
        if SPLIT:  # one partial per (row block, chunk): part [chunk, N]
            for t in range(gl.program_id(0), (N // BN) * chunks, PROGRAMS):
                partial = _consume_tile(it, bufs, ready, empty, x_smem, t % chunks, BN, layout)
                gl.store(part_ptr + (t % chunks) * 16384 + (t // chunks) * BN + rows, partial)
                it += 1
        else:  # whole rows: the sum over chunks stays in registers, one output per row (part [0, N])
            for rb in range(gl.program_id(0), N // BN, PROGRAMS):
                acc = gl.zeros([BN], gl.float32, gl.SliceLayout(1, layout))
                for kc in range(chunks):
                    acc += _consume_tile(it, bufs, ready, empty, x_smem, kc, BN, layout)
                    it += 1
                gl.store(part_ptr + rb * BN + rows, acc)
        return it

    @gluon.jit
    def consumer(part_ptr, count_ptr, bufs, ready, empty, x_smem, LAYERS: gl.constexpr, NS: gl.constexpr,
                 KS: gl.constexpr, BNS: gl.constexpr, SPLITS: gl.constexpr, PARTS: gl.constexpr, PROGRAMS: gl.constexpr, THREADS: gl.constexpr, layout: gl.constexpr,
                 x_layout: gl.constexpr):
        # partial slots: stage s writes part_ptr + s * 32 * 16384 ([chunks, 16384] fp32); stage s reads stage s - 1's
        P: gl.constexpr = 32 * 16384
        it = 0
        for layer in range(LAYERS):
            g = layer * 4
            it = _consume_stage(part_ptr, part_ptr + 3 * P, count_ptr, g, NS[0], KS[0], BNS[0], SPLITS[0], PARTS[3], it, bufs,
                                ready, empty, x_smem, PROGRAMS, THREADS, layout, x_layout)
            it = _consume_stage(part_ptr + P, part_ptr, count_ptr, g + 1, NS[1], KS[1], BNS[1], SPLITS[1], PARTS[0], it, bufs,
                                ready, empty, x_smem, PROGRAMS, THREADS, layout, x_layout)
            it = _consume_stage(part_ptr + 2 * P, part_ptr + P, count_ptr, g + 2, NS[2], KS[2], BNS[2], SPLITS[2], PARTS[1], it,
                                bufs, ready, empty, x_smem, PROGRAMS, THREADS, layout, x_layout)
            it = _consume_stage(part_ptr + 3 * P, part_ptr + 2 * P, count_ptr, g + 3, NS[3], KS[3], BNS[3], SPLITS[3], PARTS[2],
                                it, bufs, ready, empty, x_smem, PROGRAMS, THREADS, layout, x_layout)
        # the last program out resets the counters for graph replays (every program is past every wait)
        if gl.atomic_add(count_ptr + 1, 1) == PROGRAMS - 1:
            gl.atomic_xchg(count_ptr, 0)
            gl.atomic_xchg(count_ptr + 1, 0)

    @gluon.jit
    def layer_stream_ws_kernel(d0, d1, d2, d3, part_ptr, count_ptr, LAYERS: gl.constexpr, NS: gl.constexpr,
                               KS: gl.constexpr, BNS: gl.constexpr, SPLITS: gl.constexpr, PARTS: gl.constexpr, PROGRAMS: gl.constexpr, NBUF: gl.constexpr, num_warps: gl.constexpr):
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        x_layout: gl.constexpr = gl.BlockedLayout([2], [32], [num_warps], [0])
        bufs = gl.allocate_shared_memory(gl.bfloat16, [NBUF, 32, 256], d0.layout)  # a stage with BN < 32 fills the first rows
        # [chunk, 256]; a rank-1 layout (one less than the shape) so that .index(chunk) is a plain vector
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [32, 256], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NBUF):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (consumer, (part_ptr, count_ptr, bufs, ready, empty, x_smem, LAYERS, NS, KS, BNS, SPLITS, PARTS, PROGRAMS,
                        num_warps * 32, layout, x_layout)),
            (loader, ((d0, d1, d2, d3), bufs, ready, empty, LAYERS, NS, KS, BNS, SPLITS, PROGRAMS)),
        ], [1], [24])

    return layer_stream_ws_kernel


def tile_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)


def main() -> int:
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", type=csv_list, default=list(SHAPES))
    p.add_argument("--buffers", type=csv_list, default=["6", "10"], help="shared-memory ring slots (16 KB each)")
    p.add_argument("--warps", type=csv_list, default=["4", "8"], help="consumer warps")
    args = p.parse_args()
    kernel = build_kernel()
    dev, sms, copy_bw = device_setup()
    rows = []
    for shape in args.shapes:
        dims, layers = projection_dims(shape)
        stage_w = [(torch.randn(layers * n, k, device=dev) * 0.02).bfloat16() for n, k in dims]  # stage-major: [L * N, K]
        views = [w[l * n:(l + 1) * n] for l in range(layers) for w, (n, k) in zip(stage_w, dims)]  # step order
        row, roofline_us = baseline_row(shape, layers, views, copy_bw)
        # rows per tile: 32, or fewer where a stage would have fewer row blocks than ~programs; where even 8 rows
        # leave programs idle, the stage splits K too (one partial per chunk, summed by the next stage)
        bns = tuple(next((b for b in (32, 16, 8) if n // b >= 0.9 * sms), 8) for n, _ in dims)
        descs = [TensorDescriptor.from_tensor(w, [bn, BK], tile_layout()) for w, bn in zip(stage_w, bns)]
        part = torch.zeros(4 * 32 * 16384, dtype=torch.float32, device=dev)
        count = torch.zeros(2, dtype=torch.int32, device=dev)
        splits = tuple(n // bn < 0.9 * sms for (n, _), bn in zip(dims, bns))
        row["rows_per_tile"], row["split_k"] = list(bns), list(splits)
        parts = tuple(k // BK if split else 1 for (_, k), split in zip(dims, splits))
        for nbuf, warps in ((int(b), int(w)) for b in args.buffers for w in args.warps):
            def run():
                kernel[(sms,)](*descs, part, count, LAYERS=layers, NS=tuple(n for n, _ in dims), KS=tuple(k for _, k in dims),
                               BNS=bns, SPLITS=splits, PARTS=parts, PROGRAMS=sms, NBUF=nbuf, num_warps=warps)
            time_variant(row, f"warp-specialized {nbuf} slots {warps} warps", run, layers, roofline_us,
                         lambda: f"(counters {count.tolist()})")
        rows.append(row)
    report(rows, "four batch-1 projections per layer: GEMV chain vs warp-specialized persistent stream (us per layer)",
           "layer_stream_ws_gpu", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
