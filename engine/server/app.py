"""The OpenAI-compatible HTTP API over one ``LLMEngine``: completions, chat, models, adapters,
health and Prometheus metrics.

Every client mistake comes back as OpenAI's error body with a 4xx status: a malformed body or a
wrong type is 400, an unknown model 404, a full waiting queue 429 with ``Retry-After``, a server
that is shutting down 503. A request whose client disconnects is aborted, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from engine.llm_engine import LLMEngine
from engine.lora import LoRAError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.server import protocol as P
from engine.server.async_engine import AsyncEngine, Draining, QueueFull, UnknownModel
from engine.server.metrics import ServerMetrics


def build_app(engine: LLMEngine, served_model_name: str, model_path: str, max_waiting: int = 256,
              api_key: str | None = None, adapters: dict[str, str] | None = None) -> FastAPI:
    """``adapters`` (name -> PEFT dir) are loaded before the server takes requests."""
    from transformers import AutoTokenizer

    metrics = ServerMetrics(served_model_name)
    core = AsyncEngine(engine, max_waiting, metrics)
    # the engine thread decodes with engine.tokenizer; handlers get their own (HF fast tokenizers are not re-entrant)
    tokenizer = AutoTokenizer.from_pretrained(engine.tokenizer.name_or_path)
    for name, path in (adapters or {}).items():
        engine.runner.lora.load(name, path)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        core.start()
        yield
        core.stop()

    app = FastAPI(title="crucible", lifespan=lifespan)
    app.state.engine = core

    # ---------------------------------------------------------------- errors and auth
    @app.exception_handler(P.APIError)
    async def api_error(_: Request, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(P.APIError(400, f"the request body is not valid JSON ({first['ctx']['error']})").body(), status_code=400)
        where = ".".join(str(x) for x in first["loc"] if x != "body" and not _is_type_tag(x)) or None
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return JSONResponse(P.APIError(400, message, param=where).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        kind = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(e.status_code, "BadRequestError")
        return JSONResponse(P.APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_: Request, e: ClientDisconnected):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the log does

    @app.middleware("http")
    async def bearer_auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            err = P.APIError(401, "invalid or missing API key (send Authorization: Bearer <serve.api_key>)", "AuthenticationError")
            return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    # ---------------------------------------------------------------- plain endpoints
    @app.get("/health")
    async def health():
        if not core.healthy:
            return JSONResponse({"status": "engine failed"}, status_code=500)
        return JSONResponse({"status": "draining" if core.draining else "ok"}, status_code=503 if core.draining else 200)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(core.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        card = dict(object="model", created=created, owned_by="crucible", max_model_len=engine.max_model_len)
        data = [dict(card, id=served_model_name, root=model_path, parent=None)]
        lora = engine.runner.lora
        data += [dict(card, id=a.name, root=a.path, parent=served_model_name) for a in (lora.adapters.values() if lora else [])]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: P.LoadLoRARequest):
        if body.lora_name == served_model_name:
            raise P.APIError(400, f"lora_name {body.lora_name!r} is the base model's name", param="lora_name")
        try:
            await core.load_adapter(body.lora_name, body.lora_path)
        except LoRAError as e:
            raise P.APIError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: P.UnloadLoRARequest):
        try:
            await core.unload_adapter(body.lora_name)
        except LoRAError as e:
            status = 404 if "is not loaded" in str(e) else 400
            raise P.APIError(status, str(e), "NotFoundError" if status == 404 else "BadRequestError", "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # ---------------------------------------------------------------- generation
    def adapter_for(model: str) -> str | None:
        if model == served_model_name:
            return None
        lora = engine.runner.lora
        if lora is None or model not in lora.adapters:
            raise P.APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")
        return model

    def token_budget(prompt_len: int, requested: int | None, param: str) -> int:
        """max_tokens, checked against the context (None: whatever the context leaves)."""
        limit = engine.max_model_len
        if prompt_len >= limit:
            raise P.APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {prompt_len} tokens.",
                             param=param)
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise P.APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                  f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion).",
                             param="max_tokens")
        return requested

    async def admit(prompts: list[list[int]], params: list[SamplingParams], adapter: str | None, prefix: str):
        handles = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                handles.append(await core.add(f"{prefix}-{i}", ids, p, adapter))
        except BaseException as e:
            for h in handles:  # all prompts run or none
                core.abort(h.request_id)
            raise _as_api_error(e) from None
        return handles

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        adapter = adapter_for(body.model)
        prompts = _prompt_list(body.prompt, tokenizer)
        params = [body.sampling_params(token_budget(len(ids), body.max_tokens, "prompt"), body.logprobs) for ids in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        handles = await admit(prompts, params, adapter, request_id)
        n = body.n

        def choice(i: int, out, text: str, new_ids: list[int], entries, offset: int, final: bool) -> dict:
            logprobs = None if body.logprobs is None else P.completion_logprobs(tokenizer, new_ids, entries, body.logprobs, offset)
            return {"index": i * n + out.index, "text": text, "logprobs": logprobs,
                    "finish_reason": P.finish_reason(out) if final else None, "stop_reason": out.stop_reason if final else None}

        if not body.stream:
            finals = await _until_finished(request, handles)
            choices = [choice(i, o, o.text, o.token_ids, o.logprobs, 0, True) for i, f in enumerate(finals) for o in f.outputs]
            return P.envelope(request_id, "text_completion", body.model, choices, usage=_usage(finals))

        async def events() -> AsyncIterator[str]:
            deltas = _Deltas(params)
            finals: dict[int, RequestOutput] = {}
            async for i, out in _merge(handles):
                finals[i] = out if out.finished else finals.get(i)
                for o in out.outputs:
                    delta = deltas.step(i, o)
                    if delta is not None:
                        text, ids, entries, offset = delta
                        chunk = P.envelope(request_id, "text_completion", body.model,
                                           [choice(i, o, text, ids, entries, offset, o.finish_reason is not None)])
                        yield _sse(chunk)
            if body.include_usage:
                yield _sse(P.envelope(request_id, "text_completion", body.model, [], usage=_usage(list(finals.values()))))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatCompletionRequest, request: Request):
        adapter = adapter_for(body.model)
        try:
            text = tokenizer.apply_chat_template([m.as_template_message() for m in body.messages], tokenize=False,
                                                 add_generation_prompt=body.add_generation_prompt)
        except Exception as e:  # the template's own checks (roles, alternation) are the client's problem
            raise P.APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(token_budget(len(ids), body.max_completion_tokens or body.max_tokens, "messages"), top)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        handles = await admit([ids], [params], adapter, request_id)

        def logprobs(new_ids: list[int], entries) -> dict | None:
            return P.chat_logprobs(tokenizer, new_ids, entries, top) if top is not None else None

        if not body.stream:
            (final,) = await _until_finished(request, handles)
            choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                        "logprobs": logprobs(o.token_ids, o.logprobs), "finish_reason": P.finish_reason(o),
                        "stop_reason": o.stop_reason} for o in final.outputs]
            return P.envelope(request_id, "chat.completion", body.model, choices, usage=_usage([final]))

        async def events() -> AsyncIterator[str]:
            chunk = lambda choices: _sse(P.envelope(request_id, "chat.completion.chunk", body.model, choices))  # noqa: E731
            yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                         for j in range(body.n)])
            deltas = _Deltas([params])
            final = None
            async for _, out in _merge(handles):
                final = out
                for o in out.outputs:
                    delta = deltas.step(0, o)
                    if delta is not None:
                        text, new_ids, entries, _ = delta
                        yield chunk([{"index": o.index, "delta": {"content": text} if text else {},
                                      "logprobs": logprobs(new_ids, entries), "finish_reason": P.finish_reason(o)}])
            if body.include_usage:
                yield _sse(P.envelope(request_id, "chat.completion.chunk", body.model, [], usage=_usage([final])))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
class ClientDisconnected(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


def _as_api_error(e: BaseException) -> BaseException:
    if isinstance(e, QueueFull):
        return P.APIError(429, str(e), "RateLimitError", headers={"Retry-After": "1"})
    if isinstance(e, Draining):
        return P.APIError(503, str(e), "ServiceUnavailableError")
    if isinstance(e, UnknownModel):
        return P.APIError(404, f"The model `{e.args[0]}` does not exist.", "NotFoundError", "model", "model_not_found")
    if isinstance(e, ValueError):  # the engine's own prompt checks
        return P.APIError(400, str(e), param="prompt")
    return e


def _is_type_tag(loc_part) -> bool:
    """pydantic names the union member that failed in the error location ("prompt.list[int]"); the
    client wants the field ("prompt")."""
    return isinstance(loc_part, str) and (loc_part in ("str", "int", "float", "bool", "list", "dict", "none")
                                          or "[" in loc_part or loc_part[:1].isupper())


def _prompt_list(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise P.APIError(400, "prompt must not be empty", param="prompt")
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if any(not p for p in ids):
        raise P.APIError(400, "prompt must not be empty", param="prompt")
    return ids


def _usage(finals: list[RequestOutput]) -> dict:
    return P.usage(sum(len(f.prompt_token_ids) for f in finals), sum(len(o.token_ids) for f in finals for o in f.outputs))


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Deltas:
    """What each completion has streamed so far, to send only the new text. Text that could still
    become part of a stop string, or an incomplete UTF-8 character, is held back until it settles, so
    the streamed text always equals the non-streamed text."""

    def __init__(self, params: list[SamplingParams]):
        self.holdback = [max((len(s) for s in p.stop), default=1) - 1 for p in params]
        self.sent: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, completion) -> (chars, tokens) sent
        self.done: set[tuple[int, int]] = set()

    def step(self, i: int, out) -> tuple[str, list[int], list | None, int] | None:
        """(new text, new token ids, their logprob entries, text offset), or None when nothing is new."""
        key = (i, out.index)
        if key in self.done:
            return None
        chars, tokens = self.sent.get(key, (0, 0))
        final = out.finish_reason is not None
        text = out.text
        if not final:
            text = text[:max(chars, len(text) - self.holdback[i])].rstrip("\ufffd")
            if len(text) <= chars:
                return None
        else:
            self.done.add(key)
        self.sent[key] = (len(text), len(out.token_ids))
        entries = out.logprobs[tokens:] if out.logprobs is not None else None
        return text[chars:], out.token_ids[tokens:], entries, chars


async def _merge(handles) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's position."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle) -> None:
        try:
            async for out in handle:
                await queue.put((i, out))
        except BaseException as e:
            await queue.put((i, e))
            raise
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:  # a cancelled pump leaves its handle's loop, which aborts the request
            t.cancel()


async def _until_finished(request: Request, handles) -> list[RequestOutput]:
    """Final outputs, in prompt order; a client that disconnects meanwhile gets its requests aborted."""
    async def collect() -> list[RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for i, out in _merge(handles):
            if out.finished:
                finals[i] = out
        return [finals[i] for i in range(len(handles))]

    task = asyncio.create_task(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientDisconnected()
