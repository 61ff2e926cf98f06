"""GPU benchmark of multi-LoRA serving, one call (about 5 minutes on an H100):

    python bench/serve_gpu.py [out=bench/serve_gpu.json] [requests=256] [input_len=128] [output_len=128]

1. Offline (LLMEngine directly) on a random-init Qwen3-0.6B-shaped model: output-token throughput of
   the base model (LoRA off) and of the same requests spread uniformly over 1, 8 and 32 rank-16
   adapters (all seven projections); target >= 0.75x base. Also checks the first request's greedy
   tokens are equal in the CUDA-graph (BGMV) and eager (segment-gather) paths.
2. Online (the HTTP server, 8 adapters + base): TTFT/TPOT p50/p99 at several Poisson request rates,
   through bench/serve_load.py's streaming openai clients.

Everything is generated locally (model, tokenizer, adapters): no downloads. Prints rich tables and
writes JSON.
"""
from __future__ import annotations

import asyncio
import gc
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULTS = dict(out="bench/serve_gpu.json", requests=256, input_len=128, output_len=128, rank=16, rates="4,16,64",
                online_requests=128, work="/tmp/crucible-serve-gpu")


def make_model(root: Path) -> str:
    """Random Qwen3-0.6B-shaped weights (bf16) plus a small word-level tokenizer with a chat template."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = root / "qwen3-0.6b-random"
    if (path / "config.json").is_file():
        return str(path)
    config = transformers.Qwen3Config(**QWEN3_06B, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
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


def make_adapters(root: Path, n: int, rank: int) -> dict[str, str]:
    """Random PEFT LoRA adapters written directly in PEFT's file layout (faster than building 32 PeftModels)."""
    from safetensors.torch import save_file

    c, adapters = QWEN3_06B, {}
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"q_proj": (c["hidden_size"], q), "k_proj": (c["hidden_size"], kv), "v_proj": (c["hidden_size"], kv),
              "o_proj": (q, c["hidden_size"]), "gate_proj": (c["hidden_size"], c["intermediate_size"]),
              "up_proj": (c["hidden_size"], c["intermediate_size"]), "down_proj": (c["intermediate_size"], c["hidden_size"])}
    for i in range(n):
        path = root / f"adapter{i}"
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


def offline_throughput(engine, prompts: list[list[int]], adapter_ids: list[int], output_len: int) -> tuple[float, list[int]]:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [engine.add_request(p, params, adapter_id=a) for p, a in zip(prompts, adapter_ids)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    first = None
    tokens = 0
    while engine.has_unfinished():
        for rid in engine.step():
            out = engine.output(rid)
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
                if rid == ids[0]:
                    first = out.outputs[0].token_ids
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start), first


def release() -> None:
    """Return the memory of engines the caller has already ``del``-ed. (A helper taking the engine as an
    argument cannot free it: the caller's name still holds it, and the next engine would then see
    the old KV cache as used memory and find no room for its own.)"""
    gc.collect()
    torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from engine.llm_engine import LLMEngine

    opts = dict(DEFAULTS)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts:
            raise SystemExit(f"error: unknown argument {arg!r}; options: {', '.join(DEFAULTS)}")
        opts[key] = type(DEFAULTS[key])(value)
    console = Console()
    work = Path(opts["work"])
    t0 = time.perf_counter()
    model = make_model(work)
    adapters = make_adapters(work, 32, opts["rank"])
    console.print(f"model and 32 adapters ready in {time.perf_counter() - t0:.0f}s")
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 4000) for _ in range(opts["input_len"])] for _ in range(opts["requests"])]
    common = dict(dtype="bf16", device="cuda", max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=2048)
    results: dict = {"device": torch.cuda.get_device_name(), "options": opts, "offline": {}, "online": {}}

    engine = LLMEngine(model, **common)
    offline_throughput(engine, prompts[:16], [0] * 16, 8)  # warm-up
    base_tps, _ = offline_throughput(engine, prompts, [0] * len(prompts), opts["output_len"])
    results["offline"]["base"] = {"output_tok_per_s": base_tps, "ratio": 1.0}
    del engine
    release()

    engine = LLMEngine(model, **common, enable_lora=True, max_loras=32, max_lora_rank=opts["rank"])
    ids = [engine.runner.lora.load(name, path).adapter_id for name, path in adapters.items()]
    offline_throughput(engine, prompts[:16], ids[:16], 8)
    for n in (1, 8, 32):
        assignment = [ids[i % n] for i in range(len(prompts))]
        tps, _ = offline_throughput(engine, prompts, assignment, opts["output_len"])
        results["offline"][f"{n} adapters"] = {"output_tok_per_s": tps, "ratio": tps / base_tps}
    _, graphed = offline_throughput(engine, prompts[:1], ids[:1], 32)
    del engine
    release()
    eager = LLMEngine(model, **common, enable_lora=True, max_loras=1, max_lora_rank=opts["rank"], enforce_eager=True)
    eager.runner.lora.load("adapter0", adapters["adapter0"])
    _, eager_tokens = offline_throughput(eager, prompts[:1], [1], 32)
    results["offline"]["graph_equals_eager"] = graphed == eager_tokens
    del eager
    release()

    table = Table(title=f"offline multi-LoRA throughput ({results['device']}, {opts['requests']} requests, "
                        f"{opts['input_len']} in / {opts['output_len']} out, rank {opts['rank']})")
    for col in ("setup", "output tok/s", "vs base", "target"):
        table.add_column(col, justify="right")
    for name, r in results["offline"].items():
        if isinstance(r, dict):
            table.add_row(name, f"{r['output_tok_per_s']:.0f}", f"{r['ratio']:.2f}x", "" if name == "base" else ">= 0.75x")
    console.print(table)
    console.print(f"greedy tokens, CUDA-graph BGMV vs eager segment-gather: {'equal' if results['offline']['graph_equals_eager'] else 'DIFFERENT'}")

    try:
        import fastapi, openai, uvicorn  # noqa: F401, E401  (the online half needs the server stack)
    except ImportError as e:
        console.print(f"[yellow]online benchmark skipped: {e} (pip install fastapi uvicorn openai)")
    else:
        results["online"] = online(model, dict(list(adapters.items())[:8]), opts, console)
    Path(opts["out"]).parent.mkdir(parents=True, exist_ok=True)
    Path(opts["out"]).write_text(json.dumps(results, indent=2))
    console.print(f"wrote {opts['out']} ({time.perf_counter() - t0:.0f}s total)")
    return 0


def online(model: str, adapters: dict[str, str], opts: dict, console) -> dict:
    """TTFT/TPOT through the HTTP server at each request rate (base + 8 adapters, uniformly)."""
    from rich.table import Table

    import serve
    from bench.serve_load import run_load, summarize
    from trainer.config import load_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config([f"model.path={model}", f"port={port}", "device=cuda", "engine.dtype=bf16", "engine.max_num_seqs=256",
                       "engine.max_model_len=2048", "engine.max_loras=8", f"engine.max_lora_rank={opts['rank']}",
                       "serve.max_waiting=4096", "lora.adapters=" + ",".join(f"{k}={v}" for k, v in adapters.items())])
    server = serve.build_server(cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    out = {}
    table = Table(title="online: HTTP server, streaming clients, base + 8 adapters")
    for col in ("rate (req/s)", "ok", "errors", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms"):
        table.add_column(col, justify="right")
    for rate in [float(r) for r in opts["rates"].split(",")]:
        load = dict(api_key="unused", models="", seed=0, prompt_words=opts["input_len"], requests=opts["online_requests"],
                    clients=opts["online_requests"], max_tokens=opts["output_len"], rate=rate)
        results, duration = asyncio.run(run_load(f"http://127.0.0.1:{port}", load, lambda: None))
        r = summarize(results, duration)
        out[str(rate)] = r.__dict__
        table.add_row(f"{rate:g}", str(r.requests - r.errors), str(r.errors), f"{r.output_tok_per_s:.0f}", f"{r.ttft_p50_ms:.1f}",
                      f"{r.ttft_p99_ms:.1f}", f"{r.tpot_p50_ms:.2f}", f"{r.tpot_p99_ms:.2f}")
    server.should_exit = True
    thread.join(60)
    console.print(table)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
