"""Prometheus text exposition (format 0.0.4) with vLLM-style names under the ``crucible:`` prefix.

Small on purpose: counters, gauges and histograms are all the server needs, and owning them keeps
the server free of a metrics dependency. Gauges and engine-side counters are read from
``LLMEngine.stats()`` at scrape time; request-level series are recorded as requests finish.
"""
from __future__ import annotations

import threading
from bisect import bisect_left

PREFIX = "crucible:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out += [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {running}"]
        return out


class ServerMetrics:
    """Request-level series, updated from the engine thread and read by ``/metrics``."""

    def __init__(self, model_name: str):
        self.labels = f'model_name="{model_name}"'
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.rejected = 0  # 429s from admission control

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def request_done(self, finish_reason: str, e2e_s: float, ttft_s: float | None, prompt_tokens: int, output_tokens: int) -> None:
        with self._lock:
            self.e2e.observe(e2e_s)
            if ttft_s is not None and output_tokens > 1:  # time per output token after the first
                self.tpot.observe((e2e_s - ttft_s) / (output_tokens - 1))
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += output_tokens
            self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1

    def render(self, engine_stats: dict[str, float]) -> str:
        lb = self.labels
        series = [
            ("num_requests_running", "gauge", "Requests in the running batch.", engine_stats["running"]),
            ("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", engine_stats["waiting"]),
            ("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).", engine_stats["kv_usage"]),
            ("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", engine_stats["prefix_queries"]),
            ("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", engine_stats["prefix_hits"]),
            ("num_preemptions_total", "counter", "Sequences preempted (KV freed, recomputed later).", engine_stats["preemptions"]),
        ]
        lines = []
        with self._lock:
            series += [
                ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens),
                ("generation_tokens_total", "counter", "Generated tokens of finished requests.", self.generation_tokens),
                ("request_rejected_total", "counter", "Requests refused with 429 because the waiting queue was full.", self.rejected),
            ]
            for name, kind, help_text, value in series:
                lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name}{{{lb}}} {value}"]
            lines += [f"# HELP {PREFIX}request_success_total Finished requests by finish reason.",
                      f"# TYPE {PREFIX}request_success_total counter"]
            lines += [f'{PREFIX}request_success_total{{{lb},finished_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            for name, help_text, hist in [
                ("time_to_first_token_seconds", "Time from arrival to the first generated token.", self.ttft),
                ("time_per_output_token_seconds", "Mean time per generated token after the first, per request.", self.tpot),
                ("e2e_request_latency_seconds", "Time from arrival to the last token.", self.e2e),
            ]:
                lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} histogram"]
                lines += hist.lines(PREFIX + name, lb)
        return "\n".join(lines) + "\n"
