"""The decode GEMVs' L2 prefetch of later projections' weights (engine/kernels/prefetch.py).

The prefetch is Hopper inline PTX, which the Triton interpreter cannot run; what a CPU can check is
which weights each projection prefetches, the config key, and — compiling the GPU kernel for sm_90
with the ptxas bundled in Triton — that the instruction is emitted where the PDL contract allows it.
"""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.kernels.prefetch import link_prefetch
from trainer.config import ConfigError


def test_each_projection_prefetches_the_one_ahead_wrapping_into_the_next_step():
    weights = [torch.zeros(4, 8) + i for i in range(6)]
    one = link_prefetch(weights, 1)
    assert [int(t[0, 0]) for t in one] == [1, 2, 3, 4, 5, 0]  # the LM head (last) prefetches layer 0's qkv
    two = link_prefetch(weights, 2)
    assert [int(t[0, 0]) for t in two] == [2, 3, 4, 5, 0, 1]
    assert all(t is weights[(i + 1) % 6] for i, t in enumerate(one))  # the weights themselves: no copies
    assert link_prefetch(weights, 0) == [None] * 6


def test_a_target_larger_than_the_cap_is_cut_to_its_first_bytes():
    weights = [torch.zeros(2, 4), torch.arange(1000, dtype=torch.float32).reshape(10, 100)]
    cut = link_prefetch(weights, 1, max_bytes=400)[0]  # 400 bytes of fp32: the first 100 elements
    assert cut.numel() == 100 and cut.data_ptr() == weights[1].data_ptr()
    assert link_prefetch(weights, 1, max_bytes=400)[1] is weights[0]


def test_prefetch_ahead_is_validated():
    EngineConfig(prefetch_ahead=0).check(None)
    with pytest.raises(ConfigError, match="engine.prefetch_ahead"):
        EngineConfig(prefetch_ahead=-1).check(None)


def _compile_gemv_sm90(prefetch: bool, pdl: bool):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.kernels import gemv as G

    config = G.whole_slice_configs(1024)[0]
    pointers = {"inv_ptr": "*fp32", "part_ptr": "*fp32", "ticket_ptr": "*i32", "stats_out_ptr": "*fp32"}
    const = dict(PREFETCH=prefetch, PF_GRANULE=8, THREADS=32 * config.num_warps, PROLOGUE=1, HAS_BIAS=False, STATS_IN=False,
                 STATS_PAD=1, ADD_RESIDUAL=False, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                 SPLIT_K=config.split_k, K_TILES=1, PRECISION="tf32", USE_PDL=pdl, LATE_TRIGGER=False)
    signature = {name: "constexpr" if name in const else pointers.get(name, "*bf16" if name.endswith("_ptr") else
                                                                        "fp32" if name == "eps" else "i32")
                 for name in G._gemv_kernel.arg_names}
    try:
        kernel = triton.compile(ASTSource(fn=G._gemv_kernel, signature=signature, constexprs=const),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})
    except Exception as e:  # no bundled ptxas / CUDA backend in this Triton build
        if "ptxas" in str(e).lower() or "backend" in str(e).lower():
            pytest.skip(f"cannot compile for sm_90 here: {e}")
        raise
    return kernel.asm["ptx"]


def test_gemv_kernel_prefetches_before_waiting_on_its_predecessor():
    ptx = _compile_gemv_sm90(prefetch=True, pdl=True)
    prefetch, wait = ptx.find("cp.async.bulk.prefetch.L2.global"), ptx.find("griddepcontrol.wait")
    assert prefetch >= 0 and wait >= 0 and prefetch < wait  # weights are step-invariant: no need to wait for them
    assert ptx.count("cp.async.bulk.prefetch.L2.global") == 1  # one instruction per thread: its share of the range
    assert "cp.async.bulk.prefetch" not in _compile_gemv_sm90(prefetch=False, pdl=True)
