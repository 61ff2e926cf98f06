"""Offline throughput of our engine vs transformers ``generate`` on nano-vllm's bench workload,
plus the batch-1 decode step against the memory roofline, Triton GEMV on vs off.

    python bench/engine_throughput.py --out $OUT/engine_throughput.json            # H100, ~7 min
    python bench/engine_throughput.py --sections bs1 --out $OUT/bs1.json          # H100, bs1 only, ~3 min
    python bench/engine_throughput.py --smoke                                     # CPU, tiny: code path only

Workload (per shape, same for both sides): 256 requests, random token-id prompts (ids < 10000) of
U[100, 1024] tokens, U[100, 1024] output tokens each, ``ignore_eos``, temperature 0.6; random-init
bf16 models with the published shapes and vocabularies (Qwen3-0.6B, Llama-3.2-1B).
Throughput = requested output tokens / wall time (prefill included), as in nano-vllm's bench.py.
transformers runs the SAME requests as static batches (sorted by prompt length, left-padded, at most
``--hf-batch-size`` per batch, each batch decoding to its longest request); ``generate(max_time=)``
stops it at ``--hf-time-limit`` seconds, and the row (marked partial) counts the output tokens it
produced (each request's, up to its requested length) over that time. transformers' own continuous
batching (``init_continuous_batching``: paged KV cache, per-request ``max_new_tokens``) runs the same
requests too (section ``hf_cb``), under the same time limit.
Batch-1 decode vs the roofline (weight bytes read per decode step / measured device copy bandwidth),
measured in one engine under several settings (``VARIANTS``: the defaults; one decode step per engine
step; the Triton GEMV off, i.e. cuBLAS): ``step`` is the wall time per generated token a user waits
for (scheduling, input copy, graph replays with the LM head and argmax, token read, stop checks;
with ``engine.decode_steps`` an engine step yields several tokens), ``replay`` the GPU time of one
decode graph replay alone; then the replay's top kernels (defaults).
"""
from __future__ import annotations

import random
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHAPES, bench_parser, csv_list, fmt, hf_config, now, print_table, release_memory, save_results  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=1000)


def build_model(shape: str, out: Path, smoke: bool) -> str:
    """Random-init bf16 model of ``shape`` with its published vocabulary (the engine needs no tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "config.json").is_file():
        return str(out)
    config = hf_config(shape)
    config.vocab_size = SHAPES[shape]["published_vocab"]
    for k, v in (TINY if smoke else {}).items():
        setattr(config, k, v)
    if smoke and getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:TINY["num_hidden_layers"]]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def workload(n: int, lo: int, hi: int, max_id: int = 9999, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return prompts, [rng.randint(lo, hi) for _ in range(n)]


def copy_bandwidth(device) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write)."""
    import torch

    n = (1 << 30) // 2 if device.type == "cuda" else 1 << 22
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, reps = now(), 20
    for _ in range(reps):
        dst.copy_(src)
    return 2 * src.numel() * src.element_size() * reps / (now() - start)


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight once; an untied input embedding only gathers rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.args.tie_word_embeddings:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def run_engine(model_dir: str, prompts, out_lens, args) -> dict:
    from engine import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model_dir, dtype="bf16", skip_tokenizer_init=True, max_model_len=4096, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=0.9,
              num_blocks=4096)  # num_blocks: the CPU (smoke) budget
    startup = time.perf_counter() - start
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up (kernel compiles)
    row = {"side": "crucible engine", "startup_s": startup, "num_kv_blocks": llm.engine.runner.num_blocks}
    if "throughput" in args.sections:
        params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in out_lens]
        start = now()
        outs = llm.generate(prompts, params)
        seconds = now() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        assert produced == sum(out_lens), f"engine produced {produced} tokens, expected {sum(out_lens)}"
        row.update(requests=len(prompts), output_tokens=produced, seconds=seconds, tok_per_s=produced / seconds,
                   preemptions=llm.stats()["preemptions"])
    if "bs1" in args.sections:
        print("  bs1 decode vs roofline", flush=True)
        row.update(decode_roofline(llm, 20 if args.smoke else 200, args.variants, args.joint, args.timelines))
    del llm
    release_memory()
    return row


# bs1 settings measured side by side in one engine: (name, changes from the engine defaults); GPU-only
# switches (KERNEL_SWITCHES) go through ModelRunner.set_kernels, decode_steps and
# pipeline_rounds through the engine config
VARIANTS = (("default", {}), ("8 steps", {"decode_steps": 8}), ("1 step", {"decode_steps": 1}), ("no PDL", {"pdl": False}), ("cublas", {"gemv": False}),
            ("combine kernel", {"merge_in_kernel": False}), ("late epilogue", {"early_epilogue": False}),
            ("rounds pipelined", {"pipeline_rounds": True}), ("weights evict normal", {"evict_first": False}), ("late table", {"early_table": False}),
            ("session 9 path", {"early_table": False, "evict_first": False}))
KERNEL_SWITCHES = {"gemv": True, "pdl": True, "merge_in_kernel": True, "early_epilogue": True, "evict_first": True,
                   "early_table": True}  # the engine's defaults


def decode_roofline(llm, steps: int = 200, variants: set[str] | None = None, joint: bool = False,
                    timelines: bool = False) -> dict:
    """Batch-1 decode against the roofline under each of ``VARIANTS`` in one process: ``step_ms_<v>``
    is the wall time per generated token (``steps`` greedy tokens), ``replay_ms_<v>`` the GPU time of
    one graph replay; plus the replay's kernel profile and stage timeline with the defaults
    (``timelines``: the stage timeline of every variant, ``stage_timeline_<v>``)."""
    engine = llm.engine
    runner = engine.runner
    nbytes = weight_bytes(runner.model)
    bandwidth = copy_bandwidth(engine.device)
    roofline = nbytes / bandwidth
    row = {"weight_gb": nbytes / 1e9, "copy_bw_gb_s": bandwidth / 1e9, "roofline_ms": roofline * 1e3}
    on_gpu = engine.device.type == "cuda"
    default_steps, default_pipelined = engine.config.decode_steps, engine.config.pipeline_rounds
    for variant, changes in VARIANTS:
        if variants is not None and variant not in variants:
            continue
        kernels = {key: changes.get(key, default) for key, default in KERNEL_SWITCHES.items()}
        if not on_gpu and changes.keys() & kernels.keys():
            continue  # no GEMV or PDL on CPU: the same as the defaults
        if on_gpu:
            runner.set_kernels(**kernels)  # recaptures the decode graphs
        engine.config.decode_steps = changes.get("decode_steps", default_steps)
        engine.config.pipeline_rounds = changes.get("pipeline_rounds", default_pipelined)
        (step, round_median, per_step), replay = bs1_token_seconds(engine, steps), graph_replay_seconds(engine)
        row.update({f"step_ms_{variant}": step * 1e3, f"replay_ms_{variant}": replay * 1e3,
                    f"step_x_roofline_{variant}": step / roofline, f"replay_x_roofline_{variant}": replay / roofline,
                    f"round_median_ms_{variant}": round_median * 1e3, f"steps_{variant}": per_step})
        print(f"  bs1 {variant}: {step * 1e3:.3f} ms per token (median full step {round_median * 1e3:.3f}), "
              f"replay {replay * 1e3:.3f} ms, roofline {roofline * 1e3:.3f} ms", flush=True)
        if on_gpu and timelines and variant != "default":
            row[f"stage_timeline_{variant}"] = stage_timeline(engine, label=variant)
    engine.config.decode_steps, engine.config.pipeline_rounds = default_steps, default_pipelined
    if on_gpu:
        runner.set_kernels(**KERNEL_SWITCHES)
        row["replay_profile"] = replay_profile(engine)
        row["stage_timeline"] = stage_timeline(engine)
        if joint:
            row["gemv_joint"] = gemv_joint_search(engine, steps, roofline)
        row["live_timeline"] = live_timeline(engine)
        row["gemv_choices"] = runner.gemv_tuning
        print_table("GEMV choice per projection group (timed at start-up, all layers' weights in one CUDA graph)",
                    runner.gemv_tuning, [("n", "N"), ("k", "K"), ("prologue", "prologue"), ("rows", "rows"),
                                         ("layers", "layers"), ("cublas_us", "cuBLAS us"), ("best_us", "best us"),
                                         ("choice", "choice")])
    row.update(decode_step_ms=row["step_ms_default"], forward_ms=row["replay_ms_default"],
               x_roofline_engine_step=row["step_x_roofline_default"], x_roofline=row["replay_x_roofline_default"])
    return row


def gemv_joint_search(engine, steps: int, roofline: float, alternatives: int = 3) -> dict:
    """Whether the start-up tuner's per-projection GEMV choices (each timed alone, over its group's
    layers) are best together in the batch-1 step: coordinate descent over the projection groups in
    step order, each group trying its ``alternatives`` next-fastest candidates for one row, judged by
    the replay time of the whole decode graph (recaptured per try); then ms per token with the result
    against the tuner's choices, in this process."""
    import torch

    from engine.kernels.gemv import candidate_configs

    runner = engine.runner
    plans = list({id(plan): plan for plan in runner._gemv_plans.values()}.values())  # one plan per group, in step order
    timed_alone = {(r["n"], r["k"]): r["candidates_us"] for r in runner.gemv_tuning if r["rows"] == 1}
    num_sms = torch.cuda.get_device_properties(engine.device).multi_processor_count
    tuned = {id(plan): plan.configs[1] for plan in plans}
    best_ms, tries, searched = graph_replay_seconds(engine) * 1e3, [], set()
    for linear, plan in list(runner._gemv_plans.items()):
        if plan.configs[1] is None or id(plan) in searched:
            continue  # cuBLAS chosen, or this group already searched (one linear per group suffices)
        searched.add(id(plan))
        n, k = linear.weight.shape
        timed = timed_alone[(n, k)]
        ranked = sorted(timed, key=timed.get)
        by_name = {str(c): c for c in candidate_configs(n, k, 1, num_sms)}
        current = plan.configs[1]
        for name in [r for r in ranked if r != str(current)][:alternatives]:
            if name not in by_name or not plan.workspace.fits(n, by_name[name]):
                continue
            plan.configs[1] = by_name[name]
            runner.set_kernels()  # recapture with the candidate
            ms = graph_replay_seconds(engine) * 1e3
            tries.append({"projection": f"{n}x{k}", "config": name, "alone_us": timed[name], "replay_ms": ms})
            if ms < best_ms * 0.995:  # a clear win (0.5 %) over the best so far
                best_ms, current = ms, by_name[name]
        plan.configs[1] = current
    runner.set_kernels()
    joint_step, _, _ = bs1_token_seconds(engine, steps)
    joint_replay = graph_replay_seconds(engine) * 1e3
    chosen = {id(plan): plan.configs[1] for plan in plans}
    for plan in plans:
        plan.configs[1] = tuned[id(plan)]
    runner.set_kernels()
    tuned_step, _, _ = bs1_token_seconds(engine, steps)
    tuned_replay = graph_replay_seconds(engine) * 1e3
    for plan in plans:  # leave the engine with the better set
        plan.configs[1] = chosen[id(plan)] if joint_step < tuned_step else tuned[id(plan)]
    runner.set_kernels()
    print_table("GEMV choices tried together (batch 1, whole decode graph)", tries,
                [("projection", "projection"), ("config", "config"), ("alone_us", "alone us (28 layers)"),
                 ("replay_ms", "replay ms")],
                notes=[f"tuner's choices: {tuned_step * 1e3:.3f} ms/token, replay {tuned_replay:.3f}; joint choices "
                       f"({', '.join(str(c) for c in chosen.values())}): {joint_step * 1e3:.3f} ms/token, replay {joint_replay:.3f}"])
    return {"tries": tries, "tuned": [str(c) for c in tuned.values()], "joint": [str(c) for c in chosen.values()],
            "tuned_step_ms": tuned_step * 1e3, "tuned_replay_ms": tuned_replay, "joint_step_ms": joint_step * 1e3,
            "joint_replay_ms": joint_replay, "joint_x_roofline": joint_step / roofline}


def bs1_token_seconds(engine, tokens: int) -> tuple[float, float, list]:
    """Wall time per generated token of one greedy request, steady state (after its first 10 tokens):
    everything between tokens a user waits for, however many tokens an engine step yields; and the
    median per token of the steps that yielded a full round (``decode_steps`` tokens), which no step at
    either end of the window moves; and every timed step's (tokens, ms)."""
    from engine import SamplingParams

    engine.add_request(list(range(1, 129)), SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True), "bs1")
    seq = engine.requests["bs1"].seqs[0]
    seconds, made, full, per_step = 0.0, 0, [], []
    # no round queued ahead (engine.pipeline_rounds) into the first timed step: its GPU work would have a head start
    pipelined, engine.config.pipeline_rounds = engine.config.pipeline_rounds, False
    while engine.has_unfinished():
        before = seq.num_output_tokens
        engine.config.pipeline_rounds = pipelined if before >= 10 else False
        start = now()
        engine.step()
        if before >= 10:
            took, got = now() - start, seq.num_output_tokens - before
            seconds += took
            made += got
            per_step.append((got, round(took * 1e3, 3)))
            if got == engine.config.decode_steps:
                full.append(took / got)
    engine.config.pipeline_rounds = pipelined
    engine.output("bs1")
    return seconds / max(made, 1), statistics.median(full) if full else float("nan"), per_step


def graph_replay_seconds(engine, reps: int = 200) -> float:
    """GPU time of one batch-1 decode graph replay (decoder stack + LM head + argmax + input advance),
    back to back over a 256-token context, storing nothing: the device-side floor of a decode token."""
    import torch

    runner = engine.runner
    if 1 not in runner.graphs:  # CPU smoke run or enforce_eager: no graphs
        return float("nan")
    graph = runner.dry_replay_graph(1, 256)
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def replay_profile(engine, replays: int = 20, top: int = 8) -> list[dict]:
    """Where a batch-1 replay's GPU time goes: the top kernels by device time, per replay; printed."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graph = engine.runner.dry_replay_graph(1, 256)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            kernels.append({"kernel": event.key[:70], "us_per_replay": us / replays, "calls_per_replay": event.count / replays})
    total = sum(k["us_per_replay"] for k in kernels) or 1.0
    kernels.sort(key=lambda k: -k["us_per_replay"])
    for k in kernels:
        k["share"] = k["us_per_replay"] / total
    rest = kernels[top:]
    kernels = kernels[:top] + ([{"kernel": f"({len(rest)} other kernels)", "us_per_replay": sum(k["us_per_replay"] for k in rest),
                                 "calls_per_replay": sum(k["calls_per_replay"] for k in rest),
                                 "share": sum(k["share"] for k in rest)}] if rest else [])
    print_table("bs1 replay kernel profile (GEMV on)", kernels, [("kernel", "kernel"), ("calls_per_replay", "calls"),
                                                               ("us_per_replay", "us / replay"), ("share", "share")])
    return kernels


def stage_timeline(engine, context: int = 256, label: str = "default") -> dict:
    """The batch-1 replay's critical path stage by stage: the decode graph recaptured with per-program
    timestamps (engine/kernels/timeline.py), replayed over a ``context``-token context; per kind of
    launch, the mean over the decoder layers after the first of its stage time (its last program's end
    minus its predecessor's), its release after the predecessor's end (the PDL boundary), the work
    left once released, and how long its programs were resident before the predecessor ended; and the
    kernels' marked points after release (GEMV: product reduced; attention: q roped / split attended /
    partial counted / first K/V tile arrived); ``label`` names the settings in the table's title."""
    import torch

    from engine.kernels import timeline

    runner = engine.runner
    record = timeline.Timeline(engine.device, batch=1)
    timeline.recording(record)
    try:
        runner.set_kernels()  # recaptures: the batch-1 graph with stamps
    finally:
        timeline.recording(None)
    stamped_ms = graph_replay_seconds(engine) * 1e3
    graph = runner.dry_replay_graph(1, context)
    record.clear()
    for _ in range(3):  # the stamps of the last replay, which followed another
        graph.replay()
    torch.cuda.synchronize()
    spans = record.spans()
    runner.set_kernels()  # graphs without stamps again
    plain_ms = graph_replay_seconds(engine) * 1e3
    costs = timeline.stage_costs(spans)  # costs[i] is launch i + 1 against launch i; launch 0 is layer 0's qkv
    per_layer, layers = 5, sum(span["label"] == "attention" for span in spans)  # qkv, attention, o, gate_up, down
    after_layers = per_layer - 1 + per_layer * (layers - 1)  # costs past the last decoder layer's down GEMV
    layer_costs = costs[per_layer - 1:after_layers]
    stages = []
    for label in dict.fromkeys(c["label"] for c in layer_costs):
        mine = [c for c in layer_costs if c["label"] == label]
        marks = [[c["marks"][i] for c in mine if c["marks"][i] is not None] for i in range(len(mine[0]["marks"]))]
        stages.append({"launch": label, "programs": mine[0]["programs"], "launches": len(mine),
                       **{key: statistics.mean(c[key] for c in mine) for key in ("stage", "release", "tail", "lead")},
                       "lead_marked": statistics.mean(c["lead_marked"] if c["lead_marked"] is not None else float("nan")
                                                      for c in mine),
                       "marks": " / ".join(f"{statistics.mean(m):.2f}" for m in marks if m)})
    layer_us = sum(st["stage"] for st in stages)
    print_table(f"bs1 replay stage by stage, {label} (us, mean over layers 1..; context {context}; replay {stamped_ms:.3f} ms with "
                f"stamps, {plain_ms:.3f} without)", stages,
                [("launch", "launch"), ("programs", "programs"), ("stage", "stage us"), ("release", "release after pred. us"),
                 ("tail", "released -> end us"), ("marks", "marks after release us"), ("lead", "resident before pred. end us"),
                 ("lead_marked", "working programs resident before pred. end us")],
                notes=[f"decoder layer: {layer_us:.2f} us (sum of the stage means); after the last layer: "
                       + ", ".join(f"{c['label']} {c['stage']:.2f}" for c in costs[after_layers:])])
    return {"context": context, "replay_ms_stamped": stamped_ms, "replay_ms": plain_ms, "layer_us": layer_us,
            "stages": stages, "spans": spans}


def live_timeline(engine, tokens: int = 96, skip: int = 16) -> dict:
    """Where a live batch-1 greedy request's wall time goes on the GPU: one request under the CUDA
    profiler, its kernels laid out in time (after the first ``skip`` tokens). ``busy_ms`` is the union
    of kernel intervals, ``idle_ms`` the gaps between them, split into gaps shorter than 5 us (launch
    spacing inside a graph) and longer ones (the GPU waiting for the host); compared per token with the
    dry replay, it says whether the step's excess over the replay is idle GPU or slower live replays.
    (The profiler adds host time per launch, so the long gaps are an upper bound.)"""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams

    engine.add_request(list(range(1, 129)), SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True), "timeline")
    seq = engine.requests["timeline"].seqs[0]
    pipelined, engine.config.pipeline_rounds = engine.config.pipeline_rounds, False
    while seq.num_output_tokens < skip:  # no round queued ahead into the window: its kernels would run unrecorded
        engine.step()
    engine.config.pipeline_rounds = pipelined
    torch.cuda.synchronize()
    first = seq.num_output_tokens
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
    made = seq.num_output_tokens - first
    engine.output("timeline")
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    out = timeline_stats(spans, made)
    print(f"  live timeline ({made} tokens): GPU busy {out['busy_ms_per_token']:.3f} ms/token, idle in short gaps "
          f"{out['idle_short_ms_per_token']:.3f}, in {out['gaps_over_5us']} gaps >= 5 us {out['idle_long_ms_per_token']:.3f} "
          f"(largest {', '.join(f'{g:.0f}' for g in out['largest_gaps_us'])} us)", flush=True)
    return out


def timeline_stats(spans: list[tuple[float, float]], tokens: int) -> dict:
    """Per token: the union of kernel intervals ``spans`` (us) and the gaps between them, short (< 5 us)
    and long; plus the count and the five largest gaps."""
    busy = idle_short = idle_long = 0.0
    gaps, end = [], None
    for start, stop in sorted(spans):
        if end is not None and start > end:
            gaps.append(start - end)
            if start - end < 5:
                idle_short += start - end
            else:
                idle_long += start - end
        busy += max(0.0, stop - (start if end is None else max(start, end)))
        end = stop if end is None else max(end, stop)
    per = 1e3 * max(tokens, 1)
    return {"tokens": tokens, "busy_ms_per_token": busy / per, "idle_short_ms_per_token": idle_short / per,
            "idle_long_ms_per_token": idle_long / per, "gaps_over_5us": sum(g >= 5 for g in gaps),
            "largest_gaps_us": sorted(gaps)[-5:]}


def _hf_model(model_dir: str):
    """The transformers baselines' model: bf16, on the GPU when there is one, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval(), device


def run_transformers(model_dir: str, prompts, out_lens, args) -> dict:
    import torch

    model, device = _hf_model(model_dir)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    done_requests, useful, computed = 0, 0, 0
    start = now()
    for b in range(0, len(order), args.hf_batch_size):
        left = args.hf_time_limit - (now() - start)
        if left <= 0:
            break
        idx = order[b:b + args.hf_batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # left padding
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        new = max(out_lens[i] for i in idx)
        with torch.no_grad():  # max_time: a stopping criterion checked every token, so the limit holds mid-batch
            out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=True, temperature=0.6, top_k=None, top_p=None, pad_token_id=0, max_time=left)
        made = out.shape[1] - width  # every row decodes the same number of steps (min_new_tokens: no early EOS)
        done_requests += sum(out_lens[i] <= made for i in idx)
        useful += sum(min(out_lens[i], made) for i in idx)
        computed += made * len(idx)
        print(f"  transformers: {done_requests}/{len(prompts)} requests done, {now() - start:.0f}s", flush=True)
    seconds = now() - start
    del model
    release_memory()
    return {"side": "transformers generate", "requests": done_requests, "output_tokens": useful, "seconds": seconds,
            "tok_per_s": useful / seconds, "partial": done_requests < len(prompts),
            "padding_waste": 1 - useful / max(computed, 1)}


def run_transformers_continuous(model_dir: str, prompts, out_lens, args) -> dict:
    """transformers' own continuous batching (``model.init_continuous_batching()``: a paged KV cache and a
    scheduler in a background thread, each request with its own ``max_new_tokens``) on the same requests.

    Stopped at ``--hf-time-limit`` like the static side; a partial row counts the tokens of finished and running requests.
    """
    from transformers import GenerationConfig

    model, _ = _hf_model(model_dir)
    # eos_token_id=-1: never matched (ignore_eos), so every request decodes exactly its requested length
    config = GenerationConfig(do_sample=True, temperature=0.6, top_k=None, top_p=None, max_new_tokens=max(out_lens),
                              eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    if hasattr(manager, "warmup"):  # its CUDA graphs are captured before the clock starts, as our engine's are
        manager.warmup()
    manager.start()
    start, done, useful = now(), 0, 0
    try:
        for i, (prompt, n) in enumerate(zip(prompts, out_lens)):
            manager.add_request(list(prompt), request_id=f"r{i}", max_new_tokens=n)
        deadline = start + args.hf_time_limit
        while done < len(prompts) and now() < deadline:
            result = manager.get_result(timeout=min(1.0, max(deadline - now(), 0.01)))
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous-batching thread stopped before finishing the requests")
                continue
            if result.is_finished():
                done += 1
                useful += len(result.generated_tokens)
                if done % 32 == 0:
                    print(f"  transformers continuous batching: {done}/{len(prompts)} requests done, {now() - start:.0f}s", flush=True)
        seconds = now() - start
        in_flight = _in_flight_tokens(manager) if done < len(prompts) else 0
    finally:
        manager.stop(block=True, timeout=60, hard_stop=True)
    del manager, model
    release_memory()
    useful += in_flight
    return {"side": "transformers continuous batching", "requests": done, "output_tokens": useful, "seconds": seconds,
            "tok_per_s": useful / seconds, "partial": done < len(prompts), "in_flight_tokens": in_flight}


def _in_flight_tokens(manager) -> int:
    """Tokens transformers' continuous batching has generated for requests still running at the deadline
    (counted too, so a partial row is not biased against long requests). Reads its scheduler's state
    from our thread: a snapshot, off by at most the step in flight."""
    scheduler = getattr(getattr(manager, "batch_processor", None), "scheduler", None)
    active = getattr(scheduler, "active_requests", None)
    if not active:
        return 0
    return sum(len(getattr(state, "generated_tokens", None) or []) for state in list(active.values()))


def main() -> int:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", type=csv_list, default=["qwen3-0.6b", "llama-3.2-1b"])
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--hf-batch-size", type=int, default=128)
    p.add_argument("--hf-time-limit", type=float, default=60.0, help="seconds per shape for the transformers side")
    p.add_argument("--sections", type=csv_list, default=["throughput", "hf", "hf_cb", "bs1"],
                   help="what to run per shape: throughput (engine), hf (transformers static batches), "
                        "hf_cb (transformers continuous batching), bs1 (decode vs roofline)")
    p.add_argument("--variants", type=csv_list, default=[name for name, _ in VARIANTS],
                   help="bs1 variants to time, '_' for a space (default all: "
                        + ", ".join(name.replace(" ", "_") for name, _ in VARIANTS) + "); 'default' always runs")
    p.add_argument("--joint", action="store_true", help="bs1: also search the GEMV choices together (gemv_joint_search)")
    p.add_argument("--timelines", action="store_true", help="bs1: the stage timeline of every variant, not only the defaults")
    args = p.parse_args()
    names = {name for name, _ in VARIANTS}
    args.variants = {"default", *(name if name in names else name.replace("_", " ") for name in args.variants)}
    if args.variants - names:
        p.error(f"--variants: unknown {', '.join(sorted(args.variants - names))}")
    unknown = set(args.sections) - {"throughput", "hf", "hf_cb", "bs1"}
    if unknown:
        p.error(f"--sections: unknown {', '.join(sorted(unknown))}; choose from throughput, hf, hf_cb, bs1")
    if args.smoke:
        args.num_requests, args.min_len, args.max_len, args.shapes = 6, 4, 12, args.shapes[:1]
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="engine-bench-"))
    rows = []
    for shape in args.shapes:
        prompts, out_lens = workload(args.num_requests, args.min_len, args.max_len, TINY["vocab_size"] - 1 if args.smoke else 9999)
        print(f"[{shape}] building random-init model", flush=True)
        model_dir = build_model(shape, workdir / shape, args.smoke)
        print(f"[{shape}] engine: {len(prompts)} requests, {sum(out_lens)} output tokens", flush=True)
        try:
            engine_row = run_engine(model_dir, prompts, out_lens, args)
        except Exception as e:  # keep going: the other side and shape still tell something
            traceback.print_exc()
            engine_row = {"side": "crucible engine", "error": f"{type(e).__name__}: {e}"}
        rows.append({"shape": shape, **engine_row})
        engine_at = len(rows) - 1
        save_results(args.out, "engine_throughput", args, rows)
        baselines = [("hf", "transformers generate", run_transformers, "speedup_vs_hf"),
                     ("hf_cb", "transformers continuous batching", run_transformers_continuous, "speedup_vs_hf_cb")]
        for section, side, run, ratio_key in baselines:
            if section not in args.sections:
                continue
            print(f"[{shape}] {side} on the same requests", flush=True)
            try:
                hf_row = run(model_dir, prompts, out_lens, args)
            except Exception as e:
                traceback.print_exc()
                hf_row = {"side": side, "error": f"{type(e).__name__}: {e}"}
            rows.append({"shape": shape, **hf_row})
            if "tok_per_s" in engine_row and hf_row.get("tok_per_s"):
                rows[engine_at][ratio_key] = engine_row["tok_per_s"] / hf_row["tok_per_s"]
            save_results(args.out, "engine_throughput", args, rows)
    print_table("engine throughput (256 requests, in/out U[100,1024], ignore_eos)", rows, [
        ("shape", "shape"), ("side", "side"), ("requests", "requests"), ("output_tokens", "out tokens"), ("seconds", "s"),
        ("tok_per_s", "out tok/s"), ("speedup_vs_hf", "x HF static"), ("speedup_vs_hf_cb", "x HF cont. batching"),
        ("preemptions", "preempt"), ("error", "error"),
    ], notes=["targets (H100): qwen3-0.6b >= 11,000 out tok/s and >= 10x transformers",
              "transformers: static sorted batches; 'partial' rows stopped at --hf-time-limit (tokens produced by then / time)",
              "transformers continuous batching: init_continuous_batching(), per-request lengths; a partial row counts finished requests and the tokens of running ones"])
    bs1_rows = [r for r in rows if "roofline_ms" in r]
    if bs1_rows:
        variant_rows = [{"shape": r["shape"], "variant": v, "roofline_ms": r["roofline_ms"], "step_ms": r.get(f"step_ms_{v}"),
                         "replay_ms": r.get(f"replay_ms_{v}"), "step_x": r.get(f"step_x_roofline_{v}"),
                         "replay_x": r.get(f"replay_x_roofline_{v}")}
                        for r in bs1_rows for v, _ in VARIANTS if f"step_ms_{v}" in r]
        print_table("batch-1 decode vs roofline (weight bytes / copy bandwidth)", variant_rows, [
            ("shape", "shape"), ("variant", "variant"), ("roofline_ms", "roofline ms"), ("step_ms", "ms / token"),
            ("replay_ms", "replay ms"), ("step_x", "token x roofline"), ("replay_x", "replay x roofline"),
        ], notes=["target (H100): bs1 decode step <= 1.3x roofline",
                  "ms / token: wall time per generated token (engine steps incl. scheduling, copies, replays, token read); "
                  "replay: GPU time of one decode graph alone",
                  "variants: default = engine defaults; 8 steps / 1 step = engine.decode_steps=8 / 1; no PDL = engine.pdl=false; "
                  "cublas = engine.gemv=false; combine kernel = the decode attention's splits merged by a second kernel"])
    for row in rows:
        if row.get("partial"):
            print(f"note: {row['shape']} transformers side is partial ({row['requests']} requests)")
    print(f"results: {args.out or '(not saved: pass --out)'}; {fmt(len(rows))} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
