"""Where a bench step's time and memory go: the top ops by device time (``OpProfiler``) and the
allocations alive at the memory peak (``MemoryTrace``). Used by ``bench.common.run_crucible`` and the
engine/FP8 benches; each is started after the timed steps so measuring never slows what is timed."""
from __future__ import annotations

import time
from typing import Any

from bench.common import GIB, synchronize


class OpProfiler:
    """torch.profiler over a few steps; ``stop()`` prints and returns the top ops by self device time.

    Self time (not total) so the list adds up: the biggest entries are where the time goes.
    Profiled steps run slower, so callers profile extra steps after the timed ones.
    """

    def __init__(self, top: int = 15):
        self.top, self._prof = top, None
        self.totals: dict[str, float] = {}  # after stop(): wall time of the window and summed device time, ms

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        synchronize()
        self._start = time.perf_counter()
        self._prof = profile(activities=activities)
        self._prof.__enter__()

    def stop(self) -> list[dict[str, Any]]:
        import torch

        synchronize()
        wall_ms = (time.perf_counter() - self._start) * 1e3
        self._prof.__exit__(None, None, None)
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        averages = self._prof.key_averages()
        total = sum(getattr(e, key) for e in averages) or 1.0
        # busy time = the kernels' own time (an op row's self device time repeats its kernels' time)
        kernels = [e for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA")]
        busy = sum(e.self_device_time_total for e in kernels) if kernels else total
        # device time well below wall time means the GPU waits on the host (launch- or Python-bound)
        self.totals = {"wall_ms": round(wall_ms, 2), "device_ms": round(busy / 1e3, 2)}
        print(averages.table(sort_by=key, row_limit=self.top, max_name_column_width=60), flush=True)
        print(f"profiled window: wall {wall_ms:.1f} ms, GPU busy {busy / 1e3:.1f} ms", flush=True)
        return [{"op": e.key, "self_ms": round(getattr(e, key) / 1e3, 3), "pct": round(100 * getattr(e, key) / total, 1), "calls": e.count}
                for e in sorted(averages, key=lambda e: getattr(e, key), reverse=True)[: self.top]]


class MemoryTrace:
    """What is alive at the memory peak of a window: the allocator's event history replayed.

    ``stop()`` returns the window's peak above what was allocated at ``start()`` and the blocks
    alive at that moment grouped by the first frame outside torch's own code (a model line, a
    bitsandbytes call, an Inductor-generated kernel file), largest first: the breakdown a memory
    target's miss needs. CUDA only (``torch.cuda.memory._record_memory_history``).
    """

    def __init__(self, top: int = 12):
        self.top = top

    def start(self) -> None:
        import torch

        synchronize()
        self._base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")

    def stop(self) -> dict[str, Any]:
        import torch

        synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        live: dict[int, dict[str, Any]] = {}
        current = peak = 0
        at_peak: dict[int, dict[str, Any]] = {}
        for event in (e for trace in snapshot["device_traces"] for e in trace):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                current += event["size"]
                if current > peak:
                    peak, at_peak = current, dict(live)
            elif event["action"] == "free_requested" and event["addr"] in live:
                current -= live.pop(event["addr"])["size"]
        groups: dict[str, list[int]] = {}
        for event in at_peak.values():
            where = self._origin(event.get("frames") or [])
            groups.setdefault(where, []).append(event["size"])
        rows = sorted(({"where": k, "gib": round(sum(v) / GIB, 3), "blocks": len(v)} for k, v in groups.items()),
                      key=lambda r: -r["gib"])[: self.top]
        result = {"base_gib": round(self._base / GIB, 3), "transient_peak_gib": round(peak / GIB, 3), "at_peak": rows}
        print(f"memory peak of the window: {self._base / GIB:.3f} GiB before + {peak / GIB:.3f} GiB transient; alive at the peak:", flush=True)
        for r in rows:
            print(f"  {r['gib']:8.3f} GiB  {r['blocks']:5d} blocks  {r['where']}", flush=True)
        return result

    @staticmethod
    def _origin(frames: list[dict[str, Any]]) -> str:
        for f in frames:
            name = f.get("filename", "")
            if "/torch/" in name and "torchinductor" not in name or name.startswith("<"):
                continue
            return f"{name.split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}"
        return "(torch internals)"
