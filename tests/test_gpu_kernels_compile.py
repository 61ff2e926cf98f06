"""The GPU path's Triton kernels compile for Hopper (sm_90) on this CPU machine.

The interpreter runs the kernels' Python, not the compiler, and twice a GPU session lost a call to a
kernel that only the real compiler rejects (a jit default argument that stays a plain ``str``; an
operand the interpreter accepted). Triton ships ptxas, so every variant the engine launches on an
H100 is compiled here down to a cubin, and the PTX is checked for what the PDL contract promises
(engine/kernels/__init__.py): what may run before ``griddepcontrol.wait`` does, and nothing else.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


def compile_for_hopper(fn, args: dict, constexprs: dict, **options) -> str:
    """PTX of ``fn`` (a Triton or a Gluon kernel) compiled for sm_90 with the argument types of ``args``
    (example values, or a type string such as a Gluon ``tensordesc<...>``) and ``constexprs``."""
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    def kind(value) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, torch.Tensor):
            return "*" + _DTYPES[value.dtype]
        return "fp32" if isinstance(value, float) else "i32"

    missing = set(fn.arg_names) - args.keys() - constexprs.keys()
    assert not missing, f"{fn.__name__}: no example for {sorted(missing)}"
    # specialize as a launch does: an int equal to 1 becomes a constant, tensors (torch allocations) and
    # ints divisible by 16 are marked so, which is what lets the compiler vectorize loads
    constexprs = {**{k: 1 for k, v in args.items() if type(v) is int and v == 1}, **constexprs}
    signature = {name: "constexpr" if name in constexprs else kind(args[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name not in constexprs
             and (isinstance(args[name], torch.Tensor) or (type(args[name]) is int and args[name] % 16 == 0))}
    try:
        source = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
        kernel = triton.compile(source(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), target=HOPPER,
                                options={"num_warps": 4, **options})
    except RuntimeError as e:  # a Triton build without the CUDA backend or its bundled ptxas
        if "ptxas" in str(e).lower():
            pytest.skip(f"cannot compile for sm_90 here: {e}")
        raise
    assert kernel.asm["cubin"], "ptxas produced no cubin"
    return kernel.asm["ptx"]


def _before_wait(ptx: str, needle: str) -> bool:
    return 0 <= ptx.find(needle) < ptx.find("griddepcontrol.wait")


BF16, F32, I32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1), torch.empty(1, dtype=torch.int32)
I64 = torch.empty(1, dtype=torch.int64)


@pytest.mark.parametrize("prologue, block_m, split_k, late, residual, stamps", [
    (1, 1, 1, True, False, False),   # layer 0's qkv: add + RMSNorm prologue, late trigger
    (0, 1, 2, False, True, False),   # o_proj: split-K with the residual epilogue
    (2, 1, 3, False, True, False),   # down_proj: SiLU·mul prologue
    (1, 16, 4, False, False, False),  # the tl.dot family (batches 2-8)
    (0, 1, 2, False, True, True),    # o_proj recording a timeline (engine/kernels/timeline.py)
])
def test_gemv_kernel_compiles_and_keeps_the_pdl_contract(prologue, block_m, split_k, late, residual, stamps):
    from engine.kernels.gemv import _gemv_kernel

    args = dict(x_ptr=BF16, w_ptr=BF16, bias_ptr=BF16, y_ptr=BF16, inv_ptr=F32, norm_ptr=BF16, part_ptr=F32, ticket_ptr=I32,
                res_ptr=BF16, stats_out_ptr=F32, M=1, N=1024, K=1024, x_stride=1024, stats_in_tiles=4, eps=1e-6,
                stamp_ptr=I64)
    block_k = 1024 // split_k if split_k != 3 else 1024
    ptx = compile_for_hopper(_gemv_kernel, args, dict(
        PROLOGUE=prologue, HAS_BIAS=False, STATS_IN=prologue == 1 and not late, STATS_PAD=4, ADD_RESIDUAL=residual,
        BLOCK_M=block_m, BLOCK_N=8 if block_m == 1 else 32, BLOCK_K=block_k, SPLIT_K=split_k, K_TILES=1,
        PRECISION="tf32", USE_PDL=True, LATE_TRIGGER=late, EARLY_EPILOGUE=True, STAMPS=stamps,
        EVICT="evict_first" if stamps else ""),
        num_warps=8 if block_m == 1 else 4)
    assert _before_wait(ptx, "ld.global")  # the first weight tile streams while the predecessor finishes
    trigger, wait = ptx.find("griddepcontrol.launch_dependents"), ptx.find("griddepcontrol.wait")
    assert (trigger > wait) if late else (0 <= trigger < wait)  # late trigger: dependents only after our wait
    assert ("evict_first" in ptx) == stamps  # (the evict-first weight loads ride on the same case)
    # a timeline: stamps at start, after the wait and at the end; none at all when not recording
    assert ptx.count("%globaltimer") == (4 if stamps else 0)  # plus one mark after the reduction
    if stamps:
        assert ptx.find("%globaltimer") < wait < ptx.rfind("%globaltimer")


@pytest.mark.parametrize("prologue, block_n, block_k, split_k", [(0, 2, 2048, 1), (2, 4, 4096, 1), (2, 4, 1024, 3)])
def test_gemv_epilogue_residual_is_requested_before_the_reduction(prologue, block_n, block_k, split_k):
    """o_proj / down_proj (the 0.6B's shapes, K = 3072 as one masked 4096 tile too): with EARLY_EPILOGUE
    the residual's load is issued with x, before the reduction's first CTA barrier; without, after it."""
    from engine.kernels.gemv import _gemv_kernel

    k = 2048 if prologue == 0 else 3072
    args = dict(x_ptr=BF16, w_ptr=BF16, bias_ptr=BF16, y_ptr=BF16, inv_ptr=F32, norm_ptr=BF16, part_ptr=F32, ticket_ptr=I32,
                res_ptr=BF16, stats_out_ptr=F32, M=1, N=1024, K=k, x_stride=k, stats_in_tiles=4, eps=1e-6, stamp_ptr=I64)

    def loads_before_barrier(early: bool) -> int:
        ptx = compile_for_hopper(_gemv_kernel, args, dict(
            PROLOGUE=prologue, HAS_BIAS=False, STATS_IN=False, STATS_PAD=4, ADD_RESIDUAL=True, BLOCK_M=1, BLOCK_N=block_n,
            BLOCK_K=block_k, SPLIT_K=split_k, K_TILES=1, PRECISION="tf32", USE_PDL=True, LATE_TRIGGER=False,
            EARLY_EPILOGUE=early, STAMPS=False, EVICT="evict_first"), num_warps=8, num_stages=1)
        return ptx[:ptx.find("bar.sync")].count("ld.global")

    assert loads_before_barrier(True) == loads_before_barrier(False) + 1


@pytest.mark.parametrize("early_kv, merge, stamps", [(True, True, False), (False, True, False), (True, False, False),
                                                     (True, True, True)])
def test_decode_attention_kernel_compiles_with_early_kv_loads(early_kv, merge, stamps):
    from engine.kernels.paged_attention import _decode_kernel

    # the graphs' lengths and tables are int64 (one int64 input buffer), eager steps' int32: both
    meta = I64 if early_kv else I32
    args = dict(q_ptr=BF16, k_cache_ptr=BF16, v_cache_ptr=BF16, out_ptr=BF16, part_ptr=F32, count_ptr=I32, tables_ptr=meta,
                lens_ptr=meta, scale_log2=0.1, table_stride=64, q_stride=4096, pos_ptr=torch.empty(1, dtype=torch.int64),
                cos_ptr=F32, sin_ptr=F32, q_norm_ptr=BF16, k_norm_ptr=BF16, slot_ptr=torch.empty(1, dtype=torch.int64),
                cos_stride=128, eps=1e-6, stamp_ptr=I64)
    ptx = compile_for_hopper(_decode_kernel, args, dict(
        NUM_KV_HEADS=8, GROUP=2, GROUP_PAD=16, GROUP_P2=2, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_N=64, NUM_SPLITS=16,
        SPLIT_TILE=16, PRECISION="tf32", USE_PDL=True, FUSED_ROPE=True, QK_NORM=True, MERGE_IN_KERNEL=merge,
        EARLY_KV=early_kv, CACHE=".cg" if early_kv else "", STAMPS=stamps, EARLY_TABLE=early_kv),
        enable_fp_fusion=False)
    # EARLY_KV: the cached K/V (through L2: .cg) is requested before waiting for the qkv GEMV
    assert _before_wait(ptx, "ld.global.cg") == early_kv
    assert ("atom.global.gpu.acq_rel.add" in ptx) == merge  # the split that arrives last merges
    assert ptx.count("%globaltimer") == (7 if stamps else 0)  # and four marks: roped, attended, arrived, K/V in


def test_prefill_and_combine_kernels_compile():
    from engine.kernels.paged_attention import _combine_kernel, _prefill_kernel

    compile_for_hopper(_prefill_kernel, dict(q_ptr=BF16, k_cache_ptr=BF16, v_cache_ptr=BF16, out_ptr=BF16, tables_ptr=I32,
                                             lens_ptr=I32, cu_q_ptr=I32, scale_log2=0.1, table_stride=64, q_stride=4096),
                       dict(NUM_KV_HEADS=8, GROUP=2, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=64, BLOCK_N=64, PRECISION="tf32",
                            CACHE=""))
    compile_for_hopper(_combine_kernel, dict(part_ptr=F32, out_ptr=BF16, lens_ptr=I32),
                       dict(NUM_KV_HEADS=8, GROUP=2, GROUP_P2=2, HEAD_DIM=128, NUM_SPLITS=16, SPLIT_TILE=16, BLOCK_N=64,
                            USE_PDL=True))



def test_bench_stream_prototypes_compile():
    """The two persistent-stream prototypes of bench/ (session 8) still compile for sm_90: the Triton one
    software-pipelined (``cp.async`` across its inline-PTX grid barrier), the Gluon one warp-specialized
    (TMA copies, mbarriers, register reallocation between partitions)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.layer_stream_gpu import BK, build_kernel as build_pipelined
    from bench.layer_stream_ws_gpu import build_kernel as build_ws, tile_layout

    dims = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # Qwen3-0.6B: qkv, o, gate_up, down
    shape = dict(zip(("N0", "N1", "N2", "N3"), (n for n, _ in dims))) | dict(zip(("K0", "K1", "K2", "K3"), (k for _, k in dims)))
    ptx = compile_for_hopper(build_pipelined(), dict(w_ptr=BF16, x_ptr=BF16, count_ptr=I32),
                             dict(shape, LAYERS=2, BN=8, BK=BK, PROGRAMS=132, STAGES=4), num_warps=8)
    assert "cp.async.cg.shared.global" in ptx and "red.release.gpu.global.add" in ptx

    bns = (32, 8, 32, 8)
    const = dict(LAYERS=2, NS=tuple(n for n, _ in dims), KS=tuple(k for _, k in dims), BNS=bns, SPLITS=(False,) * 4,
                 PARTS=(1,) * 4, PROGRAMS=132, NBUF=8, num_warps=4)
    descs = {f"d{i}": f"tensordesc<bf16[{bn}, 256],{tile_layout()!r}>" for i, bn in enumerate(bns)}
    ptx = compile_for_hopper(build_ws(), descs | dict(part_ptr=F32, count_ptr=I32), const, num_warps=4)
    assert "cp.async.bulk.tensor.2d" in ptx and "mbarrier.try_wait" in ptx and "setmaxnreg" in ptx


def test_every_switch_the_model_runner_sets_exists():
    """``ModelRunner.set_kernels`` (CUDA only, so no CPU test calls it) imports one process-wide setter
    per switch at call time: each must exist, or the GPU bench loses a call to an ImportError."""
    import importlib

    from engine.model_runner import KERNEL_SETTERS

    assert set(KERNEL_SETTERS) == {"pdl", "merge_in_kernel", "early_table", "early_epilogue", "evict_first"}
    for name, (module, setter) in KERNEL_SETTERS.items():
        assert callable(getattr(importlib.import_module(module), setter, None)), f"{name}: {module}.{setter} is gone"
