"""GPU benchmark of multi-LoRA serving, one call (about 4 minutes on an H100; `--budget-s` caps it):

    python bench/serve_gpu.py --out bench_out/serve_gpu.json        # via: bash bench/run_gpu.sh "serve_gpu:420"
    python bench/serve_gpu.py --smoke --out /tmp/serve_smoke.json   # CPU, tiny model: checks the code path

1. Offline (LLMEngine directly) on a random-init Qwen3-0.6B-shaped model: output-token throughput of
   the base model (LoRA off) and of the same requests spread uniformly over 1, 8 and 32 rank-16
   adapters (all seven projections); target >= 0.75x base. Also checks the first request's greedy
   tokens are equal with CUDA-graph decode and with eager decode on the same engine.
2. Online (launch/serve.py's server in this process, on loopback): base + 8 adapters mixed
   uniformly, Poisson arrivals at several request rates, bench/serve_load.py's streaming ``openai``
   clients; TTFT/TPOT p50/p99, throughput and errors per rate. Needs the server stack (fastapi,
   uvicorn, openai, httpx): a missing package skips this half with the exact list to install.

Everything is generated locally (model, tokenizer, adapters): no downloads. Prints rich tables and
writes JSON (``--out``) after every phase, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

from bench.common import bench_parser, csv_list, print_table, release_memory, save_results, synchronize  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(QWEN3_06B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=4096)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SERVER_PACKAGES = ["fastapi", "uvicorn", "openai", "httpx"]
TARGET_RATIO = 0.75


def parse_args(argv: list[str] | None):
    p = bench_parser(__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=256, help="offline requests per case")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapter-counts", type=csv_list, default=["1", "8", "32"], help="adapters mixed uniformly per case")
    p.add_argument("--rates", type=csv_list, default=["8", "32", "128"], help="online request rates (req/s, Poisson)")
    p.add_argument("--online-requests", type=int, default=128, help="requests per online rate")
    p.add_argument("--online-adapters", type=int, default=8, help="adapters served next to the base model online")
    p.add_argument("--repeats", type=int, default=5, help="offline rounds (every case once per round); medians are reported")
    p.add_argument("--skip-online", action="store_true", help="offline cases only (no HTTP server)")
    p.add_argument("--budget-s", type=float, default=390.0, help="skip online rates that would start after this many seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.requests, args.input_len, args.output_len, args.online_requests = 8, 16, 8, 6
        args.adapter_counts, args.rates, args.online_adapters = ["1", "2", "4"], ["4"], 2
        args.budget_s = float("inf")  # a code-path check: every phase runs, however slow the CPU
    args.adapter_counts = [int(n) for n in args.adapter_counts]
    args.rates = [float(r) for r in args.rates]
    args.workdir = args.workdir or Path("/tmp/crucible-serve-gpu" + ("-smoke" if args.smoke else ""))
    return args


# ------------------------------------------------------------------------------------------------
# Local model and adapters
# ------------------------------------------------------------------------------------------------
def make_model(root: Path, shape: dict, device: str) -> str:
    """Random weights of ``shape`` (bf16 on GPU) plus a small word-level tokenizer with a chat template."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = root / f"qwen3-random-{shape['hidden_size']}"
    if (path / "config.json").is_file():
        return str(path)
    config = transformers.Qwen3Config(**shape, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    words = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"] + [f"w{i}" for i in range(4000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    fast.save_pretrained(path)
    return str(path)


def make_adapters(root: Path, shape: dict, n: int, rank: int) -> dict[str, str]:
    """Random PEFT LoRA adapters written directly in PEFT's file layout (faster than building 32 PeftModels)."""
    from safetensors.torch import save_file

    c, adapters = shape, {}
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"q_proj": (c["hidden_size"], q), "k_proj": (c["hidden_size"], kv), "v_proj": (c["hidden_size"], kv),
              "o_proj": (q, c["hidden_size"]), "gate_proj": (c["hidden_size"], c["intermediate_size"]),
              "up_proj": (c["hidden_size"], c["intermediate_size"]), "down_proj": (c["intermediate_size"], c["hidden_size"])}
    for i in range(n):
        path = root / f"adapters-{c['hidden_size']}-r{rank}" / f"adapter{i}"
        adapters[f"adapter{i}"] = str(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        path.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(c["num_hidden_layers"]):
            for module, (fan_in, fan_out) in shapes.items():
                group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                name = f"base_model.model.model.layers.{layer}.{group}.{module}"
                tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * fan_in ** -0.5).bfloat16()
                tensors[f"{name}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).bfloat16()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS, "bias": "none"}))
    return adapters


# ------------------------------------------------------------------------------------------------
# Offline throughput
# ------------------------------------------------------------------------------------------------
def offline_throughput(engine, prompts: list[list[int]], adapter_ids: list[int], output_len: int) -> tuple[float, list[int]]:
    """Output tokens/s of greedy-generating every prompt under its adapter id; also the first request's tokens."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [engine.add_request(p, params, adapter_id=a) for p, a in zip(prompts, adapter_ids)]
    synchronize()
    start = time.perf_counter()
    first, tokens = None, 0
    while engine.has_unfinished():
        for rid in engine.step():
            out = engine.output(rid)
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
                first = out.outputs[0].token_ids if rid == ids[0] else first
    synchronize()
    return tokens / (time.perf_counter() - start), first


def profiled_pass(engine, prompts: list[list[int]], adapter_ids: list[int], case: str, console) -> dict:
    """torch.profiler over a short run of the same workload (after the timed one): the top kernels and
    how much of the wall time the GPU was busy (a low share means the host is the bottleneck)."""
    from bench.profiling import OpProfiler

    profiler = OpProfiler(top=12)
    profiler.start()
    offline_throughput(engine, prompts, adapter_ids, 32)
    top = profiler.stop()
    console.print(f"profile of {case}: wall {profiler.totals['wall_ms']:.0f} ms, device busy {profiler.totals['device_ms']:.0f} ms")
    return {"case": case, "top_ops": top, **profiler.totals}


def offline(args, model: str, adapters: dict[str, str], engine_options: dict, rows: list[dict], console) -> dict:
    """Base and multi-LoRA throughput, measured in interleaved rounds (base, 1, 8, 32 adapters; again ...).

    A case lasts about a second and is host-bound at this model size, so runs drift with the host
    (clocks, other processes): measuring each case in a block of its own let that drift decide the
    ratio (base came out slower than 8 adapters in one call). Both engines stay alive side by side,
    every round measures every case, and the reported ratio is the median of the per-round ratios.
    """
    from engine.llm_engine import LLMEngine

    rng = random.Random(0)

    def fresh_prompts(count: int = args.requests) -> list[list[int]]:
        # new token ids for every run: a repeated prompt would hit the prefix cache and skip its prefill
        return [[rng.randrange(5, 4000) for _ in range(args.input_len)] for _ in range(count)]

    max_n = max(args.adapter_counts)
    # two engines in one process: the base one takes a fixed share, the LoRA one what is left under 0.85
    base = LLMEngine(model, **engine_options, **({"gpu_memory_utilization": 0.4} if torch.cuda.is_available() else {}))
    lora = LLMEngine(model, **engine_options, enable_lora=True, max_loras=max_n, max_lora_rank=args.rank,
                     **({"gpu_memory_utilization": 0.85} if torch.cuda.is_available() else {}))
    ids = [lora.runner.lora.load(name, path).adapter_id for name, path in list(adapters.items())[:max_n]]
    cases = {"base": (base, [0] * args.requests)}
    cases.update({n: (lora, [ids[i % n] for i in range(args.requests)]) for n in args.adapter_counts})
    for engine, mix in cases.values():  # warm-up: the full workload once (kernel tiles, batch sizes, allocator)
        offline_throughput(engine, fresh_prompts(), mix, args.output_len)
    samples: dict = {case: [] for case in cases}
    for _ in range(max(1, args.repeats)):
        for case, (engine, mix) in cases.items():
            prompts = fresh_prompts()
            gc.collect()  # not inside a timed run
            samples[case].append(offline_throughput(engine, prompts, mix, args.output_len)[0])
    base_tps = statistics.median(samples["base"])
    rows.append({"case": "offline base", "out_tok_per_s": base_tps, "vs_base": 1.0, "samples": samples["base"]})
    console.print(f"base: {base_tps:,.0f} output tok/s (rounds: {', '.join(f'{t:,.0f}' for t in samples['base'])})")
    for n in args.adapter_counts:
        ratios = [t / b for t, b in zip(samples[n], samples["base"])]
        ratio = statistics.median(ratios)
        rows.append({"case": f"offline {n} adapters", "out_tok_per_s": statistics.median(samples[n]), "vs_base": ratio,
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "samples": samples[n],
                     "target": f">= {TARGET_RATIO}x", "met": ratio >= TARGET_RATIO})
        console.print(f"{n} adapters: {statistics.median(samples[n]):,.0f} output tok/s ({ratio:.2f}x base; per round "
                      f"{', '.join(f'{r:.2f}' for r in ratios)})")
    profiles = []
    if args.profile:
        for case, (engine, mix) in cases.items():
            label = "base" if case == "base" else f"{case} adapters"
            profiles.append(profiled_pass(engine, fresh_prompts(64), mix[:64], label, console))
    # eager decode on the same engine: hiding its graphs makes every step take the eager path
    # (the same prompt twice: the second run's prefill hits the prefix cache, its decode does not)
    prompt = fresh_prompts(1)
    _, graphed = offline_throughput(lora, prompt, ids[:1], 32)
    graphs, lora.runner.graphs = lora.runner.graphs, {}
    _, eager = offline_throughput(lora, prompt, ids[:1], 32)
    lora.runner.graphs = graphs
    has_graphs = bool(graphs)
    del base, lora, graphs, cases
    release_memory()
    return {"graph_equals_eager": graphed == eager if has_graphs else None, "profiles": profiles}


# ------------------------------------------------------------------------------------------------
# Online: the HTTP server under streaming load
# ------------------------------------------------------------------------------------------------
def missing_server_packages() -> list[str]:
    return [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]


def online(args, model: str, adapters: dict[str, str], serve_overrides: list[str], rows: list[dict], console,
           deadline: float) -> list[str]:
    """One server (launch/serve.py's build_server, in a thread), one load run per rate; returns skipped rates."""
    import serve
    from bench.serve_load import run_load, summarize
    from trainer.config import load_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config([f"model.path={model}", f"port={port}", "host=127.0.0.1", *serve_overrides,
                       f"engine.max_loras={len(adapters)}", f"engine.max_lora_rank={args.rank}", "serve.max_waiting=4096",
                       "lora.adapters=" + ",".join(f"{k}={v}" for k, v in adapters.items())])
    server = serve.build_server(cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited during start-up (see the log above)")
        time.sleep(0.1)
    skipped = []
    try:
        for rate in args.rates:
            expected_s = args.online_requests / rate + 10
            if time.perf_counter() + expected_s > deadline:
                skipped.append(f"{rate:g}")
                continue
            load = dict(api_key="unused", models=",".join([model, *adapters]), seed=0, prompt_words=args.input_len,
                        requests=args.online_requests, clients=args.online_requests, max_tokens=args.output_len, rate=rate,
                        ignore_eos=True)
            results, duration = asyncio.run(run_load(f"http://127.0.0.1:{port}", load, lambda: None))
            r = summarize(results, duration)
            rows.append({"case": f"online {rate:g} req/s", "requests": r.requests, "errors": r.errors,
                         "out_tok_per_s": r.output_tok_per_s, "ttft_p50_ms": r.ttft_p50_ms, "ttft_p99_ms": r.ttft_p99_ms,
                         "tpot_p50_ms": r.tpot_p50_ms, "tpot_p99_ms": r.tpot_p99_ms, "error_samples": r.error_samples})
            console.print(f"rate {rate:g}: TTFT p50 {r.ttft_p50_ms:.1f} ms, TPOT p50 {r.tpot_p50_ms:.2f} ms, {r.errors} errors")
    finally:
        server.should_exit = True
        thread.join(60)
    return skipped


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console()
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("error: no CUDA device; run with --smoke on CPU")
    shape = TINY if args.smoke else QWEN3_06B
    device = "cuda" if cuda else "cpu"
    model = make_model(args.workdir, shape, device)
    adapters = make_adapters(args.workdir, shape, max(args.adapter_counts + [args.online_adapters]), args.rank)
    console.print(f"model and {len(adapters)} adapters ready in {time.perf_counter() - t0:.0f}s")
    dtype = "bf16" if cuda else "fp32"
    engine_options = dict(dtype=dtype, device=device, max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=2048)
    if not cuda:
        engine_options["num_blocks"] = 256
    rows: list[dict] = []
    extra = {"device": torch.cuda.get_device_name() if cuda else "cpu", "notes": []}

    extra.update(offline(args, model, adapters, engine_options, rows, console))
    save_results(args.out, "serve_gpu", args, rows, **extra)

    missing = missing_server_packages()
    if args.skip_online:
        extra["notes"].append("online half skipped (--skip-online)")
    elif missing:
        note = f"online half skipped: missing Python packages {', '.join(missing)} (pip install {' '.join(missing)})"
        console.print(f"[yellow]{note}")
        extra["notes"].append(note)
    else:
        serve_overrides = [f"device={device}", f"engine.dtype={dtype}", "engine.max_num_seqs=256", "engine.max_model_len=2048"]
        serve_overrides += [] if cuda else ["engine.num_blocks=256"]
        skipped = online(args, model, dict(list(adapters.items())[:args.online_adapters]), serve_overrides, rows, console,
                         deadline)
        if skipped:
            extra["notes"].append(f"online rates {', '.join(skipped)} req/s skipped: past --budget-s={args.budget_s:.0f}")
    extra["wall_s"] = time.perf_counter() - t0
    save_results(args.out, "serve_gpu", args, rows, **extra)

    title = (f"multi-LoRA serving ({extra['device']}, {args.requests} requests, {args.input_len} in / {args.output_len} out, "
             f"rank {args.rank}; online: base + {args.online_adapters} adapters, {args.online_requests} requests per rate)")
    print_table(title, rows, [("case", "case"), ("out_tok_per_s", "out tok/s"), ("vs_base", "vs base"), ("target", "target"),
                              ("met", "met"), ("errors", "errors"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
                              ("tpot_p50_ms", "TPOT p50 ms"), ("tpot_p99_ms", "TPOT p99 ms")],
                notes=[f"greedy tokens, CUDA-graph decode vs eager decode: "
                       f"{ {True: 'equal', False: 'DIFFERENT', None: 'n/a (no CUDA graphs)'}[extra['graph_equals_eager']] }",
                       *extra["notes"], f"wall time {extra['wall_s']:.0f}s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
