"""Load test for the OpenAI-compatible server: N concurrent streaming clients (the ``openai`` package).

    python bench/serve_load.py url=http://127.0.0.1:8000 clients=16 requests=64 max_tokens=64
    python bench/serve_load.py serve="model.path=smollm2-135m-instruct engine.num_blocks=512" clients=8

With ``serve=...`` it starts ``launch/serve.py`` with those arguments on a free port and stops it
afterwards. Requests cycle over ``models`` (default: every model the server lists) and, with
``rate`` > 0, arrive as a Poisson process at that many per second. Reports output-token throughput,
TTFT/TPOT p50/p99, and errors as a rich table and JSON (``out=FILE``).
"""
from __future__ import annotations

import asyncio
import json
import random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = dict(url="", serve="", clients=8, requests=32, max_tokens=64, rate=0.0, models="", prompt_words=32,
                seed=0, out="", api_key="unused", startup_timeout=300.0, ignore_eos=False)


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    tpot: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class Report:
    requests: int
    errors: int
    duration_s: float
    output_tokens: int
    output_tok_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    latency_p50_s: float
    latency_p99_s: float
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(client, model: str, prompt: str, max_tokens: int, ignore_eos: bool = False) -> Result:
    """One streaming completion; ``ignore_eos`` makes every request produce ``max_tokens`` (fixed work per request)."""
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True} if ignore_eos else None)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # counted and reported, never fatal: errors are part of what a load test measures
        return Result(False, error=f"{type(e).__name__}: {e}"[:200])
    end = time.perf_counter()
    ttft = (first or end) - start
    return Result(True, ttft, (end - start - ttft) / max(tokens - 1, 1), end - start, tokens)


async def run_load(url: str, opts: dict, progress) -> tuple[list[Result], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=opts["api_key"], max_retries=0, timeout=600)
    models = [m for m in opts["models"].split(",") if m] or [m.id async for m in client.models.list()]
    rng = random.Random(opts["seed"])
    words = "the a model serves many adapters while tokens stream to every client in one batch".split()
    prompts = [" ".join(rng.choice(words) for _ in range(opts["prompt_words"])) for _ in range(opts["requests"])]
    gate = asyncio.Semaphore(opts["clients"])
    results: list[Result] = []

    async def client_task(i: int, delay: float) -> None:
        await asyncio.sleep(delay)
        async with gate:
            results.append(await one_request(client, models[i % len(models)], prompts[i], opts["max_tokens"],
                                             opts.get("ignore_eos", False)))
            progress()

    delays, t = [], 0.0
    for _ in range(opts["requests"]):
        delays.append(t)
        t += rng.expovariate(opts["rate"]) if opts["rate"] > 0 else 0.0
    start = time.perf_counter()
    await asyncio.gather(*[client_task(i, d) for i, d in enumerate(delays)])
    return results, time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> Report:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ms = lambda xs, q: percentile(xs, q) * 1000  # noqa: E731
    return Report(
        requests=len(results), errors=len(results) - len(ok), duration_s=duration, output_tokens=tokens,
        output_tok_per_s=tokens / duration, requests_per_s=len(ok) / duration,
        ttft_p50_ms=ms([r.ttft for r in ok], 50), ttft_p99_ms=ms([r.ttft for r in ok], 99),
        tpot_p50_ms=ms([r.tpot for r in ok if r.tokens > 1], 50), tpot_p99_ms=ms([r.tpot for r in ok if r.tokens > 1], 99),
        latency_p50_s=percentile([r.latency for r in ok], 50), latency_p99_s=percentile([r.latency for r in ok], 99),
        error_samples=sorted({r.error for r in results if not r.ok})[:5])


def table(report: Report, title: str):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, value in asdict(report).items():
        if key != "error_samples":
            t.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    return t


def start_server(serve_args: str, timeout: float) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "launch" / "serve.py"), *shlex.split(serve_args), "host=127.0.0.1", f"port={port}"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with code {proc.returncode} ({' '.join(cmd)})")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"error: the server was not healthy after {timeout:.0f}s")


def parse(argv: list[str]) -> dict:
    opts = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            raise SystemExit(f"error: unknown argument {arg!r}; options: {', '.join(f'{k}=' for k in DEFAULTS)}")
        if isinstance(DEFAULTS[key], bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"error: {key}={value!r}: expected true or false")
            opts[key] = value.lower() in ("true", "1")
        else:
            opts[key] = type(DEFAULTS[key])(value)
    if bool(opts["url"]) == bool(opts["serve"]):
        raise SystemExit("error: give exactly one of url=<server url> or serve=\"<launch/serve.py arguments>\"")
    return opts


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    opts = parse(list(sys.argv[1:] if argv is None else argv))
    console = Console()
    proc, url = (None, opts["url"]) if opts["url"] else start_server(opts["serve"], opts["startup_timeout"])
    try:
        with Progress(console=console) as bar:
            task = bar.add_task("requests", total=opts["requests"])
            results, duration = asyncio.run(run_load(url, opts, lambda: bar.advance(task)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    report = summarize(results, duration)
    console.print(table(report, f"serve load: {opts['clients']} clients, {opts['requests']} requests, {url}"))
    for sample in report.error_samples:
        console.print(f"[red]error[/] {sample}")
    if opts["out"]:
        Path(opts["out"]).write_text(json.dumps(dict(asdict(report), options=opts), indent=2))
    print(json.dumps(asdict(report)))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
