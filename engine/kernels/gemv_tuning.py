"""Which GEMV config (or cuBLAS) each projection uses, chosen once at engine start-up by timing.

Projections are grouped by what makes their cost differ (N, K, bias, prologue, dtype); for each
group and each batch bucket (1, 2, 4, 8 rows) every candidate — the unfused torch path (the
preceding norm/activation kernel + cuBLAS) and a few Triton configs — runs once over all the group's
weights inside a CUDA graph, as a decode step would: each layer's own weights, so the timing
streams from HBM, not from L2, and pays no Python launch cost. The fastest wins, so the GEMV is
never slower than cuBLAS at the shapes it was timed on.

Choices are cached per process, so a second engine on the same model (eager vs graphs in the GPU
check) computes the same sums in the same order.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from engine.kernels.gemv import MAX_M, GemvConfig, Workspace, candidate_configs, gemv

BUCKETS = (1, 2, 4, 8)
_CHOICES: dict[tuple, tuple[GemvConfig | None, dict]] = {}  # (device, group, bucket) -> (choice, timings)


def bucket(m: int) -> int:
    """The smallest batch bucket holding ``m`` rows: rows 3 and 4 share a config, so an eager step
    of 3 sequences and the graph of bucket 4 compute each row identically."""
    return next(b for b in BUCKETS if b >= m)


@dataclass
class GemvPlan:
    """One projection's config per batch bucket; None: the torch path (cuBLAS) was faster."""
    configs: dict[int, GemvConfig | None]
    workspace: Workspace

    def config_for(self, m: int) -> GemvConfig | None:
        return self.configs[bucket(m)] if m <= MAX_M else None


@dataclass
class Projection:
    """A projection and the op before it: ``prologue`` in gemv.PROLOGUES; ``unfused(x, residual)``
    runs the reference path (that op, then the projection through cuBLAS)."""
    linear: torch.nn.Module
    prologue: str
    unfused: Callable[[torch.Tensor, torch.Tensor | None], object]
    norm_weight: torch.Tensor | None = None
    eps: float = 0.0


def plan(projections: list[Projection], device: torch.device, reps: int = 3) -> list[dict]:
    """Attach a GemvPlan to every projection; returns one row per (group, bucket) for the log."""
    workspace = Workspace(device)  # per engine: growing a shared one would move memory another engine's graphs hold
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    groups: dict[tuple, list[Projection]] = defaultdict(list)
    for p in projections:
        p.linear.gemv = None  # the unfused candidate must time cuBLAS, not an earlier plan
        w = p.linear.weight
        groups[(w.shape[0], w.shape[1], p.linear.bias is not None, p.prologue, w.dtype)].append(p)
    rows, plans = [], {}
    for key, members in groups.items():
        n, k, _, prologue, dtype = key
        configs = {}
        for b in BUCKETS:
            choice_key = (torch.cuda.get_device_name(device), *key, b)
            if choice_key not in _CHOICES:
                _CHOICES[choice_key] = _choose(members, b, workspace, num_sms, reps)
            configs[b], timings = _CHOICES[choice_key]
            rows.append({"n": n, "k": k, "prologue": prologue, "rows": b, "layers": len(members),
                         "choice": str(configs[b] or "cublas"), **timings})
            if configs[b] is not None:
                workspace.reserve(n, configs[b])
        plans[key] = GemvPlan(configs, workspace)
    for key, members in groups.items():
        for p in members:
            p.linear.gemv = plans[key]
    return rows


def _choose(members: list[Projection], m: int, workspace: Workspace, num_sms: int, reps: int) -> tuple[GemvConfig | None, dict]:
    n, k = members[0].linear.weight.shape
    dtype, device = members[0].linear.weight.dtype, members[0].linear.weight.device
    prologue = members[0].prologue
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, 2 * k if prologue == "silu_mul" else k, generator=g, device=device).to(dtype)
    residual = torch.randn(m, k, generator=g, device=device).to(dtype) if prologue == "add_rms_norm" else None

    def run_unfused() -> None:
        for p in members:
            p.unfused(x, residual)

    def run_config(config: GemvConfig) -> Callable[[], None]:
        def run() -> None:
            for p in members:
                gemv(x, p.linear.weight, p.linear.bias, config, workspace, prologue, residual, p.norm_weight, p.eps)
        return run

    best, best_us, candidates = None, _graph_time_us(run_unfused, reps), {}
    timings = {"cublas_us": best_us, "candidates_us": candidates}  # every candidate, for the benchmarks' records
    for config in candidate_configs(n, k, m, num_sms):
        workspace.reserve(n, config)
        try:
            us = _graph_time_us(run_config(config), reps)
        except Exception as e:  # a config the compiler rejects (shared memory, registers) is just not a candidate
            print(f"gemv: config {config} failed for N={n} K={k}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        candidates[str(config)] = us
        if us < best_us:
            best, best_us = config, us
    timings["best_us"] = best_us
    return best, timings


def _graph_time_us(run: Callable[[], None], reps: int) -> float:
    """Microseconds of one ``run()`` replayed from a CUDA graph (best of 3 replays of ``reps`` runs)."""
    run()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            run()
    graph.replay()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    del graph
    return best
