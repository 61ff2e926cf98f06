"""Engine latency: prefix caching on/off on a shared system prompt; chunked prefill on/off under long prompts.

    python bench/engine_latency.py --out $OUT/engine_latency.json      # H100, Qwen3-0.6B shape: ~2-3 min
    python bench/engine_latency.py --smoke                              # CPU, tiny model: the code path only

Each mode runs on a fresh engine in this process (random-init bf16 model, token ids in and out),
after a warm-up that compiles the kernels on prompts sharing no token with the workload.

(a) Prefix caching. ``--prefix-requests`` requests = one ``--system-tokens`` system prompt + a
    distinct user turn of U[16, 64] tokens, ``--prefix-output`` greedy tokens each, all submitted at
    once. Reported per mode: requests/s and output tokens/s over the whole burst, TTFT (submission
    to first token) mean/p50/p99, and the prefix-cache hit rate (prompt tokens found cached / looked up).
(b) Chunked prefill. ``--decoders`` requests decode steadily; from ``--long-start`` seconds on,
    ``--long-requests`` prompts of ``--long-tokens`` tokens arrive every ``--long-interval`` seconds.
    Chunked prefill on splits them into ``--chunk-budget``-token steps shared with the decodes; off,
    a long prompt runs whole in one step, so the step budget must hold it next to every decode.
    Reported: the decoders' time per output token (gap between successive tokens) p50/p99/max inside
    the window from the first long arrival to the end (the stall a long prompt causes), and the long
    prompts' TTFT (arrival to first token).
"""
from __future__ import annotations

import gc
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

MAX_TOKEN_ID = 9999  # random prompts draw ids below this (every shape's vocabulary is larger)


# --------------------------------------------------------------------------------------------
# Workloads: timed arrivals of token-id prompts
# --------------------------------------------------------------------------------------------
@dataclass
class Arrival:
    at: float  # seconds after the start of the run
    kind: str  # what the request is in the workload: "prefix", "decoder", "long"
    prompt: list[int]
    max_tokens: int


@dataclass
class Trace:
    kind: str
    arrived: float
    token_times: list[float] = field(default_factory=list)  # seconds after the start, one per output token

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrived if self.token_times else None


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(MAX_TOKEN_ID) for _ in range(n)]


def shared_prompt_workload(n: int, system_tokens: int, output_tokens: int, seed: int = 0) -> list[Arrival]:
    """``n`` requests at t=0 sharing one system prompt, each with its own user turn."""
    rng = random.Random(seed)
    system = random_ids(rng, system_tokens)
    return [Arrival(0.0, "prefix", system + random_ids(rng, rng.randint(16, 64)), output_tokens) for _ in range(n)]


def long_prompt_workload(decoders: int, decoder_prompt: int, decoder_max_tokens: int, long_requests: int, long_tokens: int,
                         long_output: int, start: float, interval: float, seed: int = 1) -> list[Arrival]:
    """Decoders at t=0 (they run until the last long request is done), long prompts from ``start`` on."""
    rng = random.Random(seed)
    steady = [Arrival(0.0, "decoder", random_ids(rng, decoder_prompt), decoder_max_tokens) for _ in range(decoders)]
    longs = [Arrival(start + i * interval, "long", random_ids(rng, long_tokens), long_output) for i in range(long_requests)]
    return steady + longs


# --------------------------------------------------------------------------------------------
# Driving the engine step by step, timestamping every output token
# --------------------------------------------------------------------------------------------
def drive(engine, arrivals: list[Arrival], done: Callable[[dict[str, Trace]], bool] = lambda traces: False
          ) -> tuple[dict[str, Trace], float, int]:
    """Add each request at its arrival time and step until all finish (or ``done``: the rest are aborted).

    Returns the traces, the wall seconds and the number of steps. A token's time is when the step that
    sampled it returns: its ids are on the host then. The clock never synchronizes the device: the
    engine may already have queued the next decode (launch-ahead), and waiting for that here would
    charge its time to the tokens of this step.
    """
    from engine import SamplingParams

    queue = sorted(arrivals, key=lambda a: a.at)
    traces: dict[str, Trace] = {}
    clock = time.perf_counter
    steps, start = 0, clock()
    while queue or engine.has_unfinished():
        elapsed = clock() - start
        while queue and queue[0].at <= elapsed:
            a = queue.pop(0)
            rid = engine.add_request(a.prompt, SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True),
                                     request_id=str(len(traces)))
            traces[rid] = Trace(a.kind, elapsed)
        if not engine.has_unfinished():  # idle until the next arrival
            time.sleep(max(0.0, queue[0].at - elapsed))
            continue
        changed = engine.step()
        steps += 1
        t = clock() - start
        for rid in changed:
            # a count, not engine.output(): that copies every token list each step, which would inflate TPOT
            produced = engine.requests[rid].seqs[0].num_output_tokens
            trace = traces[rid]
            trace.token_times += [t] * (produced - len(trace.token_times))
            if engine.is_finished(rid):
                engine.output(rid)  # reading a finished request releases it
        if done(traces):
            break
    for rid in list(engine.requests):
        engine.abort(rid)
    common.synchronize()  # the wall time includes all the work the run queued
    return traces, clock() - start, steps


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1e3 * seconds, 2)


def prefix_metrics(traces: dict[str, Trace], seconds: float, hits: int, queries: int) -> dict[str, Any]:
    ttfts = [t.ttft for t in traces.values() if t.ttft is not None]
    tokens = sum(len(t.token_times) for t in traces.values())
    return dict(requests=len(traces), output_tokens=tokens, seconds=round(seconds, 3), req_per_s=round(len(traces) / seconds, 2),
                out_tok_per_s=round(tokens / seconds, 1), ttft_mean_ms=ms(statistics.mean(ttfts)) if ttfts else None,
                ttft_p50_ms=ms(percentile(ttfts, 50)), ttft_p99_ms=ms(percentile(ttfts, 99)),
                prefix_hit_rate=round(hits / queries, 4) if queries else None)


def stall_metrics(traces: dict[str, Trace]) -> dict[str, Any]:
    """Decoders' inter-token gaps ending inside [first long arrival, end] and the long prompts' TTFT."""
    longs = [t for t in traces.values() if t.kind == "long"]
    window_start = min(t.arrived for t in longs)
    gaps = [b - a for t in traces.values() if t.kind == "decoder"
            for a, b in zip(t.token_times, t.token_times[1:]) if b >= window_start]
    before = [b - a for t in traces.values() if t.kind == "decoder"
              for a, b in zip(t.token_times, t.token_times[1:]) if b < window_start]
    ttfts = [t.ttft for t in longs if t.ttft is not None]
    return dict(tpot_mean_ms=ms(statistics.mean(gaps)) if gaps else None, tpot_p50_ms=ms(percentile(gaps, 50)),
                tpot_p99_ms=ms(percentile(gaps, 99)), tpot_max_ms=ms(max(gaps, default=None)),
                tpot_p50_before_ms=ms(percentile(before, 50)), decode_tokens_in_window=len(gaps),
                long_ttft_mean_ms=ms(statistics.mean(ttfts)) if ttfts else None, long_ttft_p99_ms=ms(percentile(ttfts, 99)),
                long_finished=sum(len(t.token_times) > 0 for t in longs), long_requests=len(longs))


# --------------------------------------------------------------------------------------------
# One engine per mode
# --------------------------------------------------------------------------------------------
def make_engine(model_dir: str, args, **options):
    """A fresh engine; its kernels warmed on prompts that share no token (or cached block) with the workload."""
    import torch

    from engine import LLM, SamplingParams

    on_gpu = torch.cuda.is_available()
    llm = LLM(model_dir, dtype="bf16" if on_gpu else "fp32", skip_tokenizer_init=True, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, num_blocks=args.cpu_num_blocks, **options)  # num_blocks: the CPU budget
    # ids above MAX_TOKEN_ID: never in the workload. The first call runs a whole-length prompt (chunked
    # or not) next to a short one; the second reuses half of it (the cached-prefix path when caching is on)
    warm = [MAX_TOKEN_ID + i for i in random.Random(12345).choices(range(100), k=max(args.long_tokens, args.system_tokens + 64))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([warm, warm[:32]], params)
    llm.generate([warm[: len(warm) // 2] + warm[:16]], params)
    return llm


def free_memory() -> None:
    """After the caller dropped its engine: collect it (graphs and runner hold cycles) and return the
    cached blocks, so the next engine sizes its KV cache from truly free memory."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_prefix_mode(model_dir: str, args, caching: bool) -> dict[str, Any]:
    llm = make_engine(model_dir, args, enable_prefix_caching=caching, max_num_batched_tokens=args.max_num_batched_tokens)
    before = llm.stats()
    arrivals = shared_prompt_workload(args.prefix_requests, args.system_tokens, args.prefix_output, args.seed)
    traces, seconds, steps = drive(llm.engine, arrivals)
    after = llm.stats()
    del llm
    free_memory()
    hits, queries = after["prefix_hits"] - before["prefix_hits"], after["prefix_queries"] - before["prefix_queries"]
    return dict(workload="shared system prompt", case=f"prefix cache {'on' if caching else 'off'}", steps=steps,
                budget=args.max_num_batched_tokens, **prefix_metrics(traces, seconds, hits, queries))


def run_chunked_mode(model_dir: str, args, chunked: bool) -> dict[str, Any]:
    # off: a long prompt is admitted only whole, after the running decodes took their tokens
    budget = args.chunk_budget if chunked else args.long_tokens + args.max_num_seqs
    llm = make_engine(model_dir, args, enable_chunked_prefill=chunked, max_num_batched_tokens=budget)
    decoder_max = args.max_model_len - args.decoder_prompt - 1  # decoders outlast the window; aborted at the end
    arrivals = long_prompt_workload(args.decoders, args.decoder_prompt, decoder_max, args.long_requests, args.long_tokens,
                                    args.long_output, args.long_start, args.long_interval, args.seed + 1)

    def longs_done(traces: dict[str, Trace]) -> bool:  # then the window is over: the decoders are aborted
        return sum(t.kind == "long" and len(t.token_times) >= args.long_output for t in traces.values()) == args.long_requests

    traces, seconds, steps = drive(llm.engine, arrivals, done=longs_done)
    preemptions = llm.stats()["preemptions"]
    del llm
    free_memory()
    return dict(workload="long prompts during decode", case=f"chunked prefill {'on' if chunked else 'off'}", budget=budget,
                steps=steps, seconds=round(seconds, 3), preemptions=preemptions, **stall_metrics(traces))


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """On-vs-off ratios on the 'on' rows: TTFT and throughput for prefix caching, the decode stall for chunking."""
    by_case = {r["case"]: r for r in rows if "error" not in r}
    pairs = (("prefix cache on", "prefix cache off", ("ttft_p99_ms", "ttft_mean_ms"), ("out_tok_per_s",)),
             ("chunked prefill on", "chunked prefill off", ("tpot_mean_ms", "tpot_p99_ms", "tpot_max_ms", "long_ttft_mean_ms"), ()))
    for on, off, lower_better, higher_better in pairs:
        if on in by_case and off in by_case:
            a, b = by_case[on], by_case[off]
            for key in lower_better:  # > 1: "on" is that many times faster
                a[f"{key}_off_over_on"] = round(b[key] / a[key], 3) if a.get(key) and b.get(key) else None
            for key in higher_better:
                a[f"{key}_on_over_off"] = round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None
    return rows


def main() -> int:
    p = common.bench_parser(__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen3-0.6b", help=f"one of {', '.join(common.SHAPES)}")
    p.add_argument("--parts", type=common.csv_list, default=["prefix", "chunked"], help="prefix, chunked")
    p.add_argument("--prefix-requests", type=int, default=128)
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--prefix-output", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="(a): step token budget in both modes")
    p.add_argument("--decoders", type=int, default=32)
    p.add_argument("--decoder-prompt", type=int, default=128)
    p.add_argument("--long-requests", type=int, default=8, help="enough that stalled steps are > 1%% of the window's gaps (p99)")
    p.add_argument("--long-tokens", type=int, default=8192)
    p.add_argument("--long-output", type=int, default=16)
    p.add_argument("--long-start", type=float, default=0.5, help="seconds of steady decoding before the first long prompt")
    p.add_argument("--long-interval", type=float, default=0.2, help="seconds between long prompts")
    p.add_argument("--chunk-budget", type=int, default=2048, help="(b): step token budget with chunked prefill on")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.smoke:
        args.shape, args.prefix_requests, args.system_tokens, args.prefix_output = "tiny", 4, 64, 4
        args.max_num_batched_tokens, args.decoders, args.decoder_prompt, args.long_requests = 48, 3, 8, 2
        args.long_tokens, args.long_output, args.long_start, args.long_interval, args.chunk_budget = 96, 3, 0.2, 0.1, 32
    unknown = set(args.parts) - {"prefix", "chunked"}
    if unknown:
        raise SystemExit(f"error: --parts {','.join(sorted(unknown))} unknown; choose from prefix, chunked")
    args.max_model_len = max(args.system_tokens + 64 + args.prefix_output, args.long_tokens + args.long_output) + 512
    args.cpu_num_blocks = -(-args.max_model_len * 2 // 16) + 64  # CPU only: room for a long prompt and the decoders

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="engine-latency-"))
    print(f"model: random-init {args.shape}", flush=True)
    model_dir = common.build_model_dir(args.shape, workdir / f"model-{args.shape}", seed=args.seed)
    modes = [(run_prefix_mode, True), (run_prefix_mode, False)] * ("prefix" in args.parts)
    modes += [(run_chunked_mode, True), (run_chunked_mode, False)] * ("chunked" in args.parts)
    rows: list[dict[str, Any]] = []
    for run, on in modes:
        label = f"{run.__name__.removeprefix('run_').removesuffix('_mode')} {'on' if on else 'off'}"
        print(f"== {label}", flush=True)
        start = time.perf_counter()
        try:
            row = run(model_dir, args, on)
        except Exception as e:  # one broken mode must not hide the others
            import traceback

            traceback.print_exc()
            row = dict(case=label, error=f"{type(e).__name__}: {e}"[:300])
        row["wall_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"   done in {row['wall_s']}s", flush=True)
        common.save_results(args.out, "engine_latency", args, with_ratios(rows), shape=args.shape, vocab_note=common.vocab_note(args.shape))
    report(rows, args)
    return 1 if any("error" in r for r in rows) else 0


def report(rows: list[dict[str, Any]], args) -> None:
    prefix = [r for r in rows if r.get("workload") == "shared system prompt" or r.get("case", "").startswith("prefix")]
    chunked = [r for r in rows if r not in prefix]
    if prefix:
        common.print_table(
            f"(a) {args.prefix_requests} requests sharing a {args.system_tokens}-token system prompt, {args.prefix_output} output tokens, "
            f"budget {args.max_num_batched_tokens} tokens/step ({args.shape})", prefix,
            [("case", "case"), ("req_per_s", "req/s"), ("out_tok_per_s", "out tok/s"), ("ttft_mean_ms", "TTFT mean ms"),
             ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"), ("prefix_hit_rate", "hit rate"),
             ("ttft_p99_ms_off_over_on", "p99 off/on"), ("error", "error")])
    if chunked:
        common.print_table(
            f"(b) {args.decoders} decoding requests + {args.long_requests} x {args.long_tokens}-token prompts every "
            f"{args.long_interval}s ({args.shape})", chunked,
            [("case", "case"), ("budget", "budget"), ("tpot_p50_before_ms", "TPOT p50 pre"), ("tpot_mean_ms", "TPOT mean"),
             ("tpot_p50_ms", "TPOT p50"), ("tpot_p99_ms", "TPOT p99"), ("tpot_max_ms", "TPOT max"), ("long_ttft_mean_ms", "long TTFT"),
             ("long_ttft_p99_ms", "long TTFT p99"), ("preemptions", "preempt"), ("error", "error")],
            notes=["times in ms; budget: tokens per step",
                   "TPOT: gaps between a decoding request's successive tokens from the first long arrival on (the stall); "
                   "pre: before it",
                   "off: the step budget must hold a whole long prompt next to the decodes; on: --chunk-budget"])


if __name__ == "__main__":
    sys.exit(main())
