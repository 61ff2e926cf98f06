"""The OpenAI-compatible server, end to end on loopback: the unchanged ``openai`` client, streaming,
adapters chosen by ``model``, hostile inputs, admission control, disconnects and draining.

One uvicorn server (tiny random llama, two PEFT adapters) runs in a thread for the whole module;
the last test shuts it down gracefully.
"""
from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.test_lora_engine import hf_greedy, make_adapter
from trainer.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import serve  # noqa: E402

MAX_NUM_SEQS, MAX_WAITING = 4, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, server, port: int, base: str):
        self.server, self.port, self.base = server, port, base
        self.url = f"http://127.0.0.1:{port}"
        self.core = server.config.app.state.engine  # the AsyncEngine
        self.thread = threading.Thread(target=server.run, daemon=True)

    def all_blocks_free(self, timeout: float = 30.0) -> bool:
        engine = self.core.engine
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not engine.requests and engine.scheduler.block_manager.num_free_blocks == engine.runner.num_blocks:
                return True
            time.sleep(0.1)
        return False


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve-adapters")
    adapters = {"alpha": make_adapter(tiny_llama_dir, root / "alpha", seed=1, rank=8, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]),
                "beta": make_adapter(tiny_llama_dir, root / "beta", seed=2, rank=4, targets=["k_proj", "o_proj", "up_proj"])}
    port = free_port()
    cfg = load_config([f"model.path={tiny_llama_dir}", f"port={port}", "device=cpu", "serve.served_model_name=base",
                       "lora.adapters=" + ",".join(f"{k}={v}" for k, v in adapters.items()), "engine.num_blocks=96",
                       f"engine.max_num_seqs={MAX_NUM_SEQS}", f"serve.max_waiting={MAX_WAITING}", "engine.max_model_len=256",
                       "serve.drain_timeout_s=20"])
    running = Running(serve.build_server(cfg), port, tiny_llama_dir)
    running.adapters = adapters
    running.thread.start()
    deadline = time.time() + 60
    while not running.server.started:
        assert time.time() < deadline and running.thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield running
    running.server.should_exit = True
    running.thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]


def test_openai_client_models_chat_completions_and_streaming(server, client):
    assert [m.id for m in client.models.list().data] == ["base", "alpha", "beta"]
    for model in ("base", "alpha"):
        full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
        assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens >= 1
        chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == full.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    base = client.chat.completions.create(model="base", messages=CHAT, max_tokens=12, temperature=0).choices[0].message.content
    alpha = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=12, temperature=0).choices[0].message.content
    assert base != alpha, "the model field did not select the adapter"

    kwargs = dict(model="beta", prompt="The sea is", max_tokens=10, temperature=0, stop=[" the"], extra_body={"ignore_eos": True})
    text = client.completions.create(**kwargs).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs)) == text

    sampled = client.completions.create(model="base", prompt="Once", max_tokens=6, n=2, seed=7, temperature=1.0, logprobs=2)
    again = client.completions.create(model="base", prompt="Once", max_tokens=6, n=2, seed=7, temperature=1.0, logprobs=2)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible
    lp = sampled.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6 and all(len(t) <= 2 for t in lp.top_logprobs)


def test_served_adapter_matches_peft(server, client):
    ids = [5, 300, 2048, 77, 9000, 12]
    out = client.completions.create(model="alpha", prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True,
                                                                                                         "min_tokens": 12})
    expected = hf_greedy(server.base, server.adapters["alpha"], [ids])[0]
    assert out.choices[0].text == server.core.engine.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "base", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "base", "prompt": 42}, 400, "prompt"),
    ({"model": "base", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "base", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "base", "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "base", "prompt": "word " * 400}, 400, "prompt"),
    ({"model": "base", "prompt": [[]]}, 400, "prompt"),
    ({"model": "base", "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"model": "base", "messages": []}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "base", "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
])
def test_hostile_inputs_get_openai_errors_and_server_keeps_serving(server, body, status, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    ok = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_runtime_adapter_load_and_unload(server, client, tmp_path):
    url = server.url + "/v1"
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "beta"}).status_code == 200
    assert "beta" not in [m.id for m in client.models.list().data]
    assert httpx.post(url + "/completions", json={"model": "beta", "prompt": "x"}).status_code == 404
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "beta"}).status_code == 404
    bad = httpx.post(url + "/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(tmp_path)})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    config = json.loads((Path(server.adapters["beta"]) / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    dora = httpx.post(url + "/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(tmp_path)})
    assert dora.status_code == 400 and "DoRA" in dora.json()["error"]["message"]
    assert httpx.post(url + "/load_lora_adapter", json={"lora_name": "beta", "lora_path": server.adapters["beta"]}).status_code == 200
    out = client.completions.create(model="beta", prompt="Hello", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_adapters_beyond_the_slots_are_swapped_in_on_demand(server, client):
    url, lora = server.url + "/v1", server.core.engine.runner.lora
    extra = ["gamma", "delta", "epsilon"]  # with alpha and beta: 5 adapters for engine.max_loras=4 slots
    for name in extra:
        assert httpx.post(url + "/load_lora_adapter", json={"lora_name": name, "lora_path": server.adapters["alpha"]}).status_code == 200
    assert {"alpha", "beta", *extra} <= {m.id for m in client.models.list().data}
    assert lora.adapters["epsilon"].slot is None and len(lora.resident()) == lora.max_loras
    prompt = [5, 300, 2048, 77]
    expected = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    out = client.completions.create(model="epsilon", prompt=prompt, max_tokens=8, temperature=0)  # same weights as alpha
    assert out.choices[0].text == expected
    assert lora.adapters["epsilon"].slot is not None and len(lora.resident()) == lora.max_loras
    for name in extra:
        assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": name}).status_code == 200


async def _stream_burst(url: str, n: int, disconnect_every: int) -> list[int]:
    """n concurrent streaming requests; every ``disconnect_every``-th client hangs up after its first chunk."""
    async with httpx.AsyncClient(timeout=120) as http:
        async def one(i: int) -> int:
            body = {"model": ["base", "alpha", "beta"][i % 3], "prompt": f"story {i}", "max_tokens": 48, "stream": True,
                    "temperature": 0.8, "extra": "ignored"}
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    assert r.status_code != 429 or r.headers["retry-after"] == "1"
                    return r.status_code
                async for line in r.aiter_lines():
                    if i % disconnect_every == 0 and line.startswith("data:"):
                        return -1  # leaving the block closes the connection mid-stream
                return 200

        return await asyncio.gather(*[one(i) for i in range(n)])


def test_burst_with_disconnects_gets_429s_and_frees_every_kv_block(server):
    codes = asyncio.run(_stream_burst(server.url, 16, disconnect_every=3))
    assert set(codes) <= {200, -1, 429}
    assert codes.count(429) >= 1, "16 concurrent requests should overflow max_num_seqs + max_waiting = 8"
    assert codes.count(200) >= 1 and codes.count(-1) >= 1
    assert server.all_blocks_free(), "a disconnected or finished request kept KV blocks"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'crucible:num_requests_running{model_name="base"} 0' in metrics
    assert "crucible:request_rejected_total" in metrics and "crucible:time_to_first_token_seconds_bucket" in metrics


def test_metrics_and_health(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "num_preemptions_total"):
        assert f"crucible:{name}" in values
    assert values["crucible:prompt_tokens_total"] > 0 and values["crucible:generation_tokens_total"] > 0
    assert values["crucible:e2e_request_latency_seconds_count"] > 0
    assert values["crucible:prefix_cache_queries_total"] >= values["crucible:prefix_cache_hits_total"]


def test_api_key_is_required_when_set(tiny_llama_dir):
    from fastapi.testclient import TestClient

    cfg = load_config([f"model.path={tiny_llama_dir}", "device=cpu", "serve.api_key=s3cret", "engine.num_blocks=16"])
    app = serve.build_server(cfg).config.app
    with TestClient(app) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["type"] == "AuthenticationError"
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200  # probes need no key


def test_graceful_shutdown_drains_in_flight_requests(server):
    """Runs last: stops the module's server while a request is streaming; that request still completes."""
    async def scenario() -> tuple[str, int]:
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": "alpha", "prompt": "drain", "max_tokens": 40, "stream": True, "ignore_eos": True}
            async with http.stream("POST", server.url + "/v1/completions", json=body) as r:
                lines = []
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        if len(lines) == 1:
                            server.server.should_exit = True  # what SIGTERM does
                return lines[-1], len(lines)

    last, n = asyncio.run(scenario())
    assert last == "data: [DONE]" and n > 2
    server.thread.join(30)
    assert not server.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
