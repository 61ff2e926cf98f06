"""GPU correctness of the engine: Triton kernels vs the torch reference, and bf16 parity with transformers.

    python bench/engine_gpu_check.py --out $OUT/engine_gpu_check.json      # H100, ~2 min
    python bench/engine_gpu_check.py --smoke                              # CPU, tiny: code path only (torch backend)

1. Kernels: KV store, paged decode and paged varlen prefill (with cached prefixes and chunks) on
   GPU in bf16 and fp32, against ``engine.attention``'s torch reference; the Triton GEMV (every
   candidate config, each prologue, 1/3/8 rows, the 0.6B/1B projection and LM-head shapes) against
   torch fp32 on the same bf16 inputs.
2. Parity: a random-init Qwen3-0.6B-shaped model in bf16 (embeddings scaled x5), teacher-forced
   over 32 prompts x 256 tokens, against transformers in fp32 (the reference) and in bf16.
   Why not plain top-1 agreement: even with the scaling, a random-init model's top-2 logits are
   often nearly tied, and bf16 rounding alone flips ~5 % of them: transformers bf16 agrees with
   transformers fp32 on only ~95 % of positions, so overall agreement measures rounding noise, not
   the engine. The honest metric counts *decisive* positions: those whose fp32 top-1/top-2 margin
   exceeds delta, the 99.9th percentile of how much bf16 rounding moves that margin (measured as
   |margin of transformers bf16 on the same two tokens - fp32 margin| over all positions). There
   bf16 noise cannot flip the argmax, so any disagreement is an engine error: target >= 99.5 %
   (transformers bf16 itself scores ~100 % there, shown as a control). Overall agreement is
   reported next to its noise floor. Also: exact match of the first 32 greedy tokens, engine vs
   transformers bf16, and CUDA graphs vs eager (must be bit-equal), also for batches of 1 and 4,
   where the decode projections run the Triton GEMV.
"""
from __future__ import annotations

import random
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHAPES, bench_parser, hf_config, print_table, save_results  # noqa: E402


def scattered_tables(ctx_lens: list[int], num_blocks: int, block_size: int, width: int, g, device: str):
    """int32 block tables [sequences, width] for contexts ``ctx_lens``: blocks in a random order (no
    two sequences share one, none contiguous by design), rows zero-padded."""
    import torch

    perm, tables = torch.randperm(num_blocks, generator=g).tolist(), []
    for n in ctx_lens:
        need = -(-n // block_size)
        tables.append(perm[:need] + [0] * (width - need))
        perm = perm[need:]
    return torch.tensor(tables, dtype=torch.int32, device=device)


def kernel_checks(device: str) -> list[dict]:
    import torch

    from engine.attention import paged_attention_torch, store_kv_torch
    from engine.context import Context
    from engine.kernels import paged_attention as kernels

    rows = []
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, block_size, num_blocks = 16, 8, 128, 16, 512
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 2e-3)):
        k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
        v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
        for case, q_lens, ctx_lens in (("decode", [1] * 6, [1, 17, 100, 513, 1000, 2047]),
                                       ("prefill", [300, 37, 1, 128, 5], [300, 37 + 480, 90, 128, 21])):
            tables = scattered_tables(ctx_lens, num_blocks, block_size, max(-(-n // block_size) for n in ctx_lens), g, device)
            q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(device, dtype)
            ctx = Context(torch.empty(0), tables,
                          torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                          torch.tensor([0] + q_lens, device=device).cumsum(0).int(), max(q_lens), case == "decode",
                          seqlens_q=q_lens, context_lens_list=ctx_lens)
            ref = paged_attention_torch(q.float(), k_cache.float(), v_cache.float(), ctx, head_dim ** -0.5)
            if case == "decode":
                got = kernels.decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, head_dim ** -0.5)
            else:
                got = kernels.prefill_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.cu_seqlens_q,
                                                ctx.max_seqlen_q, head_dim ** -0.5)
            err = (got.float() - ref).abs().max().item()
            rows.append({"check": f"kernel {case} {str(dtype)[6:]}", "value": err, "target": f"< {tol}", "ok": err < tol})
        slots = torch.randperm(num_blocks * block_size, generator=g)[:64].to(device)
        slots[5] = -1
        qkv = torch.randn(64, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype)
        k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(64, kv_heads, head_dim)
        v = qkv[:, (heads + kv_heads) * head_dim:].view(64, kv_heads, head_dim)
        expected = [k_cache.clone(), v_cache.clone()]
        store_kv_torch(k, v, *expected, slots)
        kernels.store_kv(k, v, k_cache, v_cache, slots)
        same = torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])
        rows.append({"check": f"kernel store_kv {str(dtype)[6:]}", "value": float(same), "target": "bit-exact", "ok": same})
    return rows


def merge_checks(device: str, repeats: int = 200) -> list[dict]:
    """The decode kernel's in-kernel split merge (the last split to finish merges) against the separate
    combine kernel: bit-equal on every one of ``repeats`` launches (a missed arrival or a partial read
    before it was written would show as a differing or stale result), and the counters back at zero."""
    import torch

    from engine.kernels import paged_attention as kernels

    g = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, block_size, num_blocks = 16, 8, 128, 16, 512
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, torch.bfloat16)
                        for _ in range(2))
    rows = []
    for ctx_lens in ([256], [1, 64, 65, 1000], [2047, 3]):
        tables = scattered_tables(ctx_lens, num_blocks, block_size, 128, g, device)
        lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
        q = torch.randn(len(ctx_lens), heads, head_dim, generator=g).to(device, torch.bfloat16)
        splits = kernels.decode_splits(len(ctx_lens), kv_heads, 128 * block_size)
        expected = kernels.decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, splits, merge_in_kernel=False)
        same = sum(torch.equal(kernels.decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, splits,
                                                        merge_in_kernel=True), expected) for _ in range(repeats))
        zero = not kernels.split_counters(torch.device(device), 1).any().item()
        rows.append({"check": f"in-kernel split merge == combine kernel, contexts {ctx_lens} ({splits} splits, {repeats} launches)",
                     "value": same / repeats, "target": "1.0 and counters 0", "ok": same == repeats and zero})
    return rows


GEMV_SHAPES = [(4096, 1024, "add_rms_norm"), (1024, 2048, "none"), (1024, 3072, "silu_mul"),  # qwen3-0.6b (N, K)
               (16384, 2048, "add_rms_norm"), (2048, 8192, "silu_mul"), (151936, 1024, "none")]  # llama-3.2-1b, LM head


def gemv_checks(device: str, shapes: list[tuple[int, int, str]] = GEMV_SHAPES) -> list[dict]:
    """The Triton GEMV (every candidate config, each prologue) against torch in fp32 on the same bf16
    inputs, at the Qwen3-0.6B and Llama-3.2-1B projection shapes and 1, 3 and 8 rows."""
    import torch
    import torch.nn.functional as F

    from engine.kernels.gemv import Workspace, candidate_configs, gemv
    from engine.layers import add_rms_norm, silu_and_mul

    g = torch.Generator(device).manual_seed(0)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 4
    worst: dict[str, float] = {}
    for n, k, prologue in shapes:
        w = (torch.randn(n, k, generator=g, device=device) * k ** -0.5).bfloat16()
        norm_w = (1 + 0.1 * torch.randn(k, generator=g, device=device)).bfloat16()
        for m in (1, 3, 8):
            x = torch.randn(m, 2 * k if prologue == "silu_mul" else k, generator=g, device=device).bfloat16()
            residual = torch.randn(m, k, generator=g, device=device).bfloat16()
            if prologue == "add_rms_norm":
                x_in, h_ref = add_rms_norm(x, residual, norm_w, 1e-6)
            else:
                x_in = silu_and_mul(x) if prologue == "silu_mul" else x
            ref = F.linear(x_in.float(), w.float())
            workspace = Workspace(torch.device(device))
            for config in candidate_configs(n, k, m, sms):
                workspace.reserve(n, config)
                out = gemv(x, w, None, config, workspace, prologue, residual, norm_w, 1e-6)
                y = out[0] if prologue == "add_rms_norm" else out
                if prologue == "add_rms_norm" and not torch.equal(out[1], h_ref):
                    worst["residual stream"] = float("inf")
                # relative to the output scale: bf16 inputs, fp32 accumulation, one bf16 rounding
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                kind = f"{prologue} {'row' if config.block_m == 1 else 'dot'}"
                worst[kind] = max(worst.get(kind, 0.0), err)
    return [{"check": f"gemv {kind} vs torch fp32 (max rel. err)", "value": err, "target": "< 1e-2", "ok": err < 1e-2}
            for kind, err in sorted(worst.items())]


def build_model(out: Path, smoke: bool) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config("qwen3-0.6b")
    config.vocab_size = SHAPES["qwen3-0.6b"]["published_vocab"]
    if smoke:
        config.num_hidden_layers, config.layer_types = 2, config.layer_types[:2]
        config.hidden_size, config.intermediate_size, config.vocab_size = 128, 256, 2000
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5.0)  # tied: also sharpens the LM head's logits
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def parity_checks(model_dir: str, device: str, smoke: bool, launch_ahead: bool = True, decode_steps: int = 8) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams

    rng = random.Random(0)
    n_prompts, length = (4, 32) if smoke else (32, 256)
    vocab = 2000 if smoke else 151936
    prompts = [[rng.randrange(vocab) for _ in range(length)] for _ in range(n_prompts)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    options = dict(skip_tokenizer_init=True, max_model_len=2048, gpu_memory_utilization=0.3, num_blocks=512,
                   launch_ahead=launch_ahead, decode_steps=decode_steps)

    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    llm = LLM(model_dir, dtype=dtype, **options)
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, prompt_logprobs=1, ignore_eos=True))
    engine_top1 = torch.tensor([[max(e, key=e.get) for e in o.prompt_logprobs[1:]] for o in outs])
    engine_greedy = [o.outputs[0].token_ids for o in outs]
    small = small_batch_greedy(llm, prompts, greedy)  # batches of 1 and 4: the GEMV paths (<= 8 rows)
    gemv_projections = sum(r["choice"] != "cublas" for r in llm.engine.runner.gemv_tuning)
    # sequences that stop mid-round (a stop token from their own greedy output): the round queued ahead of
    # each stop is discarded; the tokens must equal the same engine's without rounds queued ahead
    stopping = [SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=[t[11 + i % 9]]) for i, t in enumerate(engine_greedy)]
    stopped, default_pipelined = {}, llm.engine.config.pipeline_rounds
    for pipelined in (True, False):
        llm.engine.config.pipeline_rounds = pipelined
        stopped[pipelined] = ([o.outputs[0].token_ids for o in llm.generate(prompts, stopping)]
                              + [llm.generate([p], s)[0].outputs[0].token_ids for p, s in zip(prompts[:4], stopping)])
    llm.engine.config.pipeline_rounds = default_pipelined
    pipelined_match = sum(a == b for a, b in zip(stopped[True], stopped[False])) / len(stopped[True])
    llm.engine.config.decode_steps = 1  # the same engine and graphs, one token per engine step
    single = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] + small_batch_greedy(llm, prompts, greedy)
    multi_match = sum(a == b for a, b in zip(engine_greedy + small, single)) / len(single)
    del llm
    eager = LLM(model_dir, dtype=dtype, enforce_eager=True, **options)
    eager_greedy = [o.outputs[0].token_ids for o in eager.generate(prompts, greedy)]
    eager_small = small_batch_greedy(eager, prompts, greedy)
    del eager
    torch.cuda.empty_cache() if device == "cuda" else None

    ids = torch.tensor(prompts, device=device)
    chunks = [ids[i:i + 8] for i in range(0, len(prompts), 8)]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        ref_top2, ref_margin = [], []
        for chunk in chunks:
            values, top2 = model(chunk).logits[:, :-1].topk(2, dim=-1)
            ref_top2.append(top2)
            ref_margin.append(values[..., 0] - values[..., 1])
        del model
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
        bf16_top1, moved = [], []
        for chunk, top2, margin in zip(chunks, ref_top2, ref_margin):
            logits = model(chunk).logits[:, :-1].float()
            bf16_top1.append(logits.argmax(-1))
            pair = logits.gather(-1, top2)  # bf16 logits of the fp32 reference's top-2 tokens
            moved.append(((pair[..., 0] - pair[..., 1]) - margin).abs())
        hf_greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                   do_sample=False, pad_token_id=0)[:, length:].tolist()
        del model
    ref_top1 = torch.cat(ref_top2)[..., 0].cpu()
    ref_margin, moved, bf16_top1 = torch.cat(ref_margin).cpu(), torch.cat(moved).cpu(), torch.cat(bf16_top1).cpu()
    delta = torch.quantile(moved.flatten(), 0.999).item()
    decisive = ref_margin > delta
    engine_decisive = (engine_top1 == ref_top1)[decisive].float().mean().item()
    hf_decisive = (bf16_top1 == ref_top1)[decisive].float().mean().item()
    floor = (bf16_top1 == ref_top1).float().mean().item()
    greedy_match = sum(a == b for a, b in zip(engine_greedy, hf_greedy)) / len(prompts)
    graph_match = sum(a == b for a, b in zip(engine_greedy, eager_greedy)) / len(prompts)
    for i, (a, b) in enumerate(zip(engine_greedy, eager_greedy)):  # where graphs and eager part ways, for the log
        if a != b:
            at = next(t for t, (x, y) in enumerate(zip(a, b)) if x != y)
            print(f"graphs vs eager: prompt {i} differs from token {at} (graphs {a[at]}, eager {b[at]}; "
                  f"transformers {hf_greedy[i][at]})", flush=True)
    small_graph_match = sum(a == b for a, b in zip(small, eager_small)) / len(small)
    small_hf_match = sum(a == b for a, b in zip(small, hf_greedy)) / len(small)
    return [
        {"check": f"top-1 vs fp32 ref, decisive positions (margin > {delta:.3g})", "value": engine_decisive,
         "target": ">= 0.995", "ok": engine_decisive >= 0.995},
        {"check": "  control: transformers bf16 there", "value": hf_decisive, "target": "-", "ok": None},
        {"check": "  share of positions that are decisive", "value": decisive.float().mean().item(), "target": "-", "ok": None},
        {"check": "top-1 vs fp32 ref, all positions", "value": (engine_top1 == ref_top1).float().mean().item(),
         "target": f"~ floor {floor:.4f}", "ok": None},
        {"check": "  floor: transformers bf16 vs fp32", "value": floor, "target": "-", "ok": None},
        {"check": "top-1 vs transformers bf16, all positions", "value": (engine_top1 == bf16_top1).float().mean().item(),
         "target": "-", "ok": None},
        {"check": "greedy 32 tokens exact, engine vs transformers", "value": greedy_match, "target": ">= 0.95", "ok": greedy_match >= 0.95},
        {"check": "greedy 32 tokens exact, CUDA graphs vs eager", "value": graph_match, "target": "1.0", "ok": graph_match == 1.0},
        {"check": "  batches of 1 and 4 (GEMV), graphs vs eager", "value": small_graph_match, "target": "1.0",
         "ok": small_graph_match == 1.0},
        {"check": "  batches of 1 and 4 (GEMV), engine vs transformers", "value": small_hf_match, "target": ">= 0.95",
         "ok": small_hf_match >= 0.95},
        {"check": f"greedy, {decode_steps} decode steps per engine step vs 1 (all + batches of 1, 4)", "value": multi_match,
         "target": "1.0", "ok": multi_match == 1.0},
        {"check": "  stop tokens mid-round: rounds queued ahead vs not (batch 32, then 1)", "value": pipelined_match,
         "target": "1.0", "ok": pipelined_match == 1.0},
        {"check": "  (projection groups x batch buckets using the GEMV)", "value": float(gemv_projections), "target": "-", "ok": None},
    ]


def small_batch_greedy(llm, prompts: list[list[int]], params) -> list[list[int]]:
    """Greedy tokens of the first 8 prompts, one alone at a time, then in batches of 4."""
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts[:4]]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts[4:8], params)]
    return alone + batched


def main() -> int:
    import torch

    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--no-launch-ahead", action="store_true", help="engine.launch_ahead=false (no chained/ahead decode launches)")
    p.add_argument("--parity-only", action="store_true", help="skip the kernel and GEMV micro-checks")
    p.add_argument("--decode-steps", type=int, default=8, help="engine.decode_steps of the engines checked (1: no multi-step)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("error: no GPU; run with --smoke for a CPU code-path check", file=sys.stderr)
        return 2
    rows: list[dict] = []
    if device == "cuda" and not args.parity_only:
        try:
            rows += kernel_checks(device)
            rows += gemv_checks(device)
        except Exception as e:
            traceback.print_exc()
            rows.append({"check": "kernels", "error": f"{type(e).__name__}: {e}", "ok": False})
        save_results(args.out, "engine_gpu_check", args, rows)
    if device == "cuda":
        try:
            rows += merge_checks(device)
        except Exception as e:
            traceback.print_exc()
            rows.append({"check": "split merge", "error": f"{type(e).__name__}: {e}", "ok": False})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="engine-check-"))
    try:
        model_dir = build_model(workdir / "qwen3-0.6b", args.smoke)
        rows += parity_checks(model_dir, device, args.smoke, launch_ahead=not args.no_launch_ahead, decode_steps=args.decode_steps)
    except Exception as e:
        traceback.print_exc()
        rows.append({"check": "parity", "error": f"{type(e).__name__}: {e}", "ok": False})
    save_results(args.out, "engine_gpu_check", args, rows)
    for row in rows:
        if isinstance(row.get("value"), float):
            row["shown"] = f"{row['value']:.3g}" if row["value"] < 0.5 else f"{row['value']:.4f}"
    print_table("engine GPU checks", rows, [("check", "check"), ("shown", "value"), ("target", "target"), ("ok", "ok"), ("error", "error")],
                notes=["parity model: random-init Qwen3-0.6B shape (published vocab), embeddings x5; reference: transformers fp32",
                       "decisive: fp32 top-1/top-2 margin beyond the 99.9th pct of bf16 rounding's effect on it (see docstring)"])
    failed = [r["check"] for r in rows if r.get("ok") is False]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
