"""Decode-path kernels at batch 1: programmatic dependent launch (PDL) and the fused q/k-norm + RoPE + KV store.

    python bench/decode_kernels_gpu.py --out $OUT/decode_kernels_gpu.json     # H100, ~1.5-2 min (GPU only)

Shapes: Qwen3-0.6B and Llama-3.2-1B from bench.common.SHAPES (random bf16 weights). Per shape:

1. Correctness.
   - ``rope_store_kv`` (engine/kernels/rope_kv.py) against the torch reference (eager
     ``engine.layers.apply_rope`` + ``engine.attention.store_kv_torch``) in bf16 and fp32 at
     T = 1, 4, 37 tokens with padded rows (slot -1): max abs diff over q and both caches, differing
     elements and max ulp distance. Without q/k norm (Llama) every op rounds as torch's: bit-equal.
     With it (Qwen3) the per-head sum of squares adds in another order than torch's reduction, so
     a 1-ulp difference of the norm can move a rare element by 1 bf16 ulp (target <= 1 ulp;
     fp32 < 1e-5). At T = 1 in bf16 also against the torch.compile'd apply_rope the engine ran before.
   - The Triton GEMV, every candidate config of every projection at M = 1, PDL on vs off (bit-equal),
     and the decode attention kernel (1 and 4 sequences, with split combine) PDL on vs off.
   - The whole layer chain below, PDL on vs off with the same GEMV configs: bit-equal after replays.
2. Timing: CUDA-graph replays of all layers (each layer's own weights and KV cache, so weights stream
   from HBM), median of ``--replays`` replays timed with CUDA events; us per layer and effective
   GB/s (weight bytes, plus KV bytes where attention runs) against the device's copy bandwidth.
   (a) projections: qkv (add + RMSNorm prologue) -> o -> gate_up (add + RMSNorm) -> down (SiLU * up
       prologue) chained through their outputs: cuBLAS (F.linear alone: no norm or activation
       kernels, so a lower bound for the unfused path) vs our GEMV with PDL off vs on. GEMV configs:
       each projection's fastest candidate (engine.kernels.gemv.candidate_configs) timed in isolation
       over all layers' weights, per PDL setting, as the engine's start-up tuner does.
   (b) the attention prologue: torch.compile'd apply_rope + the store_kv kernel (the engine before)
       vs the fused rope_store_kv kernel with PDL off vs on.
   (c) the decode layer: qkv GEMV -> RoPE/KV store -> decode attention (``--context`` tokens) -> o ->
       gate_up -> down: the engine before (compiled RoPE + store_kv, no PDL) vs fused without PDL vs
       fused with PDL (the LM head and embedding are not included).
"""
from __future__ import annotations

import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHAPES, bench_parser, csv_list, print_table, release_memory, save_results  # noqa: E402

MAX_POSITIONS = 8192
BLOCK_SIZE = 16


def dims(shape: str) -> dict:
    s = SHAPES[shape]
    heads, kv_heads, head_dim = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    return dict(hidden=s["hidden_size"], inter=s["intermediate_size"], layers=s["num_hidden_layers"], heads=heads,
                kv_heads=kv_heads, head_dim=head_dim, q_size=heads * head_dim, kv_size=kv_heads * head_dim,
                eps=s["rms_norm_eps"], theta=s["rope_theta"], scaling=s.get("rope_scaling"), qk_norm=s["arch"] == "qwen3")


def projections(d: dict) -> list[tuple[str, int, int, str, str | None]]:
    """(weight name, N, K, prologue, norm weight name) of a decoder layer's four projections."""
    return [("qkv", d["q_size"] + 2 * d["kv_size"], d["hidden"], "add_rms_norm", "norm_in"),
            ("o", d["hidden"], d["q_size"], "none", None),
            ("gate_up", 2 * d["inter"], d["hidden"], "add_rms_norm", "norm_post"),
            ("down", d["hidden"], d["inter"], "silu_mul", None)]


def graph_us(run, replays: int):
    """(median microseconds of one replay of ``run`` captured in a CUDA graph, what the capture returned)."""
    import torch

    run()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times), (graph, out)


def copy_bandwidth_gbs() -> float:
    """A 1 GiB device-to-device copy: bytes read + written per second (the practical HBM roofline)."""
    import torch

    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def make_layers(d: dict, context: int) -> list[dict]:
    """Every layer's own weights (scaled so activations stay O(1)), norms and a KV cache holding
    ``context`` tokens (block table: blocks 1..n; block 0 stays spare)."""
    import torch

    g = torch.Generator("cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).bfloat16()

    blocks = -(-context // BLOCK_SIZE) + 1
    layers = []
    for _ in range(d["layers"]):
        layer = {name: randn(n, k, scale=k ** -0.5) for name, n, k, _, _ in projections(d)}
        for norm, dim in (("norm_in", d["hidden"]), ("norm_post", d["hidden"]), ("q_norm", d["head_dim"]), ("k_norm", d["head_dim"])):
            layer[norm] = 1 + 0.1 * randn(dim)
        layer["k_cache"] = randn(blocks, BLOCK_SIZE, d["kv_heads"], d["head_dim"])
        layer["v_cache"] = randn(blocks, BLOCK_SIZE, d["kv_heads"], d["head_dim"])
        layers.append(layer)
    return layers


def set_pdl(enabled: bool) -> None:
    from engine.kernels import set_pdl as engine_set_pdl

    engine_set_pdl(enabled)


# --------------------------------------------------------------------------------------------
# GEMV: per-projection tuning (PDL off / on), PDL bit-equality, the projection chain
# --------------------------------------------------------------------------------------------
def tune(d: dict, layers: list[dict], workspace, replays: int) -> tuple[dict, list[dict], dict]:
    """({pdl: {projection: fastest config}}, one row per projection with the isolated timings,
    {projection: candidate configs})."""
    import torch
    import torch.nn.functional as F

    from engine.kernels.gemv import candidate_configs, gemv

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator("cuda").manual_seed(1)
    candidates = {name: candidate_configs(n, k, 1, num_sms) for name, n, k, _, _ in projections(d)}
    for name, n, *_ in projections(d):  # every buffer before any capture: graphs hold its address
        for config in candidates[name]:
            workspace.reserve(n, config)
    chosen, rows = {False: {}, True: {}}, []
    for name, n, k, prologue, norm in projections(d):
        x = torch.randn(1, 2 * k if prologue == "silu_mul" else k, generator=g, device="cuda").bfloat16()
        residual = torch.randn(1, k, generator=g, device="cuda").bfloat16()
        row = {"projection": name, "n": n, "k": k, "prologue": prologue,
               "cublas_us": graph_us(lambda: [F.linear(x[:, :k], L[name]) for L in layers], replays)[0] / len(layers)}
        for pdl in (False, True):
            set_pdl(pdl)
            best = (float("inf"), None)
            for config in candidates[name]:
                def run(config=config):
                    return [gemv(x, L[name], None, config, workspace, prologue, residual, L[norm] if norm else None, d["eps"])
                            for L in layers]
                try:
                    us = graph_us(run, replays)[0] / len(layers)
                except Exception as e:  # a config the compiler rejects is just not a candidate (as in the tuner)
                    print(f"gemv {name} {config} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                best = min(best, (us, config), key=lambda t: t[0])
            chosen[pdl][name] = best[1]
            row[f"pdl_{'on' if pdl else 'off'}_us"], row[f"pdl_{'on' if pdl else 'off'}_config"] = best[0], str(best[1])
        rows.append(row)
    return chosen, rows, candidates


def gemv_pdl_checks(shape: str, d: dict, layers: list[dict], workspace, candidates: dict) -> list[dict]:
    """Every candidate config of every projection at M = 1: PDL on == PDL off, bit for bit (y and the
    residual stream). Each call follows a copy kernel writing its input, so a PDL launch overlaps it."""
    import torch

    from engine.kernels.gemv import gemv

    g = torch.Generator("cuda").manual_seed(2)
    rows = []
    for name, n, k, prologue, norm in projections(d):
        x_src = torch.randn(1, 2 * k if prologue == "silu_mul" else k, generator=g, device="cuda").bfloat16()
        residual = torch.randn(1, k, generator=g, device="cuda").bfloat16()
        equal = True
        for config in candidates[name]:
            outs = []
            for pdl in (False, True):
                set_pdl(pdl)
                out = gemv(x_src.clone(), layers[0][name], None, config, workspace, prologue, residual,
                           layers[0][norm] if norm else None, d["eps"])
                outs.append(out if isinstance(out, tuple) else (out,))
            equal &= all(torch.equal(a, b) for a, b in zip(*outs))
        rows.append({"check": f"{shape} gemv {name} ({prologue}, {len(candidates[name])} configs) PDL on == off",
                     "value": float(equal), "target": "bit-equal", "ok": equal})
    return rows


def step_input(d: dict):
    """The first layer's input and residual stream, equal in every chain (so outputs compare)."""
    import torch

    g = torch.Generator("cuda").manual_seed(5)
    return tuple(torch.randn(1, d["hidden"], generator=g, device="cuda").bfloat16() for _ in range(2))


def projection_chain(d: dict, layers: list[dict], configs: dict | None, workspace):
    """One decode step's projections over all layers, each fed by the previous one's output;
    ``configs`` None: cuBLAS (F.linear alone)."""
    import torch.nn.functional as F

    from engine.kernels.gemv import gemv

    x0, r0 = step_input(d)

    def run():
        h, residual = x0, r0
        for L in layers:
            if configs is None:
                qkv = F.linear(h, L["qkv"])
                gate_up = F.linear(F.linear(qkv[:, :d["q_size"]], L["o"]), L["gate_up"])
                h = F.linear(gate_up[:, :d["inter"]], L["down"])
            else:
                qkv, residual = gemv(h, L["qkv"], None, configs["qkv"], workspace, "add_rms_norm", residual, L["norm_in"], d["eps"])
                o = gemv(qkv[:, :d["q_size"]], L["o"], None, configs["o"], workspace)
                gate_up, residual = gemv(o, L["gate_up"], None, configs["gate_up"], workspace, "add_rms_norm", residual,
                                         L["norm_post"], d["eps"])
                h = gemv(gate_up, L["down"], None, configs["down"], workspace, "silu_mul")
        return h
    return run


# --------------------------------------------------------------------------------------------
# RoPE + KV store: correctness, the prologue chain, the whole decode layer
# --------------------------------------------------------------------------------------------
def rope_table(d: dict):
    import torch

    from engine.layers import RotaryEmbedding

    with torch.device("cuda"):
        return RotaryEmbedding(d["head_dim"], MAX_POSITIONS, d["theta"], d["scaling"])


def compare(pairs: list[tuple], qk_norm: bool, bf16: bool) -> dict:
    """Max abs diff, differing elements and max ulp distance over (got, expected) pairs; ok: bit-equal,
    except that with q/k norm the sum of squares may add in another order than torch's (1 bf16 ulp
    on rare elements; tiny in fp32)."""
    import torch

    diff = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    mismatches = sum((a != b).sum().item() for a, b in pairs)
    bits = torch.int16 if bf16 else torch.int32
    ulps = max((a.view(bits).long() - b.view(bits).long()).abs().max().item() for a, b in pairs)
    if not qk_norm:
        target, ok = "bit-equal", mismatches == 0
    else:
        target, ok = ("<= 1 ulp", ulps <= 1) if bf16 else ("< 1e-5", diff < 1e-5)
    return {"value": diff, "mismatches": mismatches, "ulps": ulps, "target": target, "ok": ok}


def rope_checks(shape: str, d: dict, compiled_rope) -> list[dict]:
    import torch

    from engine.attention import store_kv_torch
    from engine.kernels.rope_kv import rope_store_kv
    from engine.layers import apply_rope

    rope, rows = rope_table(d), []
    g = torch.Generator("cuda").manual_seed(3)
    heads, kv_heads, head_dim = d["heads"], d["kv_heads"], d["head_dim"]
    for dtype in (torch.bfloat16, torch.float32):
        bf16 = dtype == torch.bfloat16
        norm = [(1 + 0.1 * torch.randn(head_dim, generator=g, device="cuda")).to(dtype) for _ in range(2)]
        norm_args = (*norm, d["eps"]) if d["qk_norm"] else (None, None, 0.0)
        for tokens in (1, 4, 37):
            qkv = torch.randn(tokens, d["q_size"] + 2 * d["kv_size"], generator=g, device="cuda").to(dtype)
            positions = torch.randint(0, MAX_POSITIONS, (tokens,), generator=g, device="cuda")
            slots = torch.randperm(64 * BLOCK_SIZE, generator=g, device="cuda")[:tokens]
            slots[1::3] = -1  # padded rows (T > 1): their cache slots stay as they were
            caches = torch.randn(2, 64, BLOCK_SIZE, kv_heads, head_dim, generator=g, device="cuda").to(dtype)
            ref = caches.clone()
            q, k, v = qkv.split([d["q_size"], d["kv_size"], d["kv_size"]], dim=-1)
            q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
            ref_q, ref_k = apply_rope(positions, q, k, rope.cos, rope.sin, *norm_args)
            store_kv_torch(ref_k, v, ref[0], ref[1], slots)
            got_q = rope_store_kv(qkv, positions, rope.cos, rope.sin, *norm_args, caches[0], caches[1], slots, heads, kv_heads)
            rows.append({"check": f"{shape} rope_kv {str(dtype)[6:]} T={tokens} vs eager torch",
                         **compare([(got_q, ref_q), (caches, ref)], d["qk_norm"], bf16)})
            if bf16 and tokens == 1:  # the engine's previous GPU path: the compiled rope kernels
                cq, ck = compiled_rope(positions, q, k, rope.cos, rope.sin, *(norm_args if d["qk_norm"] else ()))
                rows.append({"check": f"{shape} rope_kv bfloat16 T=1 vs compiled torch",
                             **compare([(got_q, cq), (caches[0].flatten(0, 1)[slots[0]], ck[0])], d["qk_norm"], bf16)})
    return rows


def attention_pdl_checks(shape: str, d: dict) -> list[dict]:
    import torch

    from engine.kernels.paged_attention import decode_attention, decode_splits

    g = torch.Generator("cuda").manual_seed(4)
    rows = []
    for lens in ([1000], [1, 17, 513, 2047]):
        blocks = sum(-(-n // BLOCK_SIZE) for n in lens) + 1
        k_cache, v_cache = (torch.randn(blocks, BLOCK_SIZE, d["kv_heads"], d["head_dim"], generator=g, device="cuda").bfloat16()
                            for _ in range(2))
        perm, tables = torch.randperm(blocks, generator=g, device="cuda").tolist(), []
        for n in lens:
            need = -(-n // BLOCK_SIZE)
            tables.append(perm[:need] + [0] * (128 - need))
            perm = perm[need:]
        tables = torch.tensor(tables, dtype=torch.int32, device="cuda")
        context = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q_src = torch.randn(len(lens), d["heads"], d["head_dim"], generator=g, device="cuda").bfloat16()
        splits = decode_splits(len(lens), d["kv_heads"], 128 * BLOCK_SIZE)
        outs = []
        for pdl in (False, True):
            set_pdl(pdl)
            outs.append(decode_attention(q_src.clone(), k_cache, v_cache, tables, context, d["head_dim"] ** -0.5, splits))
        same = torch.equal(*outs)
        rows.append({"check": f"{shape} decode attention {len(lens)} seq ({splits} splits) PDL on == off",
                     "value": float(same), "target": "bit-equal", "ok": same})
    return rows


def decode_inputs(d: dict, context: int) -> dict:
    """The step's attention metadata for one sequence at ``context`` tokens (the new one included)."""
    import torch

    blocks = -(-context // BLOCK_SIZE)
    table = torch.arange(1, blocks + 1, dtype=torch.int32, device="cuda")[None]
    last = context - 1
    return dict(positions=torch.tensor([last], device="cuda"), tables=table,
                slots=torch.tensor([(1 + last // BLOCK_SIZE) * BLOCK_SIZE + last % BLOCK_SIZE], device="cuda"),
                context=torch.tensor([context], dtype=torch.int32, device="cuda"))


def attention_prologue(d: dict, L: dict, qkv, inputs: dict, rope, fused: bool, compiled_rope):
    """q of one layer, with its k/v stored: the fused kernel, or compiled apply_rope + store_kv."""
    from engine.kernels.paged_attention import store_kv
    from engine.kernels.rope_kv import rope_store_kv

    norm_args = (L["q_norm"], L["k_norm"], d["eps"]) if d["qk_norm"] else (None, None, 0.0)
    if fused:
        return rope_store_kv(qkv, inputs["positions"], rope.cos, rope.sin, *norm_args, L["k_cache"], L["v_cache"],
                             inputs["slots"], d["heads"], d["kv_heads"])
    q, k, v = qkv.split([d["q_size"], d["kv_size"], d["kv_size"]], dim=-1)
    q, k, v = q.view(-1, d["heads"], d["head_dim"]), k.view(-1, d["kv_heads"], d["head_dim"]), v.view(-1, d["kv_heads"], d["head_dim"])
    q, k = compiled_rope(inputs["positions"], q, k, rope.cos, rope.sin, *(norm_args if d["qk_norm"] else ()))
    store_kv(k, v, L["k_cache"], L["v_cache"], inputs["slots"])
    return q


def rope_chain(d: dict, layers: list[dict], inputs: dict, rope, fused: bool, compiled_rope):
    import torch

    qkvs = [torch.randn(1, d["q_size"] + 2 * d["kv_size"], device="cuda").bfloat16() for _ in layers]
    return lambda: [attention_prologue(d, L, qkv, inputs, rope, fused, compiled_rope) for L, qkv in zip(layers, qkvs)]


def layer_chain(d: dict, layers: list[dict], configs: dict, workspace, inputs: dict, rope, fused: bool, compiled_rope):
    """One decode step's decoder layers at batch 1 (GEMVs, RoPE + KV store, paged decode attention)."""
    from engine.kernels.gemv import gemv
    from engine.kernels.paged_attention import decode_attention, decode_splits

    x0, r0 = step_input(d)
    splits = decode_splits(1, d["kv_heads"], inputs["tables"].shape[1] * BLOCK_SIZE)

    def run():
        h, residual = x0, r0
        for L in layers:
            qkv, residual = gemv(h, L["qkv"], None, configs["qkv"], workspace, "add_rms_norm", residual, L["norm_in"], d["eps"])
            q = attention_prologue(d, L, qkv, inputs, rope, fused, compiled_rope)
            out = decode_attention(q, L["k_cache"], L["v_cache"], inputs["tables"], inputs["context"], d["head_dim"] ** -0.5, splits)
            o = gemv(out.view(1, -1), L["o"], None, configs["o"], workspace)
            gate_up, residual = gemv(o, L["gate_up"], None, configs["gate_up"], workspace, "add_rms_norm", residual,
                                     L["norm_post"], d["eps"])
            h = gemv(gate_up, L["down"], None, configs["down"], workspace, "silu_mul")
        return h, residual
    return run


# --------------------------------------------------------------------------------------------
class OutOfTime(Exception):
    """``--time-budget`` ran out before the named section: the rest is skipped, the tables still print."""


def run_shape(shape: str, args, copy_gbs: float, checks: list[dict], timings: list[dict], tuning: list[dict], checkpoint) -> None:
    """Every section for one shape; ``checkpoint(next_section)`` saves the JSON and raises OutOfTime
    when the budget is spent."""
    import torch

    from engine.kernels.gemv import Workspace
    from engine.layers import apply_rope

    d = dims(shape)
    layers = make_layers(d, args.context)
    workspace = Workspace(torch.device("cuda"))
    weight_bytes = sum(n * k * 2 for _, n, k, _, _ in projections(d))  # per layer, bf16
    kv_bytes = 2 * args.context * d["kv_size"] * 2  # K and V read by decode attention, per layer

    def timing(case: str, variant: str, us: float, bytes_per_layer: int | None, baseline_us: float | None):
        row = {"shape": shape, "case": case, "variant": variant, "us_per_layer": us,
               "speedup": baseline_us / us if baseline_us else None}
        if bytes_per_layer:
            row["gbs"] = bytes_per_layer / us / 1e3
            row["pct_copy_bw"] = 100 * row["gbs"] / copy_gbs
        timings.append(row)
        print(row, flush=True)

    def per_layer(run) -> float:
        return graph_us(run, args.replays)[0] / d["layers"]

    # (a) projections
    chosen, rows, candidates = tune(d, layers, workspace, args.replays)
    tuning += [{"shape": shape, **r} for r in rows]
    checkpoint("gemv PDL checks")
    checks += gemv_pdl_checks(shape, d, layers, workspace, candidates)
    base = per_layer(projection_chain(d, layers, None, workspace))
    timing("projections", "cuBLAS (F.linear only)", base, weight_bytes, None)
    for pdl in (False, True):
        set_pdl(pdl)
        timing("projections", f"GEMV, PDL {'on' if pdl else 'off'}", per_layer(projection_chain(d, layers, chosen[pdl], workspace)),
               weight_bytes, base)
    checkpoint("rope_kv checks")

    # correctness of the fused prologue and of attention under PDL
    compiled_rope = torch.compile(apply_rope, dynamic=True, options={"emulate_precision_casts": True})  # as the engine's
    set_pdl(True)
    checks += rope_checks(shape, d, compiled_rope)
    checks += attention_pdl_checks(shape, d)
    checkpoint("rope + KV store timing")

    # (b) the attention prologue alone
    rope, inputs = rope_table(d), decode_inputs(d, args.context)
    set_pdl(False)
    base = per_layer(rope_chain(d, layers, inputs, rope, False, compiled_rope))
    timing("rope + KV store", "compiled apply_rope + store_kv", base, None, None)
    for pdl in (False, True):
        set_pdl(pdl)
        timing("rope + KV store", f"fused rope_kv, PDL {'on' if pdl else 'off'}",
               per_layer(rope_chain(d, layers, inputs, rope, True, compiled_rope)), None, base)
    checkpoint("decode layer chain")

    # (c) the decode layer; then PDL on vs off with the same configs, bit for bit
    set_pdl(False)
    base = per_layer(layer_chain(d, layers, chosen[False], workspace, inputs, rope, False, compiled_rope))
    timing("decode layer", "before: compiled rope + store_kv, no PDL", base, weight_bytes + kv_bytes, None)
    outputs = {}
    for pdl, configs in ((False, chosen[False]), (True, chosen[True]), ("same configs", chosen[False])):
        set_pdl(bool(pdl))
        us, (graph, out) = graph_us(layer_chain(d, layers, configs, workspace, inputs, rope, True, compiled_rope), args.replays)
        graph.replay()
        torch.cuda.synchronize()
        outputs[pdl] = [t.clone() for t in out]
        if pdl != "same configs":
            timing("decode layer", f"fused rope_kv, PDL {'on' if pdl else 'off'}", us / d["layers"], weight_bytes + kv_bytes, base)
        del graph
    same = all(torch.equal(a, b) for a, b in zip(outputs[False], outputs["same configs"]))
    checks.append({"check": f"{shape} decode layer chain ({d['layers']} layers) PDL on == off", "value": float(same),
                   "target": "bit-equal", "ok": same})


def main() -> int:
    import torch

    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", type=csv_list, default=["qwen3-0.6b", "llama-3.2-1b"], help="bench.common.SHAPES names")
    p.add_argument("--context", type=int, default=1024, help="tokens in each layer's KV cache for the decode-layer chain")
    p.add_argument("--replays", type=int, default=20, help="graph replays per timing (median)")
    p.add_argument("--time-budget", type=float, default=120.0,
                   help="seconds; sections not started by then are skipped (the tables still print)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    from engine.kernels import pdl_supported

    start = time.perf_counter()
    checks: list[dict] = []
    timings: list[dict] = []
    tuning: list[dict] = []
    copy_gbs = copy_bandwidth_gbs()
    extra = dict(copy_gbs=copy_gbs, pdl_supported=pdl_supported("cuda"), triton=__import__("triton").__version__)

    def checkpoint(next_section: str | None = None) -> None:
        save_results(args.out, "decode_kernels_gpu", args, checks + timings, tuning=tuning, **extra)
        if next_section is not None and time.perf_counter() - start > args.time_budget:
            raise OutOfTime(next_section)

    for i, shape in enumerate(args.shapes):
        try:
            checkpoint("the start")
            run_shape(shape, args, copy_gbs, checks, timings, tuning, checkpoint)
        except OutOfTime as e:
            rest = args.shapes[i + 1:]
            checks.append({"check": f"time budget ({args.time_budget:.0f} s) spent: skipped {shape} from {e} on"
                                    + (f", and {', '.join(rest)}" if rest else ""), "ok": None})
            break
        except Exception as e:
            traceback.print_exc()
            checks.append({"check": f"{shape}", "error": f"{type(e).__name__}: {str(e)[:200]}", "ok": False})
        finally:
            set_pdl(True)
            release_memory()
    checkpoint()
    for row in checks:
        if isinstance(row.get("value"), float):
            row["shown"] = f"{row['value']:.3g}"
    print_table("GEMV tuning at M=1 (us per projection, isolated, best candidate)", tuning,
                [("shape", "shape"), ("projection", "proj"), ("n", "N"), ("k", "K"), ("cublas_us", "cuBLAS"),
                 ("pdl_off_us", "GEMV"), ("pdl_off_config", "config"), ("pdl_on_us", "GEMV+PDL"), ("pdl_on_config", "config")])
    print_table("decode kernel checks", checks, [("check", "check"), ("shown", "value"), ("mismatches", "mismatches"),
                                                  ("ulps", "max ulps"), ("target", "target"), ("ok", "ok"), ("error", "error")],
                notes=["value: rope_kv rows, max abs diff over q and both caches; 'PDL on == off' rows, 1 = bit-equal"])
    print_table(f"decode chains at batch 1 (graph replays, median; copy bandwidth {copy_gbs:,.0f} GB/s)", timings,
                [("shape", "shape"), ("case", "case"), ("variant", "variant"), ("us_per_layer", "us/layer"),
                 ("speedup", "speedup"), ("gbs", "GB/s"), ("pct_copy_bw", "% copy BW")],
                notes=["GB/s: weight bytes per layer (+ the KV cache read in 'decode layer') / time; copy BW: 1 GiB D2D, read + write",
                       f"PDL supported: {extra['pdl_supported']}; decode layer: context {args.context} tokens, LM head excluded"])
    failed = [r["check"] for r in checks if r.get("ok") is False]
    print(f"{time.perf_counter() - start:.0f} s; " + ("all checks passed" if not failed else f"FAILED: {', '.join(failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
