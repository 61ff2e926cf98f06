"""The bridge between asyncio handlers and the synchronous ``LLMEngine``.

One background thread owns the engine: it runs queued commands (add, abort, load/unload adapter)
between steps, runs ``step()`` while there is work, and fans each changed request's cumulative
``RequestOutput`` out to that request's asyncio queue. Only this thread touches the engine, so the
engine needs no locks and a slow step never blocks the event loop.

A request for a registered adapter that is not in a GPU slot makes it resident on admission
(evicting the least recently used adapter no request is using); when every slot serves requests in
flight, the request is parked (counted as waiting) and admitted as soon as a slot frees up.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from engine.llm_engine import LLMEngine
from engine.lora import LoadedAdapter, LoRAError, LoRAManager
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.server.metrics import ServerMetrics


class QueueFull(Exception):
    """The waiting queue is at ``serve.max_waiting``: the client should retry later (429)."""


class UnknownModel(LookupError):
    """The request names an adapter that is not loaded (404)."""


class Draining(Exception):
    """The server is shutting down and admits no new requests (503)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    counted: list[bool]  # per completion: its metrics are recorded
    first_token: float | None = None


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int, metrics: ServerMetrics):
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.draining = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_adds = 0  # admitted by a handler, not yet in the scheduler (touched on the event loop only)
        self._streams: dict[str, _Stream] = {}
        self._parked: list[tuple] = []  # (add arguments) of requests waiting for an adapter slot, oldest first
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stats = engine.stats()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abort whatever is left and stop the engine thread (after the drain, at shutdown)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stats(self) -> dict[str, float]:
        return dict(self._stats, waiting=self._stats["waiting"] + self._pending_adds + len(self._parked))

    # ------------------------------------------------------------------ commands
    async def call(self, fn: Callable[[LLMEngine], object]):
        """Run ``fn(engine)`` on the engine thread between steps; its result or exception comes back here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put((fn, loop, future))
        self._wake.set()
        return await future

    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> "RequestHandle":
        """Admit a request. Raises Draining, QueueFull, UnknownModel (no such adapter) or the engine's
        ValueError (prompt too long ...) before anything runs."""
        if self.draining:
            raise Draining("the server is shutting down")
        if self.stats()["waiting"] >= self.max_waiting:
            self.metrics.reject()
            raise QueueFull(f"{self.max_waiting} requests are already waiting (serve.max_waiting); retry later")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.perf_counter(), len(prompt_ids), [False] * params.n)
        self._pending_adds += 1
        try:
            await self.call(lambda e: self._add(e, request_id, prompt_ids, params, adapter, stream))
        except asyncio.CancelledError:  # the add may still run: make sure it is undone
            self.abort(request_id)
            raise
        finally:
            self._pending_adds -= 1
        return RequestHandle(self, request_id, stream)

    async def load_adapter(self, name: str, path: str) -> LoadedAdapter:
        return await self.call(lambda e: _lora(e).load(name, path))

    async def unload_adapter(self, name: str) -> LoadedAdapter:
        def unload(engine: LLMEngine) -> LoadedAdapter:
            loaded = _lora(engine).adapters.get(name)
            busy = loaded and sum(r.seqs[0].adapter_id == loaded.adapter_id for r in engine.requests.values())
            if busy:  # its slot is read by every step these requests take
                raise LoRAError(f"adapter {name!r} has {busy} requests in flight; unload it when they finish")
            return _lora(engine).unload(name)

        return await self.call(unload)

    def abort(self, request_id: str) -> None:
        self._commands.put((lambda e: self._abort(e, request_id), None, None))
        self._wake.set()

    def _add(self, engine: LLMEngine, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
             stream: _Stream) -> None:
        if adapter is not None:  # resolved here, on the engine thread, so an unload cannot race the add
            if engine.runner.lora is None or adapter not in engine.runner.lora.adapters:
                raise UnknownModel(adapter)
            engine._validate_prompt(prompt_ids)  # refuse a bad prompt now, not when it leaves the parking
        self._streams[request_id] = stream
        if not self._admit(engine, request_id, prompt_ids, params, adapter):
            self._parked.append((request_id, prompt_ids, params, adapter))

    def _admit(self, engine: LLMEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
               adapter: str | None) -> bool:
        """Hand the request to the engine, making its adapter resident first; False when no slot is free."""
        adapter_id = 0
        if adapter is not None:
            busy = {s.adapter_id for r in engine.requests.values() for s in r.seqs}
            loaded = engine.runner.lora.activate(adapter, busy)
            if loaded is None:
                return False
            adapter_id = loaded.adapter_id
        try:
            engine.add_request(prompt_ids, params, request_id=request_id, adapter_id=adapter_id)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return True

    def _admit_parked(self, engine: LLMEngine) -> None:
        parked, self._parked = self._parked, []
        for request_id, prompt_ids, params, adapter in parked:
            stream = self._streams.get(request_id)
            if stream is None:  # aborted while parked
                continue
            if adapter not in engine.runner.lora.adapters:  # unloaded while parked
                self._streams.pop(request_id)
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, UnknownModel(adapter))
            elif not self._admit(engine, request_id, prompt_ids, params, adapter):
                self._parked.append((request_id, prompt_ids, params, adapter))

    def _abort(self, engine: LLMEngine, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if request_id in engine.requests:
            engine.abort(request_id)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._run_commands()
                if self._parked:
                    self._admit_parked(engine)
                if not engine.has_unfinished():
                    self._stats = engine.stats()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                changed = engine.step()
                self._stats = engine.stats()
                now = time.perf_counter()
                for request_id in changed:
                    stream = self._streams.get(request_id)
                    if stream is None:  # aborted while the step ran
                        continue
                    self._deliver(request_id, stream, engine.output(request_id), now)
        except BaseException as e:  # a crashed engine fails every open request instead of hanging it
            self._error = e
            for stream in self._streams.values():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, RuntimeError(f"engine failed: {e!r}"))
            raise
        finally:
            for request_id in list(engine.requests):
                engine.abort(request_id)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, loop, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # handed back to the caller, who turns it into an HTTP error
                result, error = None, e
            if future is not None:
                loop.call_soon_threadsafe(_settle, future, result, error)

    def _deliver(self, request_id: str, stream: _Stream, out: RequestOutput, now: float) -> None:
        produced = [len(o.token_ids) for o in out.outputs]
        if stream.first_token is None and any(produced):
            stream.first_token = now
            self.metrics.first_token(now - stream.arrival)
        for o in out.outputs:
            if o.finish_reason is not None and not stream.counted[o.index]:
                ttft = None if stream.first_token is None else stream.first_token - stream.arrival
                self.metrics.request_done(o.finish_reason, now - stream.arrival, ttft,
                                          stream.num_prompt_tokens if o.index == 0 else 0, len(o.token_ids))
                stream.counted[o.index] = True
        if out.finished:
            del self._streams[request_id]
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)


def _lora(engine: LLMEngine) -> LoRAManager:
    if engine.runner.lora is None:
        raise LoRAError("LoRA serving is off: start the server with lora.adapters=name=path,... or engine.enable_lora=true")
    return engine.runner.lora


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    future.set_exception(error) if error is not None else future.set_result(result)


class RequestHandle:
    """An admitted request: iterate for its cumulative outputs; leaving early aborts it (frees its KV)."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream):
        self.engine, self.request_id, self.stream = engine, request_id, stream

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await self.stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the client went away, or the handler failed
                self.engine.abort(self.request_id)
