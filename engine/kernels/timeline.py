"""Per-program timestamps of the decode path's kernels, for finding where a batch-1 step's time goes.

A batch-1 decode layer is a chain of five kernels (qkv GEMV, attention, o_proj, gate_up, down) that
overlap through PDL, so a profiler's kernel intervals (start of the first program to end of the
last, waits included) do not say which stage holds up the next. With a ``Timeline`` recording,
every instrumented kernel launched (or captured into a CUDA graph) writes, per program, the
``%globaltimer`` when the program started, when it passed ``gdc_wait`` (its predecessor completed),
when it finished, its SM, and up to ``MARKS`` points the kernel marks (``mark``). ``Timeline.spans``
and ``stage_costs`` then read, per launch: how early its programs were resident, how long after its
predecessor's last program it was released, and when its own last program ended — the step's
critical path, stage by stage.

Off (the default) the kernels compile without a single extra instruction (``STAMPS`` is a constexpr).
The stamps are bench instrumentation: a stamp costs a few cycles and a store per program, but a mark is
a CTA barrier, which can keep the compiler from overlapping work across it: a change that a marked
kernel shows as faster must also be faster unmarked (H100, session 11: skipping the decode attention's
masked next-tile addresses took 1 us off its marked stage and nothing off the unmarked replay).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_FIELDS = 8  # start, after gdc_wait, end (ns, %globaltimer), SM id, then up to MARKS points (the kernels' row stride)
MARKS = 4


@dataclass
class Launch:
    label: str
    programs: int
    offset: int  # first row of this launch in the buffer


@dataclass
class Timeline:
    """Records the launches of ``batch`` rows (None: any) made while it is active (see ``recording``);
    one buffer row per program. A model runner captures a graph per batch size, each after an eager
    warm-up step: with ``batch=1``, after ``clear()`` and a replay of the batch-1 graph, the rows of
    that graph's launches hold the replay's stamps and every other claim stays zero."""
    device: torch.device
    batch: int | None = 1
    capacity: int = 1 << 20  # programs; a 0.6B decode step launches ~150 kernels of <= 2K programs
    launches: list[Launch] = field(default_factory=list)

    def __post_init__(self):
        self.stamps = torch.zeros(self.capacity, _FIELDS, dtype=torch.int64, device=self.device)
        self._next = 0

    def claim(self, label: str, programs: int) -> torch.Tensor:
        """Rows for a launch of ``programs`` programs (the kernel writes program ``p``'s stamps to row ``p``)."""
        if self._next + programs > self.capacity:
            raise RuntimeError(f"timeline: {self.capacity} program rows are full ({len(self.launches)} launches recorded)")
        self.launches.append(Launch(label, programs, self._next))
        view = self.stamps[self._next:self._next + programs]
        self._next += programs
        return view

    def clear(self) -> None:
        self.stamps.zero_()

    def spans(self) -> list[dict]:
        """Per launch, in launch order: ns relative to the first program's start of the first launch —
        ``first_start`` / ``last_start`` (programs resident), ``first_release`` / ``last_release`` (past
        ``gdc_wait``), ``last_end``, ``last_marks`` (per mark, its latest program; None where none marked),
        ``marked_last_start`` (the latest start of the programs that marked anything: the attention's live
        splits, not the idle ones that exit at once); programs that never ran (zeros) are left out."""
        stamps = self.stamps[:self._next].cpu()
        rows, origin = [], None
        for launch in self.launches:
            s = stamps[launch.offset:launch.offset + launch.programs]
            s = s[s[:, 0] > 0]
            if not len(s):
                continue
            origin = int(s[:, 0].min()) if origin is None else origin
            marks = [s[s[:, 4 + i] > 0, 4 + i] for i in range(MARKS)]
            marked = s[(s[:, 4:4 + MARKS] > 0).any(1)]
            rows.append({"label": launch.label, "programs": launch.programs,
                         "first_start": int(s[:, 0].min()) - origin, "last_start": int(s[:, 0].max()) - origin,
                         "first_release": int(s[:, 1].min()) - origin, "last_release": int(s[:, 1].max()) - origin,
                         "last_end": int(s[:, 2].max()) - origin, "sms": int(s[:, 3].unique().numel()),
                         "last_marks": [int(m.max()) - origin if len(m) else None for m in marks],
                         "marked_last_start": int(marked[:, 0].max()) - origin if len(marked) else None})
        return rows


def stage_costs(spans: list[dict]) -> list[dict]:
    """Each launch of ``spans`` against the one before it (in us): ``stage`` = its last program's end
    minus the predecessor's (the launch's share of the critical path); ``release`` = its first program
    past ``gdc_wait`` minus the predecessor's last end (the PDL boundary); ``tail`` = its last end minus
    its first release (the work left once released); ``lead`` = the predecessor's last end minus its
    last program's start (> 0: every program was resident and waiting before the predecessor ended);
    ``lead_marked`` = the same for the programs that marked (None: none did); ``marks`` = each marked
    point's latest program after the first release (None: unmarked)."""
    out = []
    for before, span in zip(spans, spans[1:]):
        out.append({"label": span["label"], "programs": span["programs"],
                    "stage": (span["last_end"] - before["last_end"]) / 1e3,
                    "release": (span["first_release"] - before["last_end"]) / 1e3,
                    "tail": (span["last_end"] - span["first_release"]) / 1e3,
                    "lead": (before["last_end"] - span["last_start"]) / 1e3,
                    "lead_marked": (None if span.get("marked_last_start") is None
                                    else (before["last_end"] - span["marked_last_start"]) / 1e3),
                    "marks": [None if m is None else (m - span["first_release"]) / 1e3 for m in span.get("last_marks", [])]})
    return out


_active: Timeline | None = None


def recording(timeline: Timeline | None) -> None:
    """Instrument every kernel launched from now on into ``timeline`` (None: stop). Graph captures keep
    the instrumentation they were captured with (the model runner recaptures after a change)."""
    global _active
    _active = timeline


def claim(label: str, programs: int, batch: int, fallback: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """What a kernel wrapper passes as (``stamp_ptr``, ``STAMPS``) for a launch over ``batch`` rows: rows
    of the active timeline, or ``fallback`` (any tensor of the launch; never written) and False when
    nothing records that batch size."""
    if _active is None or _active.batch not in (None, batch):
        return fallback, False
    return _active.claim(label, programs), True


# ---------------------------------------------------------------- the kernels' side
import triton  # noqa: E402  (after the host side, which the CPU path could use without Triton)
import triton.language as tl  # noqa: E402


@triton.jit
def now(STAMPS: tl.constexpr):
    """The %globaltimer in ns when recording, else 0 (no instruction)."""
    if STAMPS:
        return tl.extra.cuda.globaltimer()
    return tl.zeros([], tl.int64)


@triton.jit
def stamp(stamp_ptr, program, start, released, STAMPS: tl.constexpr):
    """Program ``program``'s row: ``start``, ``released`` (from ``now``), the time now and its SM; called
    last, after a CTA barrier so that every thread's final stores were issued before the end stamp."""
    if STAMPS:
        tl.debug_barrier()
        row = stamp_ptr + program * 8
        tl.store(row, start)
        tl.store(row + 1, released)
        tl.store(row + 2, tl.extra.cuda.globaltimer())
        tl.store(row + 3, tl.extra.cuda.smid().to(tl.int64))


@triton.jit
def mark(stamp_ptr, program, index: tl.constexpr, STAMPS: tl.constexpr):
    """Intermediate point ``index`` (< MARKS) of program ``program``: the time once every thread of the
    program has got here (a CTA barrier first: the values computed before it exist)."""
    if STAMPS:
        tl.debug_barrier()
        tl.store(stamp_ptr + program * 8 + 4 + index, tl.extra.cuda.globaltimer())


@triton.jit
def mark_arrival(stamp_ptr, program, index: tl.constexpr, probe, STAMPS: tl.constexpr):
    """Point ``index`` once ``probe`` exists: a value reduced from loaded data (e.g. ``tl.sum`` of a tile),
    so the time says when that data arrived (the reduction's CTA barrier cannot pass before it has)."""
    if STAMPS:
        row = stamp_ptr + program * 8 + 4 + index
        tl.store(row, tl.where(probe == probe, 0, 1).to(tl.int64))  # keeps the reduction; overwritten below
        mark(stamp_ptr, program, index, STAMPS)
